"""Atari torsos for Rainbow (reference.md section 4) and an MLP torso for vector observations.

Input [..., T, 84, 84, C] (grey: C=1), oldest frame first, 0..255. Output [..., 256].
Initialisers are DQN Zoo's legacy scheme (its `conv`/`linear` helpers, which the Flare authors'
Haiku fork uses): weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
`dtype` (default float32; `flare_jax.precision`): the compute dtype of the convs and Dense layers
(parameters float32, LayerNorm statistics float32); the output is `dtype`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flare_jax.encoders.layers import (ConvStack, DenseLayerNorm, check_frames, encode_per_frame,
                                       latent_flow, merge_leading)
from flare_jax.precision import canonical_dtype

Array = jax.Array


class _AtariTorso(nn.Module):
    num_frames: int = 4
    feature_dim: int = 256
    conv_impl: str = "auto"     # see flare_jax.cpu.conv.conv_stack
    dtype: Any = jnp.float32    # compute dtype: "float32" or "bfloat16" (flare_jax.precision)

    frame_rank = 3
    observation = "pixels"
    min_frames = 1

    def _frames(self, x):
        if self.num_frames < self.min_frames:
            raise ValueError(f"{type(self).__name__} needs num_frames >= {self.min_frames}, "
                             f"got {self.num_frames}")
        check_frames(x, self.num_frames, type(self).__name__, self.frame_rank)
        return merge_leading(x, 4)     # raw pixels: the convs scale them by 1/255

    def _conv_stack(self) -> ConvStack:
        raise NotImplementedError

    def setup(self):
        self.convs = self._conv_stack()
        self.projection = DenseLayerNorm(self.feature_dim, dqn_init=True, dtype=self.dtype)

    def head(self, h: Array) -> Array:
        return self.projection(h)

    def __call__(self, x: Array) -> Array:
        return self.head(self.trunk(x))


class AtariFlareTorso(_AtariTorso):
    """Per-frame conv 16@8x8/4 ReLU, 32@4x4/2 ReLU, 32@3x3/1 (no ReLU) -> 1568 per frame;
    [z_2..z_4, z_i - sg(z_{i-1})] -> 9408; Dense(256) -> LayerNorm, no activation."""
    min_frames = 2
    detached_frames = 1      # z_1 enters only as the stop-gradient subtrahend of f_2

    def _conv_stack(self) -> ConvStack:
        return ConvStack(filters=(16, 32, 32), kernel_sizes=(8, 4, 3), strides=(4, 2, 1),
                         relu_last=False, scale=1.0 / 255.0, impl=self.conv_impl,
                         dqn_init=True, dtype=self.dtype)

    def trunk(self, x: Array) -> Array:
        frames, lead = self._frames(x)                         # [N, T, H, W, C]
        # z_1 enters only through latent_flow's stop_gradient: no conv backward pass for it
        z = encode_per_frame(self.convs, frames, self.detached_frames)
        z = z.reshape(z.shape[:2] + (-1,))                     # [N, T, 1568]
        return latent_flow(z, time_axis=1).reshape(lead + (-1,))


class AtariBaselineTorso(_AtariTorso):
    """Matched baseline: the T-channel stack through conv 16@8x8/4, 32@4x4/2, 192@3x3/1 (all ReLU)
    -> 7*7*192 = 9408 -> Dense(256) -> LayerNorm."""

    def _conv_stack(self) -> ConvStack:
        return ConvStack(filters=(16, 32, 32 * 6), kernel_sizes=(8, 4, 3), strides=(4, 2, 1),
                         relu_last=True, scale=1.0 / 255.0, impl=self.conv_impl,
                         dqn_init=True, dtype=self.dtype)

    def trunk(self, x: Array) -> Array:
        frames, lead = self._frames(x)                         # [N, T, H, W, C]
        n, t, h, w, c = frames.shape
        stacked = frames.transpose(0, 2, 3, 1, 4).reshape(n, h, w, t * c)
        z = self.convs(stacked)
        return z.reshape(lead + (-1,))


class MLPTorso(nn.Module):
    """Vector observations [..., T, D] -> flatten the T frames -> MLP (ReLU after each layer),
    computed in `dtype` (output [..., hidden_sizes[-1]] in `dtype`)."""
    num_frames: int = 1
    hidden_sizes: Sequence[int] = (256, 256)
    dtype: Any = jnp.float32    # compute dtype: "float32" or "bfloat16" (flare_jax.precision)

    frame_rank = 1
    observation = "vector"

    def trunk(self, x: Array) -> Array:
        check_frames(x, self.num_frames, "MLPTorso", 1)
        return x.reshape(x.shape[:-2] + (-1,)).astype(jnp.float32)

    def setup(self):
        dtype = canonical_dtype(self.dtype)
        self.layers = [nn.Dense(size, dtype=dtype, param_dtype=jnp.float32)
                       for size in self.hidden_sizes]

    def head(self, h: Array) -> Array:
        for layer in self.layers:
            h = nn.relu(layer(h))
        return h

    def __call__(self, x: Array) -> Array:
        return self.head(self.trunk(x))
