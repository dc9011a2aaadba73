"""Prioritised replay: trees track validity through wrap-around, sampling follows
(1 - eps) p^alpha / sum + eps / N, importance weights, zero priorities, max-priority insertion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.data import prioritized as per
from flare_jax.data import replay as rp


def _config(capacity=40, num_envs=2, stack=4, n_step=3, uniform_mix=1e-3):
    rc = rp.ReplayConfig(capacity=capacity, frame_shape=(2,), action_shape=(), num_envs=num_envs,
                         stack=stack, frame_dtype=jnp.int32, action_dtype=jnp.int32, pad="zeros",
                         n_step=n_step)
    return per.PrioritizedConfig(replay=rc, alpha=0.5, uniform_mix=uniform_mix)


def _fill(config, steps, seed=0, state=None):
    rng = np.random.default_rng(seed)
    e = config.replay.num_envs
    state = state or per.init(config)
    add = jax.jit(lambda s, *a: per.add(config, s, *a))
    first = np.ones(e, bool)
    for t in range(steps):
        state = add(state, jnp.asarray(np.stack([np.arange(e), np.full(e, t)], 1), jnp.int32),
                    jnp.asarray(rng.integers(0, 4, e), jnp.int32), jnp.asarray(rng.normal(size=e)),
                    jnp.asarray((rng.random(e) > 0.1).astype(np.float32)), jnp.asarray(first))
        first = rng.random(e) < 0.08
    return state


def test_trees_track_validity_through_wraparound():
    config = _config()
    state = _fill(config, 230)
    valid = np.asarray(rp.valid_mask(config.replay, state.replay)).reshape(-1)
    np.testing.assert_array_equal(np.asarray(state.valid.leaves()), valid.astype(np.float32))
    prio = np.asarray(state.priorities.leaves())
    assert np.all(prio[~valid] == 0) and np.all(prio[valid] > 0)
    assert float(state.valid.total()) == valid.sum()
    # new items enter at the max priority seen so far (1.0 initially)
    np.testing.assert_allclose(prio[valid], 1.0)
    # updated priorities are stored as p^alpha and raise the max for later insertions
    env = jnp.asarray(np.nonzero(valid.reshape(2, -1))[0][:2])
    slot = jnp.asarray(np.nonzero(valid.reshape(2, -1))[1][:2])
    state = per.update_priorities(config, state, env, slot, jnp.array([9.0, 0.25]))
    flat = np.asarray(env) * config.replay.slots + np.asarray(slot)
    np.testing.assert_allclose(np.asarray(state.priorities.leaves())[flat], [3.0, 0.5])
    assert float(state.max_priority) == 9.0
    state = _fill(config, 20, seed=5, state=state)
    prio = np.asarray(state.priorities.leaves())
    assert np.isclose(prio, 3.0).sum() >= 2           # fresh transitions at max ** alpha


def test_sampling_follows_the_mixture_and_weights_are_right():
    config = _config(capacity=60, num_envs=1, stack=1, n_step=1, uniform_mix=0.1)
    state = _fill(config, 50, seed=1)
    valid = np.asarray(state.valid.leaves()) > 0
    idx = np.nonzero(valid)[0]
    raw = np.random.default_rng(2).exponential(size=idx.size).astype(np.float32)
    raw[:3] = 0.0                                      # zero priority: only the uniform part
    state = per.update_priorities(config, state, jnp.zeros(idx.size, jnp.int32),
                                  jnp.asarray(idx % config.replay.slots), jnp.asarray(raw))
    p_alpha = raw ** 0.5
    expect = 0.9 * p_alpha / p_alpha.sum() + 0.1 / idx.size
    sample = jax.jit(lambda k: per.sample(config, state, k, 4096, 0.4))
    counts = np.zeros(valid.size)
    for i in range(25):
        batch, w, prob = sample(jax.random.PRNGKey(i))
        flat = np.asarray(batch.env) * config.replay.slots + np.asarray(batch.slot)
        np.add.at(counts, flat, 1)
        np.testing.assert_allclose(np.asarray(prob), expect[np.searchsorted(idx, flat)], rtol=1e-4)
        ref_w = (idx.size * np.asarray(prob)) ** -0.4
        np.testing.assert_allclose(np.asarray(w), ref_w / ref_w.max(), rtol=1e-4)
    assert counts[~valid].sum() == 0
    n = counts.sum()
    chi2 = ((counts[idx] - n * expect) ** 2 / (n * expect)).sum()
    df = idx.size - 1
    assert chi2 < df + 4 * np.sqrt(2 * df), (chi2, df)


def test_zero_priority_items_are_never_drawn_without_the_mixture():
    config = _config(capacity=60, num_envs=1, stack=1, n_step=1, uniform_mix=0.0)
    state = _fill(config, 50, seed=3)
    idx = np.nonzero(np.asarray(state.valid.leaves()) > 0)[0]
    pr = np.where(np.arange(idx.size) % 2 == 0, 0.0, 1e-6).astype(np.float32)
    state = per.update_priorities(config, state, jnp.zeros(idx.size, jnp.int32),
                                  jnp.asarray(idx % config.replay.slots), jnp.asarray(pr))
    batch, _, _ = per.sample(config, state, jax.random.PRNGKey(0), 50_000, 1.0)
    drawn = set(np.asarray(batch.slot).tolist())
    assert drawn <= set((idx[pr > 0] % config.replay.slots).tolist())


def test_beta_schedule_and_config_errors():
    np.testing.assert_allclose(per.beta_schedule(jnp.array([0.0, 0.5, 1.0, 2.0])), [0.4, 0.7, 1.0, 1.0])
    with pytest.raises(ValueError, match="uniform_mix"):
        per.PrioritizedConfig(replay=_config().replay, uniform_mix=2.0)
