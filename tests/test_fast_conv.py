"""The fast CPU convolution path (flare_jax.cpu.xla_cpu) computes lax.conv_general_dilated's function.

Three independent checks, values and gradients, random inputs and parameters:
1. the path is active: XLA compiles flare_jax's convs to Eigen, not to YNNPACK;
2. it matches a float64 NumPy reference (relative error < 1e-5);
3. it matches XLA's default CPU path, computed in a subprocess with FLARE_JAX_CONV_BACKEND=ynnpack
   (XLA flags are per process).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.cpu import xla_cpu
from flare_jax.encoders import make_encoder

REL_TOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _conv_ref(x, w, stride):
    """float64 VALID conv, NHWC x HWIO, by explicit patch sums."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    kh, kw = w.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out += patch @ w[i, j]
    return out


def _conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU path is only used on CPU")
def test_fast_path_is_active_on_cpu():
    assert xla_cpu.is_configured()
    assert not xla_cpu.conv_uses_ynnpack(), "convs still compile to YNNPACK (slow path)"


@pytest.mark.parametrize("stride,cin,size", [(1, 32, 13), (2, 3, 17), (4, 1, 20), (2, 9, 16)])
def test_conv_values_and_gradients_match_float64_reference(stride, cin, size):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(stride * 100 + cin), 3)
    ksz = 8 if stride == 4 else 3
    x = jax.random.normal(k1, (4, size, size, cin))
    w = jax.random.normal(k2, (ksz, ksz, cin, 16)) * 0.2
    y = jax.jit(_conv, static_argnums=2)(x, w, stride)
    y_ref = _conv_ref(x, w, stride)
    assert rel_err(y, y_ref) < REL_TOL
    # gradients of <conv(x, w), g> for a random cotangent g: dx and dw against float64 by
    # finite-dimensional adjoint identities computed with the reference conv.
    g = jax.random.normal(k3, y.shape)
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(_conv(x, w, stride) * g), (0, 1)))(x, w)
    xd, wd, gd = (np.asarray(a, np.float64) for a in (x, w, g))
    dw_ref = np.zeros_like(wd)
    dx_ref = np.zeros_like(xd)
    ho, wo = gd.shape[1:3]
    for i in range(ksz):
        for j in range(ksz):
            sl = (slice(None), slice(i, i + stride * (ho - 1) + 1, stride),
                  slice(j, j + stride * (wo - 1) + 1, stride))
            dw_ref[i, j] = np.einsum("bhwc,bhwo->co", xd[sl], gd)
            dx_ref[sl] += gd @ wd[i, j].T
    assert rel_err(dw, dw_ref) < REL_TOL
    assert rel_err(dx, dx_ref) < REL_TOL


