"""Sum tree: sums stay exact under many updates, sampling frequencies follow the leaf values,
zero leaves are never drawn."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.data import sum_tree as st


def test_root_is_the_sum_after_random_updates():
    tree = st.init(1000)
    rng = np.random.default_rng(0)
    set_leaves = jax.jit(st.set_leaves)
    for _ in range(200):
        idx = rng.integers(0, 1000, 32)          # duplicates included
        val = rng.exponential(size=32).astype(np.float32)
        tree = set_leaves(tree, jnp.asarray(idx), jnp.asarray(val))
    leaves = np.asarray(tree.leaves(), np.float64)
    np.testing.assert_allclose(float(tree.total()), leaves.sum(), rtol=1e-5)
    # every internal node equals the sum of its children
    nodes = np.asarray(tree.nodes)
    p = tree.capacity
    np.testing.assert_allclose(nodes[1:p], nodes[2:2 * p:2] + nodes[3:2 * p:2], rtol=1e-6)


def test_sampling_frequencies_follow_values_chi_square():
    n = 37
    vals = np.random.default_rng(1).exponential(size=n).astype(np.float32)
    vals[[3, 10, 36]] = 0.0
    tree = st.set_leaves(st.init(n), jnp.arange(n), jnp.asarray(vals))
    idx = np.asarray(jax.jit(st.sample, static_argnums=2)(tree, jax.random.PRNGKey(0), 200_000))
    counts = np.bincount(idx, minlength=n)
    assert counts[[3, 10, 36]].sum() == 0
    expected = vals / vals.sum() * idx.size
    nz = expected > 0
    chi2 = ((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum()
    df = nz.sum() - 1
    assert chi2 < df + 4 * np.sqrt(2 * df), (chi2, df)   # fixed seed; ~p > 1e-4 threshold


def test_zero_leaves_never_drawn_with_extreme_magnitudes():
    n = 1 << 20
    tree = st.init(n)
    idx = jnp.array([0, 1, 5, 777_777, n - 2, n - 1])
    vals = jnp.array([1e-30, 0.0, 3e7, 1e-20, 0.0, 1e-12])
    tree = st.set_leaves(tree, idx, vals)
    draws = np.asarray(jax.jit(st.sample, static_argnums=2)(tree, jax.random.PRNGKey(2), 100_000))
    assert set(np.unique(draws)) <= {0, 5, 777_777, n - 1}
    assert (draws == 5).mean() > 0.999


def test_probability_and_bad_size():
    tree = st.set_leaves(st.init(4), jnp.arange(4), jnp.array([1.0, 3.0, 0.0, 4.0]))
    np.testing.assert_allclose(st.probability(tree, jnp.arange(4)), [0.125, 0.375, 0.0, 0.5])
    with pytest.raises(ValueError, match=">= 1 leaf"):
        st.init(0)
