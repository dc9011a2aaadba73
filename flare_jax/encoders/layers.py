"""Building blocks shared by the encoders: initialisers, conv stack, input checks, fusion.

Every layer with parameters has a `dtype` field, the compute dtype (`flare_jax.precision`:
float32, the default, or bfloat16): inputs and weights are cast to it for each matmul/conv and
its activations are returned in it; parameters are float32 (`param_dtype`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flare_jax.cpu.conv import conv_stack
from flare_jax.precision import canonical_dtype, cast

Array = jax.Array


def delta_orthogonal(scale: float = math.sqrt(2.0)) -> nn.initializers.Initializer:
    """Delta-orthogonal conv init (RAD/Flare `weight_init`): orthogonal centre tap, zeros elsewhere.

    Kernel shape [kh, kw, in, out]; the centre tap is an orthogonal [in, out] matrix times `scale`.
    """
    ortho = nn.initializers.orthogonal(scale)

    def init(key, shape, dtype=jnp.float32):
        if len(shape) != 4:
            raise ValueError(f"delta_orthogonal expects a [kh, kw, in, out] kernel, got {shape}")
        kh, kw, cin, cout = shape
        kernel = jnp.zeros(shape, dtype)
        return kernel.at[kh // 2, kw // 2].set(ortho(key, (cin, cout), dtype))

    return init


def dqn_uniform(fan_in: int) -> nn.initializers.Initializer:
    """DQN's legacy initialiser (DQN Zoo `_dqn_default_initializer`): U(-c, c), c = 1/sqrt(fan_in),
    for weights and biases alike."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def to_unit_float(pixels: Array, dtype: Any = jnp.float32) -> Array:
    """uint8 or float pixels holding 0..255 -> [0, 1] in `dtype` (computed in float32, rounded
    once)."""
    return cast(pixels.astype(jnp.float32) / 255.0, dtype)


def check_frames(x: Array, num_frames: int, name: str, frame_rank: int) -> Array:
    """Checks `x` is [..., T, *frame] with T == num_frames and a frame of rank `frame_rank`."""
    if not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    layout = {3: "[..., T, H, W, C]", 1: "[..., T, D]"}.get(frame_rank, f"[..., T, <{frame_rank} dims>]")
    if x.ndim < frame_rank + 1:
        raise ValueError(f"{name}: expected input of shape {layout} (rank >= {frame_rank + 1}), "
                         f"got shape {tuple(x.shape)}")
    t = x.shape[-frame_rank - 1]
    if t != num_frames:
        raise ValueError(f"{name}: configured for num_frames={num_frames} but the input has "
                         f"T={t} frames (shape {tuple(x.shape)}, layout {layout})")
    return x


