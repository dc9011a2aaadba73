"""Checks on a mesh of virtual CPU devices, each run in its own process by tests/test_mesh.py:

    JAX_NUM_CPU_DEVICES=4 python -m tests.mesh_cases <case> [args]

(the device count is fixed when JAX starts, and the test suite's own process has started it).
A case raises AssertionError on failure and prints "OK <case>" at the end.
"""
from __future__ import annotations

import hashlib
import sys

from flare_jax.runtime import setup_process

setup_process()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from agents import rainbow, rainbow_train, sac, sac_train  # noqa: E402
from flare_jax import config_flags, loop, mesh as mesh_lib  # noqa: E402
from flare_jax.data import prioritized as per  # noqa: E402
from flare_jax.data import replay as rp  # noqa: E402
from flare_jax.loop import EnvSpec, RunConfig  # noqa: E402

# Tolerance of a data-parallel update against the one-device update on the concatenated batch:
# the same functions of the same numbers except the order of float32 sums (a mean over B is a
# mean of D shard means), ~1e-7 relative per sum. Adam's step g / (sqrt(v) + eps) magnifies that
# for the rare parameter whose gradient is near eps (1e-8): it may move by up to lr either way.
# So: all but 1e-4 of the parameters within 1e-5 (5% of lr), every one within lr per update.
PARAM_ATOL, METRIC_RTOL, RARE = 1e-5, 2e-4, 1e-4


def _data_mesh(d):
    return mesh_lib.make(mesh_lib.MeshShape(seed=1, data=d))


def _on_data(mesh, fn):
    """jit(shard_map(fn)) over the data axis, fn(replicated, batched) -> (a, b): `replicated`
    whole on every shard, `batched` split along its first axis; `a` comes back stacked per shard
    [D, ...] (to check that the shards agree), `b` concatenated."""
    def per_shard(rep, bat):
        a, b = fn(rep, bat)
        return jax.tree.map(lambda x: x[None], a), b
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data")),
                                 out_specs=(P("data"), P("data")), check_vma=False))


def _assert_shards_identical(stacked):
    for x in jax.tree.leaves(stacked):
        x = np.asarray(x)
        for i in range(1, x.shape[0]):
            assert x[i].tobytes() == x[0].tobytes(), "a data shard's copy differs"


def _assert_close(got, want, bound, atol=PARAM_ATOL):
    """Leaves within `atol` except a fraction RARE of elements, and all within `bound`."""
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        err = np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        name = jax.tree_util.keystr(path)
        assert np.mean(err > atol) <= RARE, (name, np.mean(err > atol), err.max())
        assert err.max() <= bound, (name, err.max(), bound)


def _sac_batches(n, b, obs_shape, dtype, a, seed=0):
    rng = np.random.default_rng(seed)
    obs = lambda: (rng.integers(0, 256, (n, b) + obs_shape) if dtype == np.uint8  # noqa: E731
                   else rng.normal(size=(n, b) + obs_shape)).astype(dtype)
    o = obs()
    # next_obs shares T-1 frames with obs, as the replay's 1-step batches do
    nxt = np.concatenate([o[:, :, 1:], obs()[:, :, :1]], axis=2)
    return rp.Batch(obs=o, action=rng.uniform(-1, 1, (n, b, a)).astype(np.float32),
                    reward=rng.normal(size=(n, b)).astype(np.float32),
                    discount=np.full((n, b), 0.99, np.float32), next_obs=nxt,
                    env=np.zeros((n, b), np.int32), slot=np.zeros((n, b), np.int32))