_SUBPROCESS = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from flare_jax.runtime import setup_process
    setup_process()
    import jax, jax.numpy as jnp
    from flare_jax.cpu import xla_cpu
    from flare_jax.encoders import make_encoder
    enc = make_encoder("flare", feature_dim=16)
    x = jax.random.randint(jax.random.PRNGKey(1), (4, 3, 40, 40, 3), 0, 256).astype(jnp.uint8)
    params = enc.init(jax.random.PRNGKey(2), x)
    loss = lambda p: jnp.sum(enc.apply(p, x) * jnp.arange(16.0))
    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    flat = {jax.tree_util.keystr(k): np.asarray(v).tolist()
            for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    out = {"ynn": xla_cpu.conv_uses_ynnpack(), "value": float(val),
           "features": np.asarray(jax.jit(enc.apply)(params, x)).tolist(), "grads": flat}
    json.dump(out, sys.stdout)
""")


def _run(fast: bool):
    env = dict(os.environ, FLARE_JAX_CONV_BACKEND="eigen" if fast else "ynnpack", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def test_flare_encoder_matches_xla_default_conv_path():
    fast, default = _run(fast=True), _run(fast=False)
    assert not fast["ynn"] and default["ynn"], "the two runs must use different CPU conv kernels"
    assert rel_err(fast["features"], default["features"]) < REL_TOL
    assert set(fast["grads"]) == set(default["grads"])
    for name in fast["grads"]:
        assert rel_err(fast["grads"][name], default["grads"][name]) < REL_TOL, name


# ---------------------------------------------------------------- the chunked conv stack

from flare_jax.cpu import conv as fconv  # noqa: E402


def _stack_params(key, channels, kernels, cin):
    ks, bs = [], []
    for i, (c, k) in enumerate(zip(channels, kernels)):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        ks.append(jax.random.normal(k1, (k, k, cin, c)) * (1.0 / np.sqrt(k * k * cin)))
        bs.append(jax.random.normal(k2, (c,)) * 0.1)
        cin = c
    return ks, bs


@pytest.mark.parametrize("n,size,cin,channels,kernels,strides,relu_last", [
    (37, 30, 3, (8, 8, 8), (3, 3, 3), (2, 1, 1), True),          # a smaller last chunk
    (6, 84, 1, (16, 32, 32), (8, 4, 3), (4, 2, 1), False),        # Atari Flare torso
    (5, 24, 12, (16, 16), (3, 3), (1, 2), True),
    (3, 91, 2, (8, 8), (8, 4), (4, 2), True),      # blocked layers that skip rows (91 -> 21 -> 9)
])
def test_chunked_stack_equals_plain_values_and_gradients(n, size, cin, channels, kernels, strides,
                                                         relu_last, monkeypatch):
    monkeypatch.setattr(fconv, "CHUNK_BYTES", 40_000)           # force several small chunks
    key = jax.random.PRNGKey(n)
    ks, bs = _stack_params(key, channels, kernels, cin)
    x = jax.random.uniform(jax.random.fold_in(key, 99), (n, size, size, cin)) * 255.0

    def out(impl, ks, bs, x):
        return fconv.conv_stack(ks, bs, x, strides, relu_last, 1 / 255.0, impl)

    y_plain = jax.jit(lambda *a: out("plain", *a))(ks, bs, x)
    y_chunk = jax.jit(lambda *a: out("chunked", *a))(ks, bs, x)
    assert rel_err(y_chunk, y_plain) < REL_TOL
    jaxpr = str(jax.make_jaxpr(lambda *a: out("chunked", *a))(ks, bs, x))
    assert jaxpr.count("conv_general_dilated") >= 2 * len(kernels)      # really several chunks
    cot = jax.random.normal(jax.random.fold_in(key, 7), y_plain.shape)
    grad = lambda impl: jax.jit(jax.grad(lambda *a: jnp.sum(out(impl, *a) * cot), (0, 1, 2)))(ks, bs, x)  # noqa: E731
    for g_c, g_p in zip(jax.tree.leaves(grad("chunked")), jax.tree.leaves(grad("plain"))):
        assert rel_err(g_c, g_p) < REL_TOL


@pytest.mark.parametrize("size,k,stride,cin", [(84, 8, 4, 1), (21, 4, 2, 16), (23, 6, 3, 2)])
def test_a_blocked_layer_is_the_strided_conv_and_its_backward_the_adjoint(size, k, stride, cin):
    """The chunked path runs a stride-s conv whose kernel is a whole number of strides as a
    stride-1 conv over s x s space-to-depth blocks (no lhs-dilated input-gradient conv, which
    multiplies s*s - 1 zeros per product): the same values as the strided conv, and
    `_depth_to_space` is the adjoint of `_space_to_depth` (zero on the rows the conv skips)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(size), 3)
    h = jax.random.normal(k1, (3, size, size, cin))
    w = jax.random.normal(k2, (k, k, cin, 5))
    assert fconv._blocked(w.shape, stride) and not fconv._blocked((3, 3, 1, 1), 2)
    blocks = fconv._space_to_depth(h, w.shape, stride)
    y = fconv._conv(blocks, fconv._blocked_kernel(w, stride), 1)
    assert rel_err(y, fconv._conv(h, w, stride)) < REL_TOL
    np.testing.assert_array_equal(
        fconv._unblocked_kernel(fconv._blocked_kernel(w, stride), w.shape, stride), w)
    g = jax.random.normal(k3, blocks.shape)
    back = fconv._depth_to_space(g, h.shape, stride)
    assert back.shape == h.shape
    np.testing.assert_allclose(float(jnp.vdot(blocks, g)), float(jnp.vdot(h, back)), rtol=1e-5)
    skipped = h.shape[1] - blocks.shape[1] * stride
    if skipped:
        assert float(jnp.abs(back[:, -skipped:]).max()) == 0.0


