"""The conv stack of the encoders, computed batch-chunk by batch-chunk on CPU.

`conv_stack(kernels, biases, x, ...)` is `relu(conv(... relu(conv(x * scale, k1) + b1) ...))` with
VALID padding (no ReLU after the last layer if `relu_last=False`): the same function as chaining
`lax.conv_general_dilated`, bias add and ReLU.

Why (2-core CPU, measured in `python -m experiments.bench encoders`): on this machine class a
pass over a batch activation (384 frames x 53x53x32 floats, 138 MB) costs ~70 ms of memory
bandwidth, and XLA's full-batch lowering makes ~10 such passes per layer (bias, ReLU, its mask,
the layout transposes of the filter gradient, ...). The CPU path runs the stack over chunks of the
batch small enough for those intermediates to stay in the L3 cache, with a custom VJP whose
backward pass also goes chunk by chunk and accumulates the weight gradients:

* forward: `lax.map` over chunks, keeping each layer's output as the residual (one DRAM write);
* backward: `lax.scan` over chunks: ReLU mask, bias gradient, filter gradient (a convolution of
  the layer input with the output gradient) and input gradient (a convolution of the output
  gradient with the flipped kernel, lhs-dilated for strided layers) - each one an Eigen
  convolution on cache-resident data.

The input gradient of the first layer is computed only when `x` is floating point (pixels given
as uint8 are not differentiable). GPU/TPU use the plain lowering (cuDNN / XLA TPU convs), which
`impl="auto"` selects from the default backend.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
_DN = ("NHWC", "HWIO", "NHWC")
# Chunk size target: the largest activation of a chunk stays below this (bytes), so a layer's
# input, output and gradients fit in a 32 MiB L3 together.
CHUNK_BYTES = 6 * 2**20
IMPLS = ("auto", "plain", "chunked")


def _conv(h: Array, kernel: Array, stride: int) -> Array:
    return lax.conv_general_dilated(h, kernel, (stride, stride), "VALID", dimension_numbers=_DN)


def _forward_layers(kernels, biases, x, strides, relu_last, scale):
    """All layer outputs for one batch (list of [n, h, w, c])."""
    h = x.astype(jnp.float32) * scale
    outs = []
    for i, (k, b, s) in enumerate(zip(kernels, biases, strides)):
        h = _conv(h, k, s) + b
        if i < len(kernels) - 1 or relu_last:
            h = jax.nn.relu(h)
        outs.append(h)
    return outs


def _filter_grad(h: Array, g: Array, kernel_shape, stride: int) -> Array:
    """dL/dkernel [kh, kw, ci, co] of a VALID conv: sum over batch and output positions of
    h[b, s*y + i, s*x + j, ci] * g[b, y, x, co], as a convolution with the batch contracted."""
    kh, kw = kernel_shape[:2]
    out = lax.conv_general_dilated(
        h.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), "VALID",
        rhs_dilation=(stride, stride), dimension_numbers=_DN)        # [ci, >=kh, >=kw, co]
    return out[:, :kh, :kw, :].transpose(1, 2, 0, 3)


def _input_grad(g: Array, kernel: Array, in_hw, stride: int) -> Array:
    """dL/dinput [n, H, W, ci] of a VALID conv from the output gradient g [n, Ho, Wo, co]."""
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    (hi, wi), (ho, wo) = in_hw, g.shape[1:3]
    pad = ((kh - 1, hi - (ho - 1) * stride - 1), (kw - 1, wi - (wo - 1) * stride - 1))
    return lax.conv_general_dilated(g, flipped, (1, 1), pad, lhs_dilation=(stride, stride),
                                    dimension_numbers=_DN)


def _chunking(n: int, bytes_per_item: int) -> tuple[int, int]:
    """(number of chunks, chunk size) with chunks * size >= n and small padding."""
    size = max(1, min(n, CHUNK_BYTES // max(bytes_per_item, 1)))
    chunks = math.ceil(n / size)
    return chunks, math.ceil(n / chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked(kernels, biases, x, strides, relu_last, scale, chunk):
    xs = x.reshape((-1, chunk) + x.shape[1:])
    ys = lax.map(lambda xc: _forward_layers(kernels, biases, xc, strides, relu_last, scale)[-1], xs)
    return ys.reshape((-1,) + ys.shape[2:])


def _chunked_fwd(kernels, biases, x, strides, relu_last, scale, chunk):
    xs = x.reshape((-1, chunk) + x.shape[1:])
    outs = lax.map(lambda xc: _forward_layers(kernels, biases, xc, strides, relu_last, scale), xs)
    y = outs[-1].reshape((-1,) + outs[-1].shape[2:])
    return y, (kernels, biases, xs, outs)


def _chunked_bwd(strides, relu_last, scale, chunk, residuals, g):
    kernels, biases, xs, outs = residuals
    n_layers = len(kernels)
    want_dx = jnp.issubdtype(xs.dtype, jnp.floating)
    gs = g.reshape((-1, chunk) + g.shape[1:])

    def body(acc, inputs):
        xc, outs_c, gc = inputs
        ins = [xc.astype(jnp.float32) * scale] + list(outs_c[:-1])
        dks, dbs = [None] * n_layers, [None] * n_layers
        for i in reversed(range(n_layers)):
            if i < n_layers - 1 or relu_last:
                gc = jnp.where(outs_c[i] > 0, gc, 0.0)
            dbs[i] = gc.sum((0, 1, 2))
            dks[i] = _filter_grad(ins[i], gc, kernels[i].shape, strides[i])
            if i > 0 or want_dx:
                gc = _input_grad(gc, kernels[i], ins[i].shape[1:3], strides[i])
        acc_k, acc_b = acc
        acc = ([a + d for a, d in zip(acc_k, dks)], [a + d for a, d in zip(acc_b, dbs)])
        return acc, (gc * scale if want_dx else None)

    zeros = ([jnp.zeros_like(k) for k in kernels], [jnp.zeros_like(b) for b in biases])
    (dk, db), dxs = lax.scan(body, zeros, (xs, outs, gs))
    if want_dx:
        dx = dxs.reshape((-1,) + dxs.shape[2:]).astype(xs.dtype)
    else:
        dx = np.zeros((xs.shape[0] * xs.shape[1],) + xs.shape[2:], jax.dtypes.float0)
    return tuple(dk), tuple(db), dx


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def conv_stack(kernels: Sequence[Array], biases: Sequence[Array], x: Array, strides: Sequence[int],
               relu_last: bool = True, scale: float = 1.0, impl: str = "auto") -> Array:
    """VALID conv layers on x [N, H, W, C] (any dtype; multiplied by `scale` as float32).

    kernels[i] [kh, kw, ci, co], biases[i] [co]; ReLU after every layer (the last only if
    `relu_last`). impl: "plain" (XLA's lowering), "chunked" (cache-sized batch chunks with the
    custom VJP above) or "auto" (chunked on CPU, plain elsewhere).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kernels, biases, strides = tuple(kernels), tuple(biases), tuple(int(s) for s in strides)
    if impl == "auto":
        impl = "chunked" if jax.default_backend() == "cpu" else "plain"
    if impl == "plain":
        return _forward_layers(kernels, biases, x, strides, relu_last, scale)[-1]
    n, hgt, wid = x.shape[:3]
    ho, wo = hgt, wid
    largest = 0
    for k, s in zip(kernels, strides):
        ho, wo = (ho - k.shape[0]) // s + 1, (wo - k.shape[1]) // s + 1
        largest = max(largest, ho * wo * k.shape[3] * 4)
    chunks, chunk = _chunking(n, max(largest, hgt * wid * x.shape[3] * 4))
    padded = chunks * chunk
    if padded != n:
        x = jnp.concatenate([x, jnp.zeros((padded - n,) + x.shape[1:], x.dtype)])
    y = _chunked(kernels, biases, x, strides, bool(relu_last), float(scale), chunk)
    return y[:n]
