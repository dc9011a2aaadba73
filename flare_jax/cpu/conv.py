"""The conv stack of the encoders, computed batch-chunk by batch-chunk on CPU.

`conv_stack(kernels, biases, x, ...)` is `relu(conv(... relu(conv(x * scale, k1) + b1) ...))` with
VALID padding (no ReLU after the last layer if `relu_last=False`): the same function as chaining
`lax.conv_general_dilated`, bias add and ReLU.

Why (2-core CPU, measured in `python -m experiments.bench encoders` and `sac_update`): on this
machine class a pass over a batch activation (384 frames x 53x53x32 floats, 138 MB) costs ~70 ms
of memory bandwidth, and XLA's full-batch lowering makes ~10 such passes per layer (bias, ReLU,
its mask, the layout transposes of the filter gradient, ...). The CPU path splits the batch into
chunks whose largest activation is ~CHUNK_BYTES, with a custom VJP:

* forward: each chunk through all layers; every layer's output is kept as the residual;
* backward, chunk by chunk: ReLU mask, bias gradient (a two-stage sum), filter gradient (a
  convolution of the layer input with the output gradient, batch contracted) and input gradient
  (a convolution of the output gradient with the flipped kernel, lhs-dilated for strided
  layers that are not blocked, below), each an Eigen convolution; the weight gradients are summed
  over chunks.

A strided layer whose kernel is a whole number of strides (Atari's 8x8/4 and 4x4/2) runs as a
stride-1 conv over s x s space-to-depth blocks of its input with the kernel's taps regrouped the
same way (`_space_to_depth`, `_blocked_kernel`): the same products summed in another order. Its
input gradient is then a plain padded conv; the strided layer's is an lhs-dilated conv that
multiplies s*s - 1 zeros for each useful product (the Atari Flare torso's conv stack fwd+bwd over
96 frames: 9.9 ms blocked vs 14.7 ms strided; the Rainbow update 36.7 vs 41.7 ms, 2-core Zen 4
VM). SAC's 3x3/2 layer is not blocked (its input gradient is never computed: uint8 pixels).

The chunks are a Python loop (one set of ops per chunk), not `lax.map`/`lax.scan`: a scan's
stacked residuals cost a zero-fill of each buffer plus dynamic-update-slice copies (~130 ms of a
1.5 s frame-stack SAC update in a profile), and the unrolled loop measured 0.89-0.94x the scan's
time for the frame-stack update and 0.90x for Flare's (A/B in one process, 2-core VM). XLA is free
to order the per-chunk ops (it runs them layer by layer); one full-batch chunk measured 1.06x
slower than the default chunking.

Forward-only passes (`forward`): a conv stack that is not differentiated (SAC's target trunk and
frozen frames, Rainbow's targets, acting) runs its primal, which is either the same chunks
("chunked") or one full-batch pass ("full", the plain lowering). Which is faster depends on the
CPU (`bench encoders`, Flare forward of 384 frames: on a 2-core AMD EPYC with AVX-512 the
full-batch Eigen forward ran 1.36x faster than the chunks; on the 2-core AVX2 EPYC runs gave
0.90x-1.27x), so `flare_jax.cpu.xla_cpu` measures it
per machine along with the conv backend and `setup_process()` puts the choice in
FLARE_JAX_CONV_FORWARD (a process setting, like XLA_FLAGS; read when a conv stack is traced;
default "chunked"). Both compute the same function; the backward pass is always chunked.

The input gradient of the first layer is computed only when `x` is floating point (pixels given
as uint8 are not differentiable). GPU/TPU use the plain lowering (cuDNN / XLA TPU convs), which
`impl="auto"` selects from the default backend.

Compute dtype (`dtype`, `flare_jax.precision`): the scaled input (x * scale, computed in float32
and rounded once), the kernels and the biases are cast to `dtype` for every conv, and the
activations (and the residuals kept for the backward pass) are `dtype`. The custom VJP returns
kernel and bias gradients in the parameters' dtype: per chunk, the filter gradient's conv
accumulates into the parameters' dtype (`preferred_element_type`) and the bias gradient sums the
output gradient converted to it; the chunks' sums are in that dtype. With dtype float32 (the
default) nothing is cast: the float32 computation, bit for bit.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flare_jax.precision import canonical_dtype, cast
from flare_jax.cpu.xla_cpu import FORWARDS, forward_mode

Array = jax.Array
_DN = ("NHWC", "HWIO", "NHWC")
# Chunk size target: the largest activation of a chunk stays below this (bytes). At the SAC
# reference shapes, 6 MiB (chunks of 13 frame stacks, of 16-17 Flare frames) measured within 3%
# of 2-4x larger chunks and 6% faster than one full-batch chunk (2-core VM, SAC updates).
CHUNK_BYTES = 6 * 2**20
IMPLS = ("auto", "plain", "chunked")


def _conv(h: Array, kernel: Array, stride: int) -> Array:
    return lax.conv_general_dilated(h, kernel, (stride, stride), "VALID", dimension_numbers=_DN)


def _blocked(kernel_shape, stride: int) -> bool:
    """Whether the chunked path runs this layer as a stride-1 conv over s x s blocks (stride > 1
    and the kernel a whole number of strides, e.g. the Atari 8x8/4 and 4x4/2 layers)."""
    return stride > 1 and kernel_shape[0] % stride == 0 and kernel_shape[1] % stride == 0


def _space_to_depth(h: Array, kernel_shape, stride: int) -> Array:
    """[n, H, W, c] -> [n, H'/s, W'/s, s*s*c]: the rows and columns a VALID stride-s conv with this
    kernel reads (H' = s * (Ho + kh/s - 1) <= H), each s x s block's pixels as channels (row
    offset, column offset, c)."""
    n, hgt, wid, c = h.shape
    (kh, kw), s = kernel_shape[:2], stride
    rows, cols = s * ((hgt - kh) // s + kh // s), s * ((wid - kw) // s + kw // s)
    h = h[:, :rows, :cols].reshape(n, rows // s, s, cols // s, s, c)
    return h.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows // s, cols // s, s * s * c)


def _depth_to_space(g: Array, in_shape, stride: int) -> Array:
    """The adjoint of `_space_to_depth`: [n, h, w, s*s*c] -> [n, H, W, c], zero in the rows and
    columns the conv does not read."""
    n, hb, wb, cc = g.shape
    s, c = stride, cc // (stride * stride)
    g = g.reshape(n, hb, wb, s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hb * s, wb * s, c)
    return jnp.pad(g, ((0, 0), (0, in_shape[1] - hb * s), (0, in_shape[2] - wb * s), (0, 0)))


def _blocked_kernel(kernel: Array, stride: int) -> Array:
    """[kh, kw, ci, co] -> [kh/s, kw/s, s*s*ci, co], tap (a*s + i, b*s + j) of the kernel at block
    tap (a, b), channel (i, j, ci): conv(space_to_depth(h), this, stride 1) = conv(h, kernel, s)."""
    kh, kw, ci, co = kernel.shape
    s = stride
    k = kernel.reshape(kh // s, s, kw // s, s, ci, co).transpose(0, 2, 1, 3, 4, 5)
    return k.reshape(kh // s, kw // s, s * s * ci, co)


def _unblocked_kernel(dk: Array, kernel_shape, stride: int) -> Array:
    """The inverse permutation of `_blocked_kernel` (for the filter gradient)."""
    kh, kw, ci, co = kernel_shape
    s = stride
    k = dk.reshape(kh // s, kw // s, s, s, ci, co).transpose(0, 2, 1, 3, 4, 5)
    return k.reshape(kernel_shape)


def _conv_layer(h: Array, kernel: Array, stride: int, blocked: bool) -> Array:
    if blocked and _blocked(kernel.shape, stride):
        return _conv(_space_to_depth(h, kernel.shape, stride), _blocked_kernel(kernel, stride), 1)
    return _conv(h, kernel, stride)


def _scaled_input(x: Array, scale: float, dtype) -> Array:
    """x (any dtype, e.g. uint8 pixels) * scale, computed in float32, as `dtype`."""
    return cast(x.astype(jnp.float32) * scale, dtype)


def _forward_layers(kernels, biases, x, strides, relu_last, scale, dtype=jnp.float32,
                    blocked=False):
    """All layer outputs for one batch (list of [n, h, w, c], `dtype`); kernels and biases are
    cast to `dtype` (their gradients, by autodiff, come back in their own dtype). `blocked`:
    strided layers whose kernel is a whole number of strides run as stride-1 convs over
    space-to-depth blocks (`_conv_layer`; the same sums in another order)."""
    h = _scaled_input(x, scale, dtype)
    outs = []
    for i, (k, b, s) in enumerate(zip(kernels, biases, strides)):
        h = _conv_layer(h, cast(k, dtype), s, blocked) + cast(b, dtype)
        if i < len(kernels) - 1 or relu_last:
            h = jax.nn.relu(h)
        outs.append(h)
    return outs


def _filter_grad(h: Array, g: Array, kernel_shape, stride: int, out_dtype=jnp.float32) -> Array:
    """dL/dkernel [kh, kw, ci, co] of a VALID conv: sum over batch and output positions of
    h[b, s*y + i, s*x + j, ci] * g[b, y, x, co], as a convolution with the batch contracted,
    accumulated and returned in `out_dtype` (h and g may be a narrower dtype)."""
    kh, kw = kernel_shape[:2]
    out_dtype = jnp.dtype(out_dtype)
    preferred = None if h.dtype == g.dtype == out_dtype else out_dtype
    out = lax.conv_general_dilated(
        h.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), "VALID",
        rhs_dilation=(stride, stride), dimension_numbers=_DN,
        preferred_element_type=preferred)                            # [ci, >=kh, >=kw, co]
    return out[:, :kh, :kw, :].transpose(1, 2, 0, 3)


def _input_grad(g: Array, kernel: Array, in_hw, stride: int) -> Array:
    """dL/dinput [n, H, W, ci] of a VALID conv from the output gradient g [n, Ho, Wo, co]."""
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    (hi, wi), (ho, wo) = in_hw, g.shape[1:3]
    pad = ((kh - 1, hi - (ho - 1) * stride - 1), (kw - 1, wi - (wo - 1) * stride - 1))
    return lax.conv_general_dilated(g, flipped, (1, 1), pad, lhs_dilation=(stride, stride),
                                    dimension_numbers=_DN)


def _chunk_size(n: int, bytes_per_item: int) -> int:
    """Items per chunk: at most CHUNK_BYTES / bytes_per_item (at least 1), balanced over the
    chunks that a batch of n needs."""
    size = max(1, min(n, CHUNK_BYTES // max(bytes_per_item, 1)))
    return math.ceil(n / math.ceil(n / size))


def _bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk of a batch of n (the last one may be smaller)."""
    return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]


