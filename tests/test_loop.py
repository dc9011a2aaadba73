"""The run loop of both agents: whole-state checkpoints that restore bit for bit and continue
identically, resume after kill -9 (during a checkpoint write included), damaged checkpoints,
config mismatches, the divergence guard and a replay-less resume.

The launcher-level refusals of bad input are in tests/test_bad_input.py."""
import csv
import dataclasses
import glob
import os
import signal
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import agents
from agents import rainbow, rainbow_train, sac, sac_train
from flare_jax import checkpoint as ck
from flare_jax import config_flags, loop
from flare_jax.loop import EnvSpec

STATE = EnvSpec((5,), "float32", (1,), "float32")
CASES = {
    "sac_state": (sac_train.SACTrainer, sac_train.TrainConfig(
        task="cartpole_swingup", pixels=False, batch_size=8, replay_capacity=64,
        sac=sac.SACConfig(encoder="state_flare", hidden_dim=16, augmentation="none")), STATE),
    "sac_pixels": (sac_train.SACTrainer, sac_train.TrainConfig(
        task="cartpole_swingup", pixels=True, batch_size=4, replay_capacity=24,
        sac=sac.SACConfig(encoder="flare", hidden_dim=16, feature_dim=8)),
        EnvSpec((108, 108, 3), "uint8", (1,), "float32")),
    "rainbow_cartpole": (rainbow_train.RainbowTrainer, rainbow_train.RainbowTrainConfig(
        game="CartPole-v1", num_envs=2, batch_size=8, replay_capacity=64, min_replay=8,
        rainbow=rainbow.RainbowConfig(torso="mlp", head_hidden=16)),
        EnvSpec((4,), "float32", (), "int32", 2)),
    "rainbow_atari": (rainbow_train.RainbowTrainer, rainbow_train.RainbowTrainConfig(
        game="pong", num_envs=1, batch_size=4, replay_capacity=32, min_replay=8,
        rainbow=rainbow.RainbowConfig(torso="atari_flare", head_hidden=16)),
        EnvSpec((84, 84), "uint8", (), "int32", 6)),
}


def _drive(stepper, carry, spec, steps, start, n):
    """`steps` device steps on random env output (episode starts at step 0 and 5)."""
    rng = np.random.default_rng(start)
    s, e = stepper.num_seeds, stepper.trainer.schedule.agent_steps_per_iteration
    for i in range(start, start + steps):
        shape = (s * e,) + spec.frame_shape
        frame = (rng.integers(0, 256, shape) if spec.frame_dtype == "uint8"
                 else rng.normal(size=shape)).astype(spec.frame_dtype)
        first = np.full((s * e,), i in (0, 5))
        carry, _, flags = stepper.step(carry, frame, rng.normal(size=(s * e,)).astype(np.float32),
                                       np.ones((s * e,), np.float32), first, n=n if i >= 3 else 0,
                                       random=False, update_count=i, progress=i / 100)
        assert bool(np.asarray(flags)[0])
    return carry


