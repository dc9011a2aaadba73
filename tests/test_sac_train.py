"""SAC through the run loop: seconds-long smoke runs (default suite) and the learning runs behind
`make test-slow` (the same commands as the committed results/)."""
import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import agents
from agents import sac, sac_train
from flare_jax.loop import RunConfig


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def state_config(out_dir=None, seeds=(3,), **run):
    return sac_train.TrainConfig(
        task="cartpole_swingup", pixels=False, env_steps=8 * 60, init_steps=20,
        eval_every=30, eval_episodes=2, batch_size=32, replay_capacity=500, max_episode_steps=160,
        sac=sac.SACConfig(encoder="state_full", hidden_dim=32, augmentation="none"),
        run=RunConfig(seeds=seeds, out_dir=out_dir, **run))


def test_state_sac_smoke_run_logs_evaluates_and_checkpoints(tmp_path):
    result = sac_train.train(state_config(str(tmp_path), tensorboard=True), log=None)
    assert result.status == "finished" and result.exit_code == 0
    assert result.counters.iteration == 60 and result.counters.updates == 60 - 20 + 1
    rows = _read_csv(tmp_path / "seed_3" / "eval.csv")
    assert [int(r["step"]) for r in rows] == [240, 480]            # env steps = agent steps x 8
    assert all(np.isfinite(float(r["return_mean"])) for r in rows)
    assert os.listdir(tmp_path / "seed_3" / "tb")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]   # agent steps
    # the final checkpoint is the final state, and load_run gives it back with its config
    config, state = agents.load_run(str(tmp_path), seed=3)
    assert config == result.config
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(jax.tree.map(lambda x: x[0], result.carry))):
        np.testing.assert_array_equal(a, b)


def test_pixel_flare_smoke_run(tmp_path):
    cfg = sac_train.TrainConfig(
        task="cartpole_swingup", pixels=True, env_steps=8 * 16, init_steps=8,
        eval_every=100, eval_episodes=1, batch_size=4, replay_capacity=64, max_episode_steps=48,
        sac=sac.SACConfig(encoder="flare", hidden_dim=32),
        run=RunConfig(out_dir=str(tmp_path), tensorboard=False))
    result = sac_train.train(cfg, log=None)
    assert result.counters.updates == 16 - 8 + 1
    carry = result.carry
    assert carry.stack.shape == (1, 1, 1, 3, 100, 100, 3)         # stored 100px centre crops
    assert int(carry.replay.count[0, 0]) == 17                      # reset frame + 16 steps
    rows = _read_csv(tmp_path / "seed_0" / "eval.csv")
    assert len(rows) == 1 and np.isfinite(float(rows[0]["return_mean"]))


def test_train_config_validation():
    with pytest.raises(ValueError, match="unknown DMC task"):
        sac_train.TrainConfig(task="cartpole_swingdown")
    with pytest.raises(ValueError, match="env_steps must be >= 1"):
        sac_train.TrainConfig(env_steps=0)
    with pytest.raises(ValueError, match="takes full-state observations, not pixels"):
        sac_train.TrainConfig(pixels=True, sac=sac.SACConfig(encoder="state_full"))
    with pytest.raises(ValueError, match="takes pixels but --pixels=false"):
        sac_train.TrainConfig(pixels=False, sac=sac.SACConfig(encoder="flare"))
    with pytest.raises(ValueError, match="replay_capacity .* must be >= batch_size"):
        sac_train.TrainConfig(replay_capacity=64, batch_size=128)


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
    """results/sac_pixel_flare_cartpole: >= 5k env steps from pixels, evaluation, logs, checkpoints."""
    _launch(["--preset=flare", "--task=cartpole_swingup", "--env_steps=5600", "--init_steps=250",
             "--eval_every=350"], tmp_path)
    rows = _read_csv(tmp_path / "seed_0" / "eval.csv")
    assert int(rows[-1]["step"]) >= 5000
    assert os.listdir(tmp_path / "checkpoints")