def sac_update():
    """SAC on data:2 and data:4 (pixels with translate, and states) == one device, 3 updates."""
    cases = [
        (sac.SACConfig(encoder="flare", hidden_dim=32, feature_dim=16), (3, 100, 100, 3), np.uint8),
        (sac.SACConfig(encoder="state_flare", hidden_dim=32, augmentation="none"), (4, 5), np.float32),
    ]
    for config, obs_shape, dtype in cases:
        b, n, a = 8, 3, 2
        state = sac.init(jax.random.PRNGKey(0), jax.ShapeDtypeStruct(obs_shape, dtype),
                         jax.ShapeDtypeStruct((a,), jnp.float32), config)
        batches = _sac_batches(n, b, obs_shape, dtype, a)
        keys = jax.random.split(jax.random.PRNGKey(1), n)
        ref, ref_metrics = state, []
        one = jax.jit(lambda s, bt, k, i: sac.update(s, bt, k, count=i))
        for i in range(n):
            ref, m = one(ref, jax.tree.map(lambda x: x[i], batches), keys[i], i)
            ref_metrics.append(m)
        for d in (2, 4):
            def fn(rep, bat):
                return sac.update(rep[0], bat, rep[1], count=rep[2], axis_name="data"), bat.reward
            step = _on_data(_data_mesh(d), fn)
            got = state
            for i in range(n):
                bt = jax.tree.map(lambda x: x[i], batches)
                stacked, _ = step((got, keys[i], jnp.int32(i)), bt)
                _assert_shards_identical(stacked)
                got, metrics = jax.tree.map(lambda x: x[0], stacked)
                for k, v in ref_metrics[i].items():
                    np.testing.assert_allclose(np.asarray(metrics[k]), np.asarray(v), rtol=METRIC_RTOL,
                                               atol=1e-6, err_msg=f"{config.encoder} d={d} {k}")
            bound = n * max(config.critic_lr, config.actor_lr, config.alpha_lr)
            _assert_close(got.critic.params, ref.critic.params, bound)
            _assert_close(got.actor.params, ref.actor.params, bound)
            _assert_close(got.target, ref.target, bound)
            _assert_close(got.alpha.params, ref.alpha.params, bound)
            assert int(got.updates) == n
            moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
                        zip(jax.tree.leaves(got.critic.params), jax.tree.leaves(state.critic.params)))
            assert moved > 10 * PARAM_ATOL, "the updates did not move the parameters"
    print("OK sac_update")


def rainbow_update():
    """Rainbow (MLP torso, PER weights) on data:2 and data:4 == one device, 3 updates."""
    config = rainbow.RainbowConfig(torso="mlp", head_hidden=32, target_update_period=2,
                                   learning_rate=1e-3)
    b, n, num_actions = 8, 3, 3
    state = rainbow.init(jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 4), jnp.float32),
                         num_actions, config)
    rng = np.random.default_rng(0)
    batches = rp.Batch(obs=rng.normal(size=(n, b, 1, 4)).astype(np.float32),
                       action=rng.integers(0, num_actions, (n, b)).astype(np.int32),
                       reward=rng.normal(size=(n, b)).astype(np.float32),
                       discount=np.full((n, b), 0.97, np.float32),
                       next_obs=rng.normal(size=(n, b, 1, 4)).astype(np.float32),
                       env=np.zeros((n, b), np.int32), slot=np.zeros((n, b), np.int32))
    weights = rng.uniform(0.2, 1.0, (n, b)).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    one = jax.jit(rainbow.update)
    ref, ref_out = state, []
    for i in range(n):
        ref, m, pr = one(ref, jax.tree.map(lambda x: x[i], batches), weights[i], keys[i])
        ref_out.append((m, pr))
    for d in (2, 4):
        def fn(rep, bat):
            s, m, pr = rainbow.update(rep[0], bat[0], bat[1], rep[1], axis_name="data")
            return (s, m), pr
        step = _on_data(_data_mesh(d), fn)
        got = state
        for i in range(n):
            stacked, prio = step((got, keys[i]), (jax.tree.map(lambda x: x[i], batches), weights[i]))
            _assert_shards_identical(stacked)
            got, metrics = jax.tree.map(lambda x: x[0], stacked)
            np.testing.assert_allclose(np.asarray(prio), np.asarray(ref_out[i][1]), rtol=METRIC_RTOL,
                                       atol=1e-6)
            for k, v in ref_out[i][0].items():
                np.testing.assert_allclose(np.asarray(metrics[k]), np.asarray(v), rtol=METRIC_RTOL,
                                           atol=1e-6, err_msg=f"d={d} {k}")
        _assert_close(got.params, ref.params, n * config.learning_rate)
        _assert_close(got.target_params, ref.target_params, n * config.learning_rate)
        assert int(got.updates) == n
    print("OK rainbow_update")


def _tiny_sac(seeds, mesh="", out_dir=None, num_envs=2, **kw):
    return sac_train.TrainConfig(
        task="cartpole_swingup", pixels=False, env_steps=8 * 2 * 24, init_steps=20,
        eval_every=24, eval_episodes=2, batch_size=16, replay_capacity=400, max_episode_steps=160,
        num_envs=num_envs,
        sac=sac.SACConfig(encoder="state_full", hidden_dim=32, augmentation="none"),
        run=RunConfig(seeds=seeds, out_dir=out_dir, mesh=mesh, tensorboard=False), **kw)