def _assert_bitwise_equal(a, b):
    """Same leaves (paths, dtypes, shapes, bytes); static fields (optimiser closures) aside."""
    pa, pb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [jax.tree_util.keystr(k) for k, _ in pa] == [jax.tree_util.keystr(k) for k, _ in pb]
    for (_, x), (_, y) in zip(pa, pb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# The default suite keeps one SAC and one Rainbow (PER) case; the others run with `make test-slow`.
_DEFAULT_CHECKPOINT_CASES = {("sac_state", (0,)), ("sac_state", (0, 1, 2)), ("rainbow_cartpole", (0, 1, 2))}


@pytest.mark.parametrize("case,seeds", [
    pytest.param(c, s, id=f"{c}-{len(s)}seeds",
                 marks=() if (c, s) in _DEFAULT_CHECKPOINT_CASES else pytest.mark.slow)
    for c in sorted(CASES) for s in [(0,), (0, 1, 2)]])
def test_checkpoint_restores_bit_for_bit_and_the_next_updates_are_identical(case, seeds, tmp_path):
    cls, cfg, spec = CASES[case]
    trainer = cls(config_flags.replace(cfg, seeds=seeds), spec)
    stepper = loop.Stepper(trainer, num_seeds=len(seeds))
    keys = loop.seed_keys(seeds)
    carry = _drive(stepper, loop.init_carry(trainer, keys), spec, steps=7, start=0, n=1)
    counters = loop.Counters(iteration=7, updates=4, owed=0.25, last_eval=5, resumes=1)
    # leaves above 4 KiB (frames, PER trees) are written and read in slabs
    checkpointer = ck.Checkpointer(str(tmp_path), chunk_bytes=4096)
    checkpointer.save(7, loop.checkpoint_tree(carry, True), {"counters": dataclasses.asdict(counters)})
    written = jax.device_get(loop.checkpoint_tree(carry, True))
    template = loop.checkpoint_tree(loop.carry_template(trainer, keys), True)
    step, restored, meta = checkpointer.restore(template)
    assert step == 7 and loop.Counters(**meta["counters"]) == counters
    _assert_bitwise_equal(restored, written)     # agent, replay (+ PER), stacks, actions, keys
    # the next K=3 steps with updates (sampling from the restored replay, restored keys)
    original = jax.device_get(_drive(stepper, carry, spec, steps=3, start=7, n=1))
    again = loop.Carry(agent=restored["agent"], replay=restored["replay"], stack=restored["stack"],
                       action=restored["action"], key=restored["key"])
    again = jax.device_get(_drive(stepper, again, spec, steps=3, start=7, n=1))
    _assert_bitwise_equal(again, original)
    assert int(np.asarray(original.agent.updates).reshape(-1)[0]) >= 4 + 3


@pytest.mark.parametrize("case", ["sac_state", "rainbow_atari"])
def test_a_step_with_updates_updates_the_donated_replay_in_place(case):
    """The compiled device step (store, add, sample + update, act) holds no copy of the replay's
    frame buffer: the add writes into the donated buffer and the updates read it there. (Squeezing
    the per-device data axis around the replay made XLA copy the frames 5 times per step: ~0.9 s
    per Rainbow step at 100k frames, 0.6 s per pixel SAC step at 20k; seen with one seed.)"""
    import re
    cls, cfg, spec = CASES[case]
    trainer = cls(config_flags.replace(cfg, seeds=(0,)), spec)
    stepper = loop.Stepper(trainer, num_seeds=1)
    carry = loop.init_carry(trainer, loop.seed_keys((0,)))
    lay, e = stepper.layout, trainer.schedule.agent_steps_per_iteration
    frames = max(jax.tree_util.tree_leaves(carry.replay), key=lambda x: x.size)
    env = [np.zeros((e,) + spec.frame_shape, spec.frame_dtype), np.zeros(e, np.float32),
           np.ones(e, np.float32), np.zeros(e, bool)]
    hlo = stepper._compile(1, False).lower(
        carry, *map(lay.put_envs, env), lay.put_per_device(np.zeros(len(lay.blocks), np.int32)),
        np.int32(0), np.float32(0)).compile().as_text()
    size = frames.size
    copies = [l.strip() for l in hlo.splitlines() if re.search(r" copy(-start)?\(", l)
              and (m := re.search(r"= \w+\[([\d,]+)\]", l))
              and np.prod([int(d) for d in m.group(1).split(",")]) == size]
    assert copies == [], copies[:3]
    assert "input_output_alias" in hlo


def test_squeezed_is_the_vmap_of_a_size_one_axis():
    def fn(tree, x, y):
        return {"a": tree["w"] @ x + y, "b": tree["c"] * 2.0}, jnp.sum(x)
    tree = {"w": jnp.arange(6.0).reshape(1, 2, 3), "c": jnp.ones((4,))}
    x, y = jnp.arange(3.0).reshape(1, 3), jnp.float32(0.5)
    in_axes = ({"w": 0, "c": None}, 0, None)
    got = loop._squeezed(fn, in_axes=in_axes)(tree, x, y)
    want = jax.vmap(fn, in_axes=in_axes)(tree, x, y)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, w)


