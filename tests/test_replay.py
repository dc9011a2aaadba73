"""Replay: stacks rebuilt at sample time equal a naive per-episode reference, at and across
episode boundaries, after wrap-around, with several envs and n-step returns."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.data import replay as rp


def _stream(num_envs, steps, seed, p_end=0.15, p_life=0.0):
    """Per env: records (frame_id, first, action, reward, discount) in time order."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(num_envs):
        recs = []
        for t in range(steps):
            first = t == 0 or (recs[-1]["last"])
            last = (not first) and rng.random() < p_end
            recs.append(dict(frame=np.array([e, t]), first=first, last=last,
                             action=np.float32(rng.normal()), reward=np.float32(rng.normal()),
                             discount=np.float32(0.0 if rng.random() < p_life else 1.0)))
        out.append(recs)
    return out


def _fill(config, stream):
    buf = rp.Replay(config)
    state = buf.init()
    steps = len(stream[0])
    for t in range(steps):
        recs = [s[t] for s in stream]
        state = buf.add(state,
                        jnp.asarray(np.stack([r["frame"] for r in recs]), jnp.int32),
                        jnp.asarray(np.array([[r["action"]] for r in recs]), jnp.float32),
                        jnp.asarray([r["reward"] for r in recs]),
                        jnp.asarray([r["discount"] for r in recs]),
                        jnp.asarray([r["first"] for r in recs]))
    return state


def _naive(config, recs, t):
    """Reference transition arriving at record t, or None if it must not be sampled."""
    total, s, n, T = len(recs), config.slots, config.n_step, config.stack
    if recs[t]["first"] or t < total - s or t + n - 1 > total - 1:
        return None
    if total > s and t - T < total - s:
        return None
    start = max(i for i in range(t + 1) if recs[i]["first"])          # episode start
    def stack(end):
        ids = []
        for i in range(end - T + 1, end + 1):
            if i < start:
                ids.append(None if config.pad == "zeros" else recs[start]["frame"])
            else:
                ids.append(recs[i]["frame"])
        return [np.zeros(2) if f is None else f for f in ids]
    ret, disc, end = 0.0, 1.0, t
    for i in range(n):
        k = t + i
        if i > 0 and recs[k]["first"]:
            break
        ret += disc * recs[k]["reward"]
        disc *= config.discount * recs[k]["discount"]
        end = k
    return dict(obs=stack(t - 1), next_obs=stack(end), action=recs[t]["action"], reward=ret,
                discount=disc)


