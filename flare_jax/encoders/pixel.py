"""DMC pixel encoders: Flare and the paper's baselines/ablations (reference.md section 1).

Every encoder maps pixels [..., T, H, W, C] (oldest frame first; uint8 or float holding 0..255,
scaled by 1/255 inside) to features [..., feature_dim], and splits into two parts:

* `trunk(x)`: the conv stack (and, for the LSTM variant, the recurrence) plus any parameter-free
  fusion; its parameters are the ones SAC shares between critic and actor and trains with the
  critic loss only;
* `head(h)`: Dense(feature_dim) + LayerNorm; the actor has its own copy.

`encoder(x) == encoder.head(encoder.trunk(x))`.

`dtype` (default float32; `flare_jax.precision`): the compute dtype of the convs, the LSTM and the
head's Dense (parameters float32, LayerNorm statistics float32); trunk and head outputs are
`dtype` (the LSTM's hidden state float32: its cell state is kept in float32).

Flatten order: fused latents are flattened as [fused-slot, h, w, c] (no transpose), a fixed
permutation of the reference's channel concatenation followed by flatten; the Dense layer sees the
same inputs, so the function class and initial distribution are the same.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flare_jax.encoders.layers import (ConvStack, DenseLayerNorm, check_frames, delta_orthogonal,
                                       encode_per_frame, latent_flow, merge_leading, to_unit_float)
from flare_jax.precision import canonical_dtype

Array = jax.Array


class PixelEncoder(nn.Module):
    """Shared configuration and the per-frame conv stack. Subclasses define `trunk`."""
    num_frames: int = 3
    feature_dim: int = 64
    num_layers: int = 4
    num_filters: int = 32
    kernel_size: int = 3
    # Per-layer strides; None means the reference (2, 1, 1, ...).
    strides: Optional[Sequence[int]] = None
    # conv computation: "auto" (cache-chunked on CPU, plain XLA elsewhere), "plain", "chunked"
    conv_impl: str = "auto"
    dtype: Any = jnp.float32   # compute dtype: "float32" or "bfloat16" (flare_jax.precision)

    frame_rank = 3            # a frame is [H, W, C]
    observation = "pixels"   # what the environment must provide
    min_frames = 1
    # Per-frame encoders compute trunk(x) = fuse_latents(per_frame_latents(x)); SAC then encodes
    # the frames shared by obs and next_obs once.
    per_frame = False
    # The oldest `detached_frames` frames reach the trunk's output only through stop_gradient;
    # per_frame_latents encodes them under stop_gradient (layers.encode_per_frame: the same
    # gradients without their conv backward pass).
    detached_frames = 0

    def _layer_strides(self) -> tuple[int, ...]:
        if self.strides is None:
            return (2,) + (1,) * (self.num_layers - 1)
        if len(self.strides) != self.num_layers:
            raise ValueError(f"{type(self).__name__}: strides {tuple(self.strides)} must have "
                             f"num_layers={self.num_layers} entries")
        return tuple(self.strides)

    def _check_config(self):
        if self.num_frames < self.min_frames:
            raise ValueError(f"{type(self).__name__} needs num_frames >= {self.min_frames}, "
                             f"got {self.num_frames}")
        for field in ("feature_dim", "num_layers", "num_filters", "kernel_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{type(self).__name__}: {field} must be >= 1, "
                                 f"got {getattr(self, field)}")

    # The convs get raw pixels and scale them by 1/255 inside (uint8 input stays 1 byte/pixel
    # until the first conv); encoders that do pixel arithmetic first set this to 1.
    pixel_scale = 1.0 / 255.0

    def setup(self):
        self._check_config()
        n = self.num_layers
        self.convs = ConvStack(filters=(self.num_filters,) * n, kernel_sizes=(self.kernel_size,) * n,
                               strides=self._layer_strides(), kernel_init=delta_orthogonal(),
                               scale=self.pixel_scale, impl=self.conv_impl, dtype=self.dtype)
        self.projection = DenseLayerNorm(self.feature_dim, dtype=self.dtype)

    def _frames(self, x: Array) -> tuple[Array, tuple[int, ...]]:
        """[..., T, H, W, C] pixels -> [N, T, H, W, C] (dtype kept) and the leading shape."""
        check_frames(x, self.num_frames, type(self).__name__, self.frame_rank)
        return merge_leading(x, 4)

    def per_frame_latents(self, x: Array) -> Array:
        """[..., T, H, W, C] pixels -> conv maps [..., T, h, w, c], frames encoded independently
        (the oldest `detached_frames` maps under stop_gradient)."""
        check_frames(x, self.num_frames, type(self).__name__, self.frame_rank)
        return self.encode_frames(x, self.detached_frames)

    def encode_frames(self, x: Array, detached: int = 0) -> Array:
        """Any number K of frames [..., K, H, W, C] -> their conv maps [..., K, h, w, c]; the
        oldest `detached` maps under stop_gradient."""
        if x.ndim < 4:
            raise ValueError(f"{type(self).__name__}.encode_frames expects [..., K, H, W, C], "
                             f"got shape {tuple(x.shape)}")
        frames, lead = merge_leading(x, 4)
        z = encode_per_frame(self.convs, frames, detached)
        return z.reshape(lead + z.shape[1:])

    def trunk(self, x: Array) -> Array:
        raise NotImplementedError

    def head(self, h: Array) -> Array:
        return self.projection(h)

    def __call__(self, x: Array) -> Array:
        return self.head(self.trunk(x))


def _flatten_tail(x: Array, lead: tuple[int, ...]) -> Array:
    return x.reshape(lead + (-1,))


class _PerFrameEncoder(PixelEncoder):
    per_frame = True

    def fuse_latents(self, z: Array) -> Array:
        """Per-frame latents [..., T, h, w, c] -> trunk features [..., D]."""
        raise NotImplementedError

    def trunk(self, x: Array) -> Array:
        return self.fuse_latents(self.per_frame_latents(x))


class FlareEncoder(_PerFrameEncoder):
    """Flare: shared per-frame convs, latent flow on the conv maps, late fusion.

    trunk: [..., T, H, W, C] -> [..., (2T-2) * h * w * c] = [z_2..z_T, z_i - sg(z_{i-1})].
    At 108 px, T=3 the Dense layer is 282,752 -> 64.
    """
    min_frames = 2
    detached_frames = 1      # z_1 enters only as the stop-gradient subtrahend of f_2

    def fuse_latents(self, z: Array) -> Array:
        fused = latent_flow(z, time_axis=z.ndim - 4)       # [..., 2T-2, h, w, c]
        return _flatten_tail(fused, z.shape[:-4])


class LatentStackEncoder(_PerFrameEncoder):
    """Ablation (Fig. 4b): per-frame latents concatenated, no flow. trunk -> [..., T*h*w*c]."""

    def fuse_latents(self, z: Array) -> Array:
        return _flatten_tail(z, z.shape[:-4])


class FrameStackEncoder(PixelEncoder):
    """RAD baseline: the conv stack applied once to the 3T-channel frame stack.

    Channels are frame-major (frame 1 RGB, frame 2 RGB, ...). At 108 px: Dense 70,688 -> 64.
    """

    def trunk(self, x: Array) -> Array:
        frames, lead = self._frames(x)                      # [N, T, H, W, C]
        n, t, h, w, c = frames.shape
        stacked = frames.transpose(0, 2, 3, 1, 4).reshape(n, h, w, t * c)
        return _flatten_tail(self.convs(stacked), lead)


class PixelFlowEncoder(PixelEncoder):
    """Ablation: early fusion of pixel differences with the frames, then one conv stack.

    The fusion mirrors Flare's with pixels in place of latents: the conv input is
    [x_2..x_T, x_i - x_{i-1}] stacked along channels ((2T-2)*C channels).
    """
    min_frames = 2
    pixel_scale = 1.0

    def trunk(self, x: Array) -> Array:
        frames, lead = self._frames(x)                      # [N, T, H, W, C]
        frames = to_unit_float(frames)
        fused = latent_flow(frames, time_axis=1)           # pixels: stop_gradient is a no-op
        n, s, h, w, c = fused.shape
        stacked = fused.transpose(0, 2, 3, 1, 4).reshape(n, h, w, s * c)
        return _flatten_tail(self.convs(stacked), lead)


class RecurrentEncoder(_PerFrameEncoder):
    """Ablation: an LSTM over the flattened per-frame conv latents, oldest first.

    trunk -> the LSTM's last hidden state [..., lstm_dim]; the LSTM is part of the trunk (shared,
    critic-trained) and the head is Dense + LayerNorm as for the others.
    """
    lstm_dim: int = 64

    def setup(self):
        super().setup()
        self.lstm = nn.RNN(nn.OptimizedLSTMCell(self.lstm_dim, dtype=canonical_dtype(self.dtype),
                                                param_dtype=jnp.float32))

    def fuse_latents(self, z: Array) -> Array:
        lead, t = z.shape[:-4], z.shape[-4]
        seq = z.reshape((-1, t, z.shape[-3] * z.shape[-2] * z.shape[-1]))
        hidden = self.lstm(seq)[:, -1]                      # [N, lstm_dim]
        return hidden.reshape(lead + (self.lstm_dim,))