def test_full_batch_forward_only_pass_equals_the_chunks_and_leaves_gradients_alone(monkeypatch):
    """forward="full" (flare_jax.cpu.xla_cpu.forward_mode): an undifferentiated stack is one
    full-batch pass with the chunks' values; differentiated, the chunks run (same gradients, bit
    for bit); a call whose parameters are frozen (stop_gradient, as SAC's target and frozen
    frames) inside a gradient also runs the one full-batch pass."""
    monkeypatch.setattr(fconv, "CHUNK_BYTES", 40_000)
    key = jax.random.PRNGKey(5)
    channels, kernels, strides = (8, 8, 8), (3, 3, 3), (2, 1, 1)
    ks, bs = _stack_params(key, channels, kernels, 3)
    x = jax.random.randint(jax.random.fold_in(key, 1), (37, 30, 30, 3), 0, 256).astype(jnp.uint8)

    def out(forward, ks, bs):
        return fconv.conv_stack(ks, bs, x, strides, True, 1 / 255.0, "chunked", forward=forward)

    y_chunks = jax.jit(lambda *a: out("chunked", *a))(ks, bs)
    y_full = jax.jit(lambda *a: out("full", *a))(ks, bs)
    assert rel_err(y_full, y_chunks) < REL_TOL
    n_convs = lambda f, *a: str(jax.make_jaxpr(f)(*a)).count("conv_general_dilated")  # noqa: E731
    assert n_convs(lambda *a: out("full", *a), ks, bs) == len(kernels)         # one pass
    assert n_convs(lambda *a: out("chunked", *a), ks, bs) > 2 * len(kernels)   # several chunks
    grad = lambda forward: jax.jit(jax.grad(lambda *a: jnp.sum(out(forward, *a) ** 2), (0, 1)))(ks, bs)  # noqa: E731
    for g_f, g_c in zip(jax.tree.leaves(grad("full")), jax.tree.leaves(grad("chunked"))):
        np.testing.assert_array_equal(np.asarray(g_f), np.asarray(g_c))

    def frozen_and_live(forward):
        def loss(ks, bs):
            frozen = out(forward, jax.lax.stop_gradient(ks), jax.lax.stop_gradient(bs))
            return jnp.sum(frozen * out(forward, ks, bs))
        return n_convs(jax.grad(loss, (0, 1)), ks, bs)
    # the live call's chunks are the same in both; the frozen one is 1 pass instead of chunks
    n_chunks = n_convs(lambda *a: out("chunked", *a), ks, bs) // len(kernels)
    assert frozen_and_live("chunked") - frozen_and_live("full") == (n_chunks - 1) * len(kernels)
    with pytest.raises(ValueError, match="forward must be one of"):
        out("fastest", ks, bs)


def test_chunked_stack_with_uint8_input_gives_parameter_gradients(monkeypatch):
    monkeypatch.setattr(fconv, "CHUNK_BYTES", 50_000)
    ks, bs = _stack_params(jax.random.PRNGKey(3), (8, 8), (3, 3), 3)
    x = jax.random.randint(jax.random.PRNGKey(4), (9, 20, 20, 3), 0, 256).astype(jnp.uint8)
    loss = lambda impl: lambda ks, bs: jnp.sum(fconv.conv_stack(ks, bs, x, (2, 1), True, 1 / 255.0, impl) ** 2)  # noqa: E731
    g_c = jax.jit(jax.grad(loss("chunked"), (0, 1)))(ks, bs)
    g_p = jax.jit(jax.grad(loss("plain"), (0, 1)))(ks, bs)
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_p)):
        assert rel_err(a, b) < REL_TOL


def test_chunked_stack_is_the_default_on_cpu_only():
    ks, bs = _stack_params(jax.random.PRNGKey(0), (4,), (3,), 3)
    x = jnp.zeros((2, 9, 9, 3))
    jaxpr = str(jax.make_jaxpr(lambda: fconv.conv_stack(ks, bs, x, (1,)))())
    assert ("custom_vjp_call" in jaxpr) == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        fconv.conv_stack(ks, bs, x, (1,), impl="fast")