def conv_output_size(size: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Spatial size after a stack of VALID convs."""
    for k, s in zip(kernels, strides):
        size = (size - k) // s + 1
    return size


class _ConvWeights(nn.Module):
    """Declares one conv layer's parameters {kernel [kh, kw, in, out], bias [out]}.

    `dqn_init`: kernel and bias ~ U(+-1/sqrt(kh*kw*in)) (DQN Zoo); else `kernel_init`, zero bias.
    """
    features: int
    kernel_size: int
    kernel_init: nn.initializers.Initializer
    dqn_init: bool = False

    @nn.compact
    def __call__(self, in_features: int):
        k = self.kernel_size
        if self.dqn_init:
            kernel_init = bias_init = dqn_uniform(k * k * in_features)
        else:
            kernel_init, bias_init = self.kernel_init, nn.initializers.zeros
        kernel = self.param("kernel", kernel_init, (k, k, in_features, self.features))
        bias = self.param("bias", bias_init, (self.features,))
        return kernel, bias


class ConvStack(nn.Module):
    """VALID conv layers on [N, H, W, C] input, ReLU after each (optionally not the last).

    The input may be uint8 pixels: it is converted to float32 and multiplied by `scale` inside
    (pixels: 1/255). Computed by `flare_jax.cpu.conv.conv_stack` (cache-sized batch chunks on CPU)
    in `dtype` (output [N, h, w, filters[-1]] in `dtype`; parameters float32).
    """
    filters: Sequence[int]
    kernel_sizes: Sequence[int]
    strides: Sequence[int]
    relu_last: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    scale: float = 1.0
    impl: str = "auto"
    dqn_init: bool = False          # DQN Zoo's U(+-1/sqrt(fan_in)) for kernels and biases
    dtype: Any = jnp.float32        # compute dtype (flare_jax.precision)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n = len(self.filters)
        if not (len(self.kernel_sizes) == len(self.strides) == n):
            raise ValueError(f"ConvStack: filters {self.filters}, kernel_sizes {self.kernel_sizes} "
                             f"and strides {self.strides} must have the same length")
        size = conv_output_size(min(x.shape[-3:-1]), self.kernel_sizes, self.strides)
        if size < 1:
            raise ValueError(f"ConvStack: a {x.shape[-3]}x{x.shape[-2]} frame is too small for "
                             f"kernels {tuple(self.kernel_sizes)} with strides {tuple(self.strides)}")
        kernels, biases = [], []
        in_features = x.shape[-1]
        for i, (f, k) in enumerate(zip(self.filters, self.kernel_sizes)):
            kernel, bias = _ConvWeights(f, k, self.kernel_init, self.dqn_init,
                                        name=f"conv_{i}")(in_features)
            kernels.append(kernel)
            biases.append(bias)
            in_features = f
        return conv_stack(kernels, biases, x, self.strides, self.relu_last, self.scale, self.impl,
                          canonical_dtype(self.dtype))


class DenseLayerNorm(nn.Module):
    """Dense(features) -> LayerNorm(eps 1e-5, learned scale/offset); no activation (no tanh).

    Init: `kernel_init` and zero bias, or DQN Zoo's U(+-1/sqrt(fan_in)) for both (`dqn_init`).
    [..., K] -> [..., features] in `dtype`: the Dense computes in `dtype`; the LayerNorm's mean and
    variance are float32 whatever `dtype` (flax's `_compute_stats` promotes them), its
    normalisation, scale and offset float32, the result rounded to `dtype`.
    """
    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.orthogonal(1.0)
    dqn_init: bool = False
    dtype: Any = jnp.float32        # compute dtype (flare_jax.precision)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.dqn_init:
            kernel_init = bias_init = dqn_uniform(x.shape[-1])
        else:
            kernel_init, bias_init = self.kernel_init, nn.initializers.zeros
        dtype = canonical_dtype(self.dtype)
        x = nn.Dense(self.features, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                     param_dtype=jnp.float32, name="dense")(x)
        return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                            name="layer_norm")(x)


def latent_flow(z: Array, time_axis: int) -> Array:
    """[z_2..z_T, f_2..f_T] along `time_axis`, with f_i = z_i - stop_gradient(z_{i-1}).

    The stop-gradient is on the subtrahend only, so z_1 reaches the output only through it.
    Output has 2T-2 entries along `time_axis`.
    """
    t = z.shape[time_axis]
    if t < 2:
        raise ValueError(f"latent flow needs at least 2 frames, got T={t}")
    newer = jax.lax.slice_in_dim(z, 1, t, axis=time_axis)
    older = jax.lax.slice_in_dim(z, 0, t - 1, axis=time_axis)
    return jnp.concatenate([newer, newer - jax.lax.stop_gradient(older)], axis=time_axis)


def encode_per_frame(encode: Callable[[Array], Array], frames: Array, detached: int = 0) -> Array:
    """Applies `encode` ([M, *frame] -> [M, *out]) to every frame of frames [N, K, *frame]
    -> [N, K, *out], as one batch of N*K frames.

    The oldest `detached` frames' outputs come back under stop_gradient: for fusions in which they
    reach the result only through stop_gradient (latent flow's z_1) this gives the same values and
    gradients while autodiff never runs the conv backward pass for them ((K-d)/K of that work).
    """
    n, k = frames.shape[:2]
    if not 0 <= detached <= k:
        raise ValueError(f"detached frames must be in [0, {k}], got {detached}")

    def run(x: Array) -> Array:
        m = x.shape[1]
        y = encode(x.reshape((n * m,) + x.shape[2:]))
        return y.reshape((n, m) + y.shape[1:])

    if detached == 0:
        return run(frames)
    old = jax.lax.stop_gradient(run(frames[:, :detached]))
    if detached == k:
        return old
    return jnp.concatenate([old, run(frames[:, detached:])], axis=1)


def merge_leading(x: Array, keep: int) -> tuple[Array, tuple[int, ...]]:
    """Flattens all but the last `keep` dims into one batch dim; returns it and the lead shape."""
    lead = x.shape[:x.ndim - keep]
    return x.reshape((-1,) + x.shape[x.ndim - keep:]), lead