@pytest.mark.parametrize("num_envs,capacity,steps,stack,pad,n_step", [
    (1, 200, 60, 3, "repeat_first", 1),      # not yet full
    (1, 20, 75, 3, "repeat_first", 1),       # wrapped several times
    (3, 30, 53, 4, "zeros", 1),              # several envs, zero padding
    (2, 24, 70, 4, "zeros", 3),              # n-step across episode ends and life losses
    (2, 40, 33, 1, "repeat_first", 5),       # single frames, long n-step
])
def test_every_valid_transition_matches_naive_reference(num_envs, capacity, steps, stack, pad, n_step):
    cfg = rp.ReplayConfig(capacity=capacity, frame_shape=(2,), action_shape=(1,), num_envs=num_envs,
                          stack=stack, frame_dtype=jnp.int32, pad=pad, n_step=n_step, discount=0.9)
    stream = _stream(num_envs, steps, seed=capacity + steps, p_life=0.2 if n_step > 1 else 0.0)
    state = _fill(cfg, stream)
    valid = np.asarray(rp.valid_mask(cfg, state))
    s = cfg.slots
    checked = 0
    for e in range(num_envs):
        recs = stream[e]
        for t in range(max(0, steps - s), steps):
            slot = t % s
            ref = _naive(cfg, recs, t)
            assert valid[e, slot] == (ref is not None), (e, t)
            if ref is None:
                continue
            b = rp.gather(cfg, state, jnp.array([e]), jnp.array([slot]))
            np.testing.assert_array_equal(np.asarray(b.obs[0]), np.stack(ref["obs"]))
            np.testing.assert_array_equal(np.asarray(b.next_obs[0]), np.stack(ref["next_obs"]))
            np.testing.assert_allclose(float(b.action[0, 0]), ref["action"])
            np.testing.assert_allclose(float(b.reward[0]), ref["reward"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(b.discount[0]), ref["discount"], rtol=1e-6)
            checked += 1
    assert checked > 10


def test_stack_at_episode_start_repeats_first_frame():
    cfg = rp.ReplayConfig(capacity=50, frame_shape=(2,), action_shape=(1,), stack=3,
                          frame_dtype=jnp.int32)
    stream = _stream(1, 10, seed=0, p_end=0.0)
    stream[0][5]["first"] = True          # a new episode starts at record 5
    state = _fill(cfg, stream)
    b = rp.gather(cfg, state, jnp.array([0, 0]), jnp.array([6, 7]))
    # obs of the transition arriving at 6 ends at frame 5 (first of its episode): [5, 5, 5]
    assert np.asarray(b.obs[0, :, 1]).tolist() == [5, 5, 5]
    assert np.asarray(b.next_obs[0, :, 1]).tolist() == [5, 5, 6]
    assert np.asarray(b.obs[1, :, 1]).tolist() == [5, 5, 6]
    assert not bool(rp.valid_mask(cfg, state)[0, 5])   # no transition arrives at a first frame


def test_uniform_sampling_covers_only_valid_slots_uniformly():
    cfg = rp.ReplayConfig(capacity=64, frame_shape=(2,), action_shape=(1,), num_envs=2, stack=2,
                          frame_dtype=jnp.int32)
    state = _fill(cfg, _stream(2, 50, seed=3))
    valid = np.asarray(rp.valid_mask(cfg, state)).reshape(-1)
    draws = []
    sample = jax.jit(lambda k: rp.sample(cfg, state, k, 4096))
    for i in range(10):
        b = sample(jax.random.PRNGKey(i))
        draws.append(np.asarray(b.env) * cfg.slots + np.asarray(b.slot))
    counts = np.bincount(np.concatenate(draws), minlength=valid.size)
    assert counts[~valid].sum() == 0
    expected = 40960 / valid.sum()
    # chi-square over the valid slots, fixed seeds: p > 0.001 threshold for this df
    chi2 = ((counts[valid] - expected) ** 2 / expected).sum()
    df = valid.sum() - 1
    assert chi2 < df + 4 * np.sqrt(2 * df), (chi2, df)


def test_sample_proportional_never_draws_zero_weights():
    n = 1_000_003
    w = np.zeros(n, np.float32)
    hot = np.array([0, 17, 1023, 1024, 500_000, n - 1])
    w[hot] = [1e-8, 3.0, 1e-30, 2.0, 1e6, 1e-12]
    idx = np.asarray(jax.jit(rp.sample_proportional, static_argnums=2)(
        jax.random.PRNGKey(0), jnp.asarray(w), 100_000))
    assert set(np.unique(idx)) <= set(hot.tolist())
    assert (idx == 500_000).mean() > 0.99


def test_sample_proportional_frequencies():
    w = jnp.array([0.0, 1.0, 2.0, 0.0, 5.0, 2.0])
    idx = np.asarray(rp.sample_proportional(jax.random.PRNGKey(1), w, 200_000))
    freq = np.bincount(idx, minlength=6) / idx.size
    np.testing.assert_allclose(freq, np.asarray(w) / 10.0, atol=0.005)


def test_add_is_jittable_with_donation_and_wraps():
    cfg = rp.ReplayConfig(capacity=5, frame_shape=(3,), action_shape=(2,), stack=1, n_step=1)
    buf = rp.Replay(cfg)
    state = buf.init()
    for t in range(cfg.slots + 3):
        state = buf.add(state, jnp.full((1, 3), t, jnp.uint8), jnp.ones((1, 2)), jnp.ones(1),
                        jnp.ones(1), jnp.array([t == 0]))
    assert int(state.count) == cfg.slots and int(state.cursor) == 3
    assert np.asarray(state.frames[0, :3, 0]).tolist() == [cfg.slots, cfg.slots + 1, cfg.slots + 2]


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="pad must be one of"):
        rp.ReplayConfig(capacity=10, frame_shape=(2,), action_shape=(), pad="edge")
    with pytest.raises(ValueError, match="capacity must be"):
        rp.ReplayConfig(capacity=0, frame_shape=(2,), action_shape=())


def test_memory_check_refuses_a_buffer_that_cannot_fit():
    cfg = rp.ReplayConfig(capacity=10**12, frame_shape=(100, 100, 3), action_shape=(6,))
    with pytest.raises(MemoryError, match="at most"):
        rp.check_fits(cfg)
    small = rp.ReplayConfig(capacity=1000, frame_shape=(100, 100, 3), action_shape=(6,))
    assert "GiB" in rp.check_fits(small)
    # one uint8 100x100x3 frame (+ small per-step fields) per transition
    assert small.nbytes / small.slots == pytest.approx(30_000 + 24 + 9)


def test_add_rejects_wrong_shapes():
    cfg = rp.ReplayConfig(capacity=10, frame_shape=(3,), action_shape=(2,), num_envs=2)
    state = rp.init(cfg)
    with pytest.raises(AssertionError):
        rp.add(cfg, state, jnp.zeros((2, 4)), jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2),
               jnp.zeros(2, bool))