# rainbow (PER priorities written in the learn segment) in the default suite: test_rainbow_train's
# single-seed runs equal to the vmapped seeds' runs
@pytest.mark.parametrize("case", ["sac_state", pytest.param("rainbow_cartpole", marks=pytest.mark.slow)])
def test_one_seed_per_device_learns_unbatched_what_the_seed_vmap_learns(case, monkeypatch):
    """With one seed per device the learn segment runs with the size-1 axes reshaped away
    (`loop._squeezed`); the same steps with it vmapped instead leave the same state (float
    tolerance: unbatched and batched kernels may sum in another order), actions included."""
    cls, cfg, spec = CASES[case]
    trainer = cls(config_flags.replace(cfg, seeds=(0,)), spec)
    keys = loop.seed_keys((0,))
    squeezed = loop.Stepper(trainer, num_seeds=1)
    a = _drive(squeezed, loop.init_carry(trainer, keys), spec, 10, 0, 2)
    monkeypatch.setattr(loop, "_squeezed", jax.vmap)
    vmapped = loop.Stepper(trainer, num_seeds=1)
    b = _drive(vmapped, loop.init_carry(trainer, keys), spec, 10, 0, 2)
    assert int(np.asarray(a.agent.updates).reshape(-1)[0]) == int(np.asarray(b.agent.updates).reshape(-1)[0]) > 0
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["sac_state", pytest.param("rainbow_cartpole", marks=pytest.mark.slow)])
def test_overlapped_steps_act_before_the_updates_with_the_plain_steps_keys(case):
    """Stepper(overlap=True) runs act and learn as two programs: without updates, or with random
    actions, it computes exactly the plain step; with updates, its actions at step t are the
    plain step's actions from the agent before step t's updates (one step of policy lag), and
    its learn program leaves the agent the plain step leaves."""
    cls, cfg, spec = CASES[case]
    trainer = cls(config_flags.replace(cfg, seeds=(0, 1)), spec)
    plain, over = loop.Stepper(trainer, num_seeds=2), loop.Stepper(trainer, num_seeds=2, overlap=True)
    keys = loop.seed_keys((0, 1))
    rng = np.random.default_rng(0)
    e = 2 * trainer.schedule.agent_steps_per_iteration

    def env_out(i):
        shape = (e,) + spec.frame_shape
        return (rng.normal(size=shape).astype(spec.frame_dtype), rng.normal(size=(e,)).astype(np.float32),
                np.ones((e,), np.float32), np.full((e,), i in (0, 5)))

    def step(stepper, carry, out, i, n, random):
        return stepper.step(carry, *out, n=n, random=random, update_count=i, progress=i / 100)

    a, b = loop.init_carry(trainer, keys), loop.init_carry(trainer, keys)
    for i in range(12):                    # random actions, updates from step 3: identical
        out = env_out(i)
        a, _, fa = step(plain, a, out, i, int(i >= 3), True)
        b, _, fb = step(over, b, out, i, int(i >= 3), True)
        assert np.asarray(over.settled(fb)).tolist() == np.asarray(fa).tolist() == [1, 0]
    _assert_bitwise_equal(jax.device_get(b), jax.device_get(a))
    for i in range(12, 15):                # explore without updates: identical
        out = env_out(i)
        a, _, _ = step(plain, a, out, i, 0, False)
        b, _, _ = step(over, b, out, i, 0, False)
    _assert_bitwise_equal(jax.device_get(b), jax.device_get(a))
    for i in range(15, 19):                # explore with updates: act first, then learn
        out = env_out(i)
        before = jax.device_get(a)
        b, _, fb = step(over, b, out, i, 1, False)
        acted, _, _ = step(plain, jax.device_put(before), out, i, 0, False)
        np.testing.assert_array_equal(np.asarray(b.action), np.asarray(acted.action))
        a, _, _ = step(plain, jax.device_put(before), out, i, 1, False)   # learns, then acts
        _assert_bitwise_equal(jax.device_get(b.agent), jax.device_get(a.agent))
        _assert_bitwise_equal(jax.device_get(b.replay), jax.device_get(a.replay))
        np.testing.assert_array_equal(np.asarray(b.key), np.asarray(a.key))
        a = b = jax.device_put(jax.device_get(b))       # continue from the overlapped state
        assert int(np.asarray(over.settled(fb))[0]) == 1


# ------------------------------------------------------------------ kill -9 and resume (launcher)

_ARGS = ["--preset=state", "--task=cartpole_swingup", "--env_steps=640", "--init_steps=20",
         "--eval_every=10", "--eval_episodes=1", "--batch_size=32", "--replay_capacity=500",
         "--hidden_dim=32", "--max_episode_steps=160", "--log_every=10", "--stall_seconds=300"]
_EVAL_STEPS = [80 * k for k in range(1, 9)]      # env steps: every 10 agent steps x 8


def _env(**extra):
    return dict(os.environ, FLARE_JAX_TCMALLOC="0", PYTHONUNBUFFERED="1", **extra)


def _launch(out_dir, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "experiments.train_sac", *_ARGS,
                             f"--out_dir={out_dir}", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or _env())


def _run_until(proc, marker: str, then=signal.SIGKILL) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(then)
            break
    rest, _ = proc.communicate(timeout=300)
    return "".join(seen) + rest


def _steps(path):
    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _tensorboard_steps(tb_dir, tag):
    """The steps of `tag` as TensorBoard shows them: events in file order, each file's purge
    event (SessionLog START at step p) dropping the earlier events with step >= p."""
    from tensorboardX.proto import event_pb2
    kept = []
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                kept = [s for s in kept if s < event.step]
            for v in event.summary.value:
                if v.tag == tag:
                    kept.append(event.step)
    return kept