def seed_axis(agent: str):
    """seed:2 and seed:4 runs (`agent`: SAC states or Rainbow CartPole) == the one-device
    vmapped run.

    Not bit for bit on this CPU: XLA's kernels for the matmuls of 4 vmapped seeds and of 2 (or 1)
    are different programs, and some float32 results differ in their last bits (measured: a few
    ulp on SAC's parameters after 30 updates; the actions, and through the envs the observations,
    by as much). So the runs are compared to a tolerance far below what a wrong seed, key or
    shard would give (those change every value at O(1)).
    """
    rb = rainbow_train.RainbowTrainConfig(
        game="CartPole-v1", frames=2 * 40, num_envs=2, eval_every_frames=40, eval_frames=40,
        eval_envs=2, learn_period_frames=2, batch_size=8, replay_capacity=200, min_replay=16,
        rainbow=rainbow.RainbowConfig(torso="mlp", head_hidden=16),
        run=RunConfig(seeds=(0, 1, 2, 3), tensorboard=False))
    runs = {"rainbow": (rb, rainbow_train.train), "sac": (_tiny_sac((0, 1, 2, 3)), sac_train.train)}
    for name, (cfg, train) in [(agent, runs[agent])]:
        base = train(cfg, log=None)
        assert base.status == "finished" and base.counters.updates > 0
        want = jax.device_get(base.carry)
        for s in (2, 4):
            res = train(config_flags.replace(cfg, mesh=f"seed:{s}"), log=None)
            got = jax.device_get(res.carry)
            assert [e[0] for e in res.evals] == [e[0] for e in base.evals]
            np.testing.assert_allclose([e[1] for e in res.evals], [e[1] for e in base.evals],
                                       rtol=1e-4, atol=1e-4)
            for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
                x, y = np.asarray(x), np.asarray(y)
                if not np.issubdtype(x.dtype, np.floating):       # counters, keys, flags, actions
                    assert x.tobytes() == y.tobytes(), (name, s, jax.tree_util.keystr(path))
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5,
                                           err_msg=f"{name} seed:{s} {jax.tree_util.keystr(path)}")
    print("OK seed_axis")


def replay_shards():
    """Each data shard's replay holds, and samples, only its own envs' transitions."""
    cfg = _tiny_sac((0, 1), mesh="seed:1,data:2", num_envs=4)
    layout = mesh_lib.Layout(mesh_lib.make(mesh_lib.MeshShape(1, 2)), 2, 4)
    trainer = sac_train.SACTrainer(cfg, EnvSpec((5,), "float32", (1,), "float32"), data_shards=2)
    stepper = loop.Stepper(trainer, layout)
    carry = loop.init_carry(trainer, loop.seed_keys((0, 1)), layout)
    members = layout.train_members()            # (seed index, env) of each host env row
    tag = np.array([100 * s + e for s, e in members], np.float32)
    for t in range(40):
        frame = np.repeat(tag[:, None], 5, 1) + t / 1000
        first = np.full(len(tag), t in (0, 17))
        carry, _, flags = stepper.step(carry, frame, np.zeros(len(tag), np.float32),
                                       np.ones(len(tag), np.float32), first, n=0, random=True,
                                       update_count=0, progress=0.0)
    frames = np.asarray(carry.replay.frames)              # [S, D, E/D, slots, 5]
    written = int(np.asarray(carry.replay.count).max())
    for s in range(2):
        for d in range(2):
            own = {100 * s + e for e in range(2 * d, 2 * d + 2)}
            seen = set(np.floor(frames[s, d, :, :written, 0]).astype(int).ravel().tolist())
            assert seen == own, (s, d, seen, own)

    # sampling inside the shard_map, each shard with its own key, from its own replay
    def sample(replay, key):
        replay = jax.tree.map(lambda x: x[0, 0], replay)
        batch = rp.sample(trainer.replay_config, replay, mesh_lib.shard_key(key, "data"), 64)
        return batch.obs[None, None], batch.slot[None, None]
    obs, slots = jax.jit(jax.shard_map(sample, mesh=layout.mesh, in_specs=(P("seed", "data"), P()),
                                       out_specs=P("seed", "data"), check_vma=False))(
        jax.tree.map(lambda x: x[:1], carry.replay), jax.random.PRNGKey(3))
    obs, slots = np.asarray(obs), np.asarray(slots)
    for d in range(2):
        seen = set(np.floor(obs[0, d, ..., 0]).astype(int).ravel().tolist())
        assert seen <= {e for e in range(2 * d, 2 * d + 2)}, (d, seen)
    assert slots[0, 0].tolist() != slots[0, 1].tolist(), "the shards drew the same slots"
    print("OK replay_shards")