def test_rejection_sampler_falls_back_to_exact_sampling():
    """With mostly invalid slots (an episode start every 2 slots) and a single try, draws often
    find no valid candidate: the whole batch then comes from the exact sampler. Either way only
    valid transitions are returned, uniformly."""
    cfg = rp.ReplayConfig(capacity=64, frame_shape=(2,), action_shape=(1,), stack=2,
                          frame_dtype=jnp.int32)
    stream = _stream(1, 60, seed=4, p_end=0.0)
    for t in range(0, 60, 2):
        stream[0][t]["first"] = True
    state = _fill(cfg, stream)
    valid = np.asarray(rp.valid_mask(cfg, state)).reshape(-1)
    draw = jax.jit(lambda k: rp.sample_valid_uniform(cfg, state, k, 256, tries=1))
    counts = np.zeros(valid.size)
    for i in range(40):
        env, slot = draw(jax.random.PRNGKey(i))
        np.add.at(counts, np.asarray(env) * cfg.slots + np.asarray(slot), 1)
    assert counts[~valid].sum() == 0
    expected = counts.sum() / valid.sum()
    chi2 = ((counts[valid] - expected) ** 2 / expected).sum()
    df = valid.sum() - 1
    assert chi2 < df + 4 * np.sqrt(2 * df), (chi2, df)


# Under jax.vmap (the run loop vmaps every seed's learn step) the sampler's rare exact pass must
# only run when some member needs it: a lax.cond with a batched predicate would run it always.
_VMAP_CFG = rp.ReplayConfig(capacity=1234, frame_shape=(2,), action_shape=(1,), stack=2,
                            frame_dtype=jnp.int32)          # 1237 slots: a shape easy to spot


def _sampler_states():
    """Four healthy states (one episode start in ~60 written slots: 4 tries always find a valid
    candidate) and a rare one (2 valid slots in 60: every batch needs the exact pass)."""
    healthy = [_fill(_VMAP_CFG, _stream(1, 60, seed=10 + i, p_end=0.01)) for i in range(4)]
    stream = _stream(1, 60, seed=20, p_end=0.0)
    for t in range(60):
        stream[0][t]["first"] = t not in (20, 40)
    rare = _fill(_VMAP_CFG, stream)
    return healthy, rare


def _stack(states):
    return jax.tree.map(lambda *x: jnp.stack(x), *states)


@pytest.fixture
def exact_passes(monkeypatch):
    """A list that gets one entry each time the sampler's exact pass executes."""
    calls = []
    real = rp.sample_uniform

    def counted(key, mask, batch_size):
        jax.debug.callback(lambda: calls.append(1))
        return real(key, mask, batch_size)

    monkeypatch.setattr(rp, "sample_uniform", counted)
    return calls


def _draw():
    """A fresh sampler function (jit caches traces per function: a fresh one sees the patch)."""
    return lambda state, key: rp.sample_valid_uniform(_VMAP_CFG, state, key, 64, tries=4)


@pytest.mark.parametrize("rare_member", [None, 1])
def test_vmapped_sampler_equals_per_state_calls(exact_passes, rare_member):
    healthy, rare = _sampler_states()
    states = [rare if i == rare_member else s for i, s in enumerate(healthy)]
    one = jax.jit(_draw())
    many = jax.jit(jax.vmap(_draw()))
    for i in range(3):
        keys = jax.random.split(jax.random.PRNGKey(i), len(states))
        env, slot = many(_stack(states), keys)
        for m, state in enumerate(states):
            del exact_passes[:]
            env_m, slot_m = one(state, keys[m])
            jax.effects_barrier()
            assert bool(exact_passes) == (m == rare_member), (i, m)   # the case is what it says
            np.testing.assert_array_equal(np.asarray(env[m]), np.asarray(env_m))
            np.testing.assert_array_equal(np.asarray(slot[m]), np.asarray(slot_m))
            assert env.dtype == env_m.dtype == slot.dtype == slot_m.dtype == jnp.int32
            assert np.asarray(rp.valid_mask(_VMAP_CFG, state))[0, np.asarray(slot_m)].all()


def test_vmapped_sampler_runs_the_exact_pass_only_when_a_member_needs_it(exact_passes):
    healthy, rare = _sampler_states()
    many = jax.jit(jax.vmap(_draw()))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    jax.block_until_ready(many(_stack(healthy), keys))
    jax.effects_barrier()
    assert not exact_passes
    jax.block_until_ready(many(_stack([healthy[0], rare] + healthy[2:]), keys))
    jax.effects_barrier()
    assert exact_passes


def test_vmapped_exact_pass_stays_inside_its_loop():
    """XLA's loop-invariant code motion must not hoist the O(E * S) mask / cumsum out of the
    (usually zero-trip) loop: in the compiled vmapped sampler no instruction outside a loop
    has a [4, E, S]- or [4, E * S]-shaped result (S = 1237 slots), parameters aside."""
    state = jax.eval_shape(lambda: _stack([rp.init(_VMAP_CFG)] * 4))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    hlo = jax.jit(jax.vmap(_draw())).lower(state, keys).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    big = [line for line in entry.splitlines()[1:]
           if re.search(r"= \w+\[4,(1,)?1237\]", line) and "parameter(" not in line]
    assert "while(" in entry and not big, big