def _bias_grad(g: Array) -> Array:
    """sum of g [n, h, w, c] over n, h, w, in two stages (XLA CPU's one-shot reduction of this
    shape lowered to a reduce-window that took 2-3x longer)."""
    n, h, w, c = g.shape
    return g.reshape(n * h, w * c).sum(0).reshape(w, c).sum(0)


def _layers_backward(kernels, ins, outs, g, strides, relu_last, want_dx, dtype=jnp.float32):
    """Filter gradients, bias gradients and (if want_dx) the input gradient of one chunk, given
    each layer's input `ins[i]`, output `outs[i]` and the output gradient g (all `dtype`, the
    compute dtype); the filter and bias gradients are in the kernels' dtype."""
    n_layers = len(kernels)
    dks, dbs = [None] * n_layers, [None] * n_layers
    for i in reversed(range(n_layers)):
        param_dtype = kernels[i].dtype
        if i < n_layers - 1 or relu_last:
            g = jnp.where(outs[i] > 0, g, 0.0)
        dbs[i] = _bias_grad(cast(g, param_dtype))
        shape, stride = kernels[i].shape, strides[i]
        if _blocked(shape, stride):    # stride-1 formulas on the blocks: no dilated convs
            h = _space_to_depth(ins[i], shape, stride)
            k = _blocked_kernel(cast(kernels[i], dtype), stride)
            dks[i] = _unblocked_kernel(_filter_grad(h, g, k.shape, 1, param_dtype), shape, stride)
            if i > 0 or want_dx:
                g = _depth_to_space(_input_grad(g, k, h.shape[1:3], 1), ins[i].shape, stride)
            continue
        dks[i] = _filter_grad(ins[i], g, shape, stride, param_dtype)
        if i > 0 or want_dx:
            g = _input_grad(g, cast(kernels[i], dtype), ins[i].shape[1:3], stride)
    return dks, dbs, (g if want_dx else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _chunked(kernels, biases, x, strides, relu_last, scale, chunk, dtype, forward):
    if forward == "full":     # not differentiated: one full-batch pass (see the module docstring)
        return _forward_layers(kernels, biases, x, strides, relu_last, scale, dtype, True)[-1]
    return _chunked_fwd(kernels, biases, x, strides, relu_last, scale, chunk, dtype, forward)[0]


def _chunked_fwd(kernels, biases, x, strides, relu_last, scale, chunk, dtype, forward):
    del forward   # differentiated: always the chunks (their outputs are the residuals)
    outs = [_forward_layers(kernels, biases, x[a:b], strides, relu_last, scale, dtype, True)
            for a, b in _bounds(x.shape[0], chunk)]
    return jnp.concatenate([o[-1] for o in outs]), (kernels, x, outs)


def _chunked_bwd(strides, relu_last, scale, chunk, dtype, forward, residuals, g):
    del forward
    kernels, x, outs = residuals
    want_dx = jnp.issubdtype(x.dtype, jnp.floating)
    dk = [jnp.zeros_like(k) for k in kernels]
    db = [jnp.zeros(k.shape[-1], k.dtype) for k in kernels]
    dxs = []
    for (a, b), outs_c in zip(_bounds(x.shape[0], chunk), outs):
        ins = [_scaled_input(x[a:b], scale, dtype)] + list(outs_c[:-1])
        dks, dbs, dx = _layers_backward(kernels, ins, outs_c, cast(g[a:b], dtype), strides,
                                        relu_last, want_dx, dtype)
        dk = [u + v for u, v in zip(dk, dks)]
        db = [u + v for u, v in zip(db, dbs)]
        dxs.append(dx)
    if want_dx:
        dx = (jnp.concatenate(dxs) * scale).astype(x.dtype)
    else:
        dx = np.zeros(x.shape, jax.dtypes.float0)
    return tuple(dk), tuple(db), dx


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def conv_stack(kernels: Sequence[Array], biases: Sequence[Array], x: Array, strides: Sequence[int],
               relu_last: bool = True, scale: float = 1.0, impl: str = "auto",
               dtype="float32", forward: str | None = None) -> Array:
    """VALID conv layers on x [N, H, W, C] (any dtype; multiplied by `scale` as float32)
    -> [N, h, w, co_last] in `dtype`.

    kernels[i] [kh, kw, ci, co], biases[i] [co] (float32 parameters); ReLU after every layer (the
    last only if `relu_last`). impl: "plain" (XLA's lowering), "chunked" (cache-sized batch
    chunks with the custom VJP above) or "auto" (chunked on CPU, plain elsewhere). dtype: the
    compute dtype, "float32" or "bfloat16" (`flare_jax.precision`); the parameters' gradients
    keep the parameters' dtype. forward: how the chunked path runs when it is not
    differentiated, "chunked" or "full" (default: `forward_mode()`, this process's setting).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    forward = forward_mode() if forward is None else forward
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    dtype = canonical_dtype(dtype)
    kernels, biases, strides = tuple(kernels), tuple(biases), tuple(int(s) for s in strides)
    if impl == "auto":
        impl = "chunked" if jax.default_backend() == "cpu" else "plain"
    if impl == "plain":
        return _forward_layers(kernels, biases, x, strides, relu_last, scale, dtype)[-1]
    n, hgt, wid = x.shape[:3]
    ho, wo = hgt, wid
    largest = 0
    # float32 bytes whatever `dtype`: XLA's CPU compiler runs a bfloat16 conv as a float32 conv
    # between converts (jaxlib 0.10.2, CPUs without bf16 units), so the working set is float32.
    for k, s in zip(kernels, strides):
        ho, wo = (ho - k.shape[0]) // s + 1, (wo - k.shape[1]) // s + 1
        largest = max(largest, ho * wo * k.shape[3] * 4)
    chunk = _chunk_size(n, max(largest, hgt * wid * x.shape[3] * 4))
    return _chunked(kernels, biases, x, strides, bool(relu_last), float(scale), chunk, dtype.name,
                    forward)
