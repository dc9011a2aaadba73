"""End-to-end SAC training loop: seconds-long smoke runs (default suite) and the learning runs
behind `make test-slow` (the same commands as the committed results/)."""
import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from agents import sac, sac_train


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_state_sac_smoke_run_logs_evaluates_and_saves(tmp_path):
    cfg = sac_train.TrainConfig(
        task="cartpole_swingup", pixels=False, seeds=(3,), env_steps=8 * 60, init_steps=20,
        eval_every=30, eval_episodes=2, batch_size=32, replay_capacity=500, max_episode_steps=160,
        sac=sac.SACConfig(encoder="state_full", hidden_dim=32, augmentation="none"),
        out_dir=str(tmp_path), tensorboard=True)
    result = sac_train.train(cfg, log=None)
    assert result["agent_steps"] == 60 and result["updates"] == 60 - 20 + 1
    rows = _read_csv(tmp_path / "seed_3" / "eval.csv")
    assert [int(r["step"]) for r in rows] == [240, 480]            # env steps = agent steps x 8
    assert all(np.isfinite(float(r["return_mean"])) for r in rows)
    assert os.path.exists(tmp_path / "seed_3" / "params_final.msgpack")
    assert os.listdir(tmp_path / "seed_3" / "tb")
    # the saved parameters load back into an agent of the same configuration
    agent = jax.tree.map(lambda x: x[0], result["carry"].agent)
    restored = sac_train.load_params(str(tmp_path / "seed_3" / "params_final.msgpack"), agent)
    for a, b in zip(jax.tree.leaves(restored.actor.params), jax.tree.leaves(agent.actor.params)):
        np.testing.assert_array_equal(a, b)


def test_pixel_flare_smoke_run(tmp_path):
    cfg = sac_train.TrainConfig(
        task="cartpole_swingup", pixels=True, seeds=(0,), env_steps=8 * 16, init_steps=8,
        eval_every=100, eval_episodes=1, batch_size=4, replay_capacity=64, max_episode_steps=48,
        sac=sac.SACConfig(encoder="flare", hidden_dim=32), out_dir=str(tmp_path),
        tensorboard=False)
    result = sac_train.train(cfg, log=None)
    assert result["updates"] == 16 - 8 + 1
    carry = result["carry"]
    assert carry.stack.shape == (1, 1, 3, 100, 100, 3)            # stored 100px centre crops
    assert int(carry.replay.count[0]) == 17                       # reset frame + 16 steps
    rows = _read_csv(tmp_path / "seed_0" / "eval.csv")
    assert len(rows) == 1 and np.isfinite(float(rows[0]["return_mean"]))
    assert os.path.exists(tmp_path / "seed_0" / "params_final.msgpack")


def test_train_config_validation():
    with pytest.raises(ValueError, match="unknown DMC task"):
        sac_train.TrainConfig(task="cartpole_swingdown")
    with pytest.raises(ValueError, match="env_steps must be >= 1"):
        sac_train.TrainConfig(env_steps=0)
    cfg = sac_train.TrainConfig(task="cartpole_swingup", pixels=True,
                                sac=sac.SACConfig(encoder="state_full"))
    with pytest.raises(ValueError, match="takes full observations but pixels=True"):
        sac_train.make_env(cfg, 1)


def test_launcher_rejects_bad_flags():
    run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.train_sac", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300,
                                    env=dict(os.environ, FLARE_JAX_TCMALLOC="0"))
    out = run("--task=walker_runn", "--preset=state")
    assert out.returncode != 0 and "valid tasks" in out.stderr
    out = run("--encoder=flair", "--preset=state", "--task=walker_run")
    assert out.returncode != 0 and "valid encoders" in out.stderr
    out = run("--preset=flare_paper", "--task=cartpole_swingup")
    assert out.returncode != 0 and "walker_run" in out.stderr


# ------------------------------------------------------------------ learning runs (slow)

def _launch(args, out_dir):
    cmd = [sys.executable, "-m", "experiments.train_sac", *args, f"--out_dir={out_dir}"]
    subprocess.run(cmd, check=True, timeout=6 * 3600)


@pytest.mark.slow
def test_full_state_sac_solves_cartpole_swingup(tmp_path):
    """results/sac_state_cartpole: mean eval return >= 750 within 100k env steps, 3 seeds."""
    _launch(["--preset=state", "--task=cartpole_swingup", "--encoder=state_full", "--pixels=false",
             "--seeds=0,1,2", "--env_steps=100000"], tmp_path)
    finals = []
    for seed in (0, 1, 2):
        rows = _read_csv(tmp_path / f"seed_{seed}" / "eval.csv")
        finals.append(max(float(r["return_mean"]) for r in rows))
    assert np.mean(finals) >= 750, finals


@pytest.mark.slow
def test_pixel_flare_runs_end_to_end(tmp_path):
    """results/sac_pixel_flare_cartpole: >= 5k env steps from pixels, evaluation, logs, params."""
    _launch(["--preset=flare", "--task=cartpole_swingup", "--env_steps=5600", "--init_steps=250",
             "--eval_every=350"], tmp_path)
    rows = _read_csv(tmp_path / "seed_0" / "eval.csv")
    assert int(rows[-1]["step"]) >= 5000
    assert os.path.exists(tmp_path / "seed_0" / "params_final.msgpack")