def test_killed_runs_resume_from_their_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    # 1. kill -9 while starting (before any checkpoint): the next start begins at step 0
    log1 = _run_until(_launch(out), "[sac] replay")
    # 2. SIGTERM after some evaluations: a checkpoint, exit 143, no "final" line
    proc = _launch(out)
    log2 = _run_until(proc, "checkpoint at agent step 20", then=signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, log2[-3000:]
    assert "[sac] replay" in log1 and "resuming from" not in log2     # 1 left no checkpoint
    assert "interrupted at agent step" in log2 and "final evaluation" not in log2
    # 3. kill -9 mid-run, just after a checkpoint was written
    log3 = _run_until(_launch(out), "checkpoint at agent step 40")
    assert "resuming from" in log3
    # 4. kill -9 inside the second checkpoint write of this process (after its first slab)
    proc = _launch(out, env=_env(**{ck.KILL_DURING_SAVE_ENV: "2"}))
    log4, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, log4[-3000:]
    assert glob.glob(str(out / "checkpoints" / "*.orbax-checkpoint-tmp*")), "no unfinished write"
    # 5. the same command again: resumes from the last complete checkpoint and finishes
    proc = _launch(out)
    log5, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log5[-3000:]
    assert "resuming from" in log5 and "final evaluation at 640 env steps" in log5
    assert _steps(out / "seed_0" / "eval.csv") == _EVAL_STEPS            # each once, in order
    assert _tensorboard_steps(str(out / "seed_0" / "tb"), "eval/return_mean") == _EVAL_STEPS
    train = _steps(out / "seed_0" / "train.csv")
    assert train == sorted(set(train)) and train[-1] == 640
    assert not glob.glob(str(out / "checkpoints" / "*tmp*"))
    status = loop.run_status(str(out))
    assert status["finished"] and status["iteration"] == 80 and status["resumes"] >= 3

    # a damaged newest checkpoint: a longer run falls back to the previous one, with a warning
    newest = max(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
    with open(out / "checkpoints" / str(newest) / "arrays" / "arrays.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe\xfd")
    proc = _launch(out, "--env_steps=720")
    log6, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log6[-3000:]
    assert f"checkpoint {out / 'checkpoints' / str(newest)} is unreadable" in log6
    assert f"resuming from {out / 'checkpoints' / str(newest - 10)}" in log6
    assert _steps(out / "seed_0" / "eval.csv") == _EVAL_STEPS + [720]

    # another config on the same out_dir is refused, naming the field
    proc = _launch(out, "--encoder=state_position", "--env_steps=720")
    log7, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in log7
    assert "encoder: 'state_full' (checkpoint) vs 'state_position' (command)" in log7


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(overlap, tmp_path):
    """With --overlap the non-finite losses of step t's learn program are seen one step later,
    still before step t+1's actions reach the envs and before any checkpoint."""
    out = tmp_path / "run"
    proc = _launch(out, "--critic_lr=1e30", "--actor_lr=1e30", "--checkpoint_every=10",
                   f"--overlap={overlap}")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == loop.EXIT_DIVERGED, log[-3000:]
    assert "Traceback" not in log and "action contains NaN" not in log
    line = [l for l in log.splitlines() if "diverged at agent step" in l]
    assert len(line) == 1 and "for seed 0" in line[0] and "last good checkpoint" in line[0]
    # every checkpoint on disk holds finite parameters, and the newest loads
    config, state = agents.load_run(str(out), seed=0)
    assert config.sac.critic_lr == 1e30
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.agent))


def test_a_resume_without_the_replay_refills_it_first(tmp_path):
    from tests.test_sac_train import state_config
    half = config_flags.replace(state_config(str(tmp_path)), env_steps=8 * 30, checkpoint_replay=False)
    first = sac_train.train(half, log=None)
    assert first.counters.updates == 30 - 20 + 1
    lines = []
    second = sac_train.train(config_flags.replace(half, env_steps=8 * 60), log=lines.append)
    assert any("holds no replay" in l for l in lines)
    # learning waits for init_steps new transitions after the resume: iterations 50..60
    assert second.status == "finished" and second.counters.updates == 11 + 11
    assert _steps(tmp_path / "seed_3" / "eval.csv") == [240, 480]


def test_a_run_written_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    """config.json of an older version lacks newer fields: they count as their defaults."""
    import json
    from agents import sac_train
    from flare_jax import config_flags, loop
    config = sac_train.TrainConfig()
    record = {"agent": "sac", "config": config_flags.to_dict(config)}
    del record["config"]["sac"]["compute_dtype"]
    record["config"]["run"].pop("video_every")
    (tmp_path / "config.json").write_text(json.dumps(record))
    loop.check_resume(str(tmp_path), "sac", config, sac_train.SACTrainer.resumable)
    other = config_flags.replace(config, compute_dtype="bfloat16")
    with pytest.raises(loop.RunError, match="compute_dtype"):
        loop.check_resume(str(tmp_path), "sac", other, sac_train.SACTrainer.resumable)
