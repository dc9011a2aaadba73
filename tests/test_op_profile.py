"""experiments.op_profile: HLO instructions are classed by what they compute, and a traced
profile attributes the calls' wall time to those classes."""
import jax
import jax.numpy as jnp
import pytest

from experiments import op_profile


def _program(x, w, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.maximum(y.reshape(y.shape[0], -1) @ w, 0.0)
    return jnp.sum(h, axis=1), jnp.transpose(x, (0, 3, 1, 2))


def _args():
    key = jax.random.PRNGKey(0)
    return (jax.random.normal(key, (8, 16, 16, 4)), jax.random.normal(key, (16 * 16 * 8, 64)),
            jax.random.normal(key, (3, 3, 4, 8)))


def test_instructions_are_classed_by_what_they_compute():
    fn = jax.jit(_program)
    comps, instrs = op_profile.parse_hlo(fn.lower(*_args()).compile().as_text())
    classes = {op_profile.op_class(n, comps, instrs) for n in instrs
               if instrs[n].opcode not in ("parameter", "constant", "tuple", "get-tuple-element",
                                           "bitcast")}
    assert {"convolution", "dot", "reduction", "layout"} <= classes, classes
    # the conv's instruction is a convolution whatever the backend wraps it in
    conv = [n for n in instrs if instrs[n].opcode == "convolution"]
    assert conv and all(op_profile.op_class(n, comps, instrs) == "convolution" for n in conv)
    # sizes: the dot's result is [8, 64] float32
    dots = [n for n in instrs if op_profile.op_class(n, comps, instrs) == "dot"
            and instrs[n].nbytes == 8 * 64 * 4]
    assert dots


def test_a_profile_attributes_the_wall_time_to_classes():
    n = 768
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n))
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n))
    fn = jax.jit(lambda a, b: jnp.tanh(a @ b))
    prof = op_profile.profile_jitted(fn, a, b, calls=5)
    assert prof.wall_ms > 0
    assert sum(prof.classes.values()) == pytest.approx(prof.wall_ms, rel=1e-6)
    traced = {k: v for k, v in prof.classes.items() if k != "untraced"}
    assert max(traced, key=traced.get) == "dot", prof.table()
    # the dot reads two n x n float32 matrices and writes one: 3 * n^2 * 4 bytes per call
    assert prof.moved_mb["dot"] == pytest.approx(3 * n * n * 4 / 1e6, rel=1e-6)
    assert prof.top[0][2] == "dot"
    assert "dot" in prof.table()