def per_shards():
    """Stratified PER over 2 shards: frequencies follow p^alpha, probabilities and weights keep
    the single-device definition (shards with equal totals), weights normalised over shards."""
    d, e, cap = 2, 1, 12
    cfg = per.PrioritizedConfig(replay=rp.ReplayConfig(capacity=cap, frame_shape=(1,), action_shape=(),
                                                       num_envs=e, stack=1, action_dtype=jnp.int32),
                                alpha=0.6, uniform_mix=0.0)
    state = per.init(cfg)
    for t in range(cap):
        state = per.add(cfg, state, jnp.zeros((e, 1)), jnp.zeros((e,), jnp.int32), jnp.zeros(e),
                        jnp.ones(e), jnp.asarray([t == 0]))
    valid = np.flatnonzero(np.asarray(state.valid.leaves()) > 0)
    base = np.linspace(1.0, 4.0, len(valid))
    prios = [base, base[::-1].copy()]            # the same total, different items
    states = []
    for pr in prios:
        states.append(per.update_priorities(cfg, state, jnp.asarray(valid // cfg.replay.slots, jnp.int32),
                                            jnp.asarray(valid % cfg.replay.slots, jnp.int32),
                                            jnp.asarray(pr, jnp.float32)))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
    mesh = _data_mesh(d)
    b, draws = 16, 600

    def sample(st, key):
        st = jax.tree.map(lambda x: x[0], st)
        def one(k):
            batch, w, prob = per.sample(cfg, st, mesh_lib.shard_key(k, "data"), b, jnp.float32(0.5),
                                        axis_name="data")
            return batch.slot, w, prob
        slot, w, prob = jax.vmap(one)(jax.random.split(key, draws))
        return slot[None], w[None], prob[None]
    slot, w, prob = jax.jit(jax.shard_map(sample, mesh=mesh, in_specs=(P("data"), P()),
                                          out_specs=P("data"), check_vma=False))(stacked, jax.random.PRNGKey(0))
    slot, w, prob = np.asarray(slot), np.asarray(w), np.asarray(prob)    # [D, draws, B]
    p_all = np.concatenate([pr ** cfg.alpha for pr in prios])
    expected = p_all / p_all.sum()
    counts = np.concatenate([[np.sum(slot[i] == k) for k in valid % cfg.replay.slots] for i in range(d)])
    total = counts.sum()
    chi2 = float(np.sum((counts - total * expected) ** 2 / (total * expected)))
    dof = len(expected) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof, counts, total * expected)
    # probabilities: the single-device formula p^a / sum over all shards
    for i in range(d):
        for k_idx, k in enumerate(valid % cfg.replay.slots):
            sel = slot[i] == k
            if sel.any():
                np.testing.assert_allclose(prob[i][sel], expected[i * len(valid) + k_idx], rtol=1e-5)
    # weights (N P)^-beta over the global N, normalised by the largest in the whole batch
    n_glob = d * len(valid)
    want = (n_glob * prob) ** -0.5
    want = want / want.max(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(w, want, rtol=1e-5)
    assert np.isclose(w.max(axis=(0, 2)), 1.0).all() and not np.isclose(w[0].max(axis=1), 1.0).all()
    print("OK per_shards")


def _digest(tree) -> str:
    """A hash of this process's first copy of every leaf of `tree`."""
    h = hashlib.sha256()
    for x in jax.tree.leaves(tree):
        h.update(np.asarray(x.addressable_shards[0].data).tobytes())
    return h.hexdigest()[:16]


def multihost(process_id: str, port: str, out_dir: str):
    """One process of a 2-process run (2 CPU devices each, mesh data:4): state SAC."""
    pid = int(process_id)
    cfg = _tiny_sac((0,), mesh="data:4", out_dir=out_dir, num_envs=4)
    cfg = config_flags.replace(cfg, env_steps=8 * 4 * 60, coordinator_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=pid, checkpoint_every=80)
    mesh_lib.init_distributed(cfg.run.coordinator_address, 2, pid)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    res = sac_train.train(cfg)
    assert res.status == "finished" and res.counters.updates > 0
    agent = res.carry.agent
    # every local replica of the agent is identical (they are replicated over data)
    for x in jax.tree.leaves(agent):
        shards = [np.asarray(s.data).tobytes() for s in x.addressable_shards]
        assert all(s == shards[0] for s in shards)
    print("DIGEST", _digest(agent))
    print("EVALS", res.evals)
    print("OK multihost", pid)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
