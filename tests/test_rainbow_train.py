"""Rainbow training loop: smoke runs (default suite) and learning runs (`make test-slow`)."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from agents import rainbow, rainbow_train


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cartpole_smoke_run_updates_on_schedule_and_saves(tmp_path):
    cfg = rainbow_train.RainbowTrainConfig(
        env="CartPole-v1", seed=1, num_envs=2, train_frames=600, eval_every_frames=300,
        eval_frames=200, eval_envs=2, learn_period_frames=4, batch_size=16, replay_capacity=1000,
        min_replay=100, rainbow=rainbow.RainbowConfig(torso="mlp", v_min=0.0, v_max=100.0),
        out_dir=str(tmp_path), tensorboard=False)
    res = rainbow_train.train(cfg, log=None)
    assert res["frames"] == 600
    # learning starts once 100 transitions are stored (2 reset frames, then 2 per iteration of 2
    # frames): at iteration 49, whose frames 97-98 count; then one update per 4 frames
    assert res["updates"] == (600 - 96) // 4
    assert [int(r["step"]) for r in _rows(tmp_path / "eval.csv")] == [300, 600]
    assert os.path.exists(tmp_path / "params_final.msgpack")
    # priorities were written back: some leaves differ from the initial max priority
    leaves = np.asarray(res["carry"].replay.priorities.leaves())
    assert (leaves > 0).sum() > 100 and len(np.unique(leaves[leaves > 0])) > 10


def test_atari_flare_smoke_run(tmp_path):
    cfg = rainbow_train.RainbowTrainConfig(
        env="pong", seed=0, num_envs=2, train_frames=480, eval_every_frames=10**6, eval_frames=64,
        eval_envs=1, batch_size=4, replay_capacity=500, min_replay=40,
        rainbow=rainbow.RainbowConfig(torso="atari_flare"), out_dir=str(tmp_path), tensorboard=False)
    res = rainbow_train.train(cfg, log=None)
    assert res["frames"] == 480 and res["updates"] > 0
    carry = res["carry"]
    assert carry.stack.shape == (2, 4, 84, 84, 1)
    assert len(_rows(tmp_path / "eval.csv")) == 1


def test_config_errors():
    with pytest.raises(ValueError, match="valid"):
        rainbow_train.RainbowTrainConfig(env="pongg")
    with pytest.raises(ValueError, match="min_replay"):
        rainbow_train.RainbowTrainConfig(min_replay=4, batch_size=32)


def test_launcher_rejects_mismatched_network():
    out = subprocess.run([sys.executable, "-m", "experiments.train_rainbow", "--preset=cartpole",
                          "--game=CartPole-v1", "--network=flare"], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, FLARE_JAX_TCMALLOC="0"))
    assert out.returncode != 0 and "--network=mlp" in out.stderr


def _launch(args, out_dir):
    subprocess.run([sys.executable, "-m", "experiments.train_rainbow", *args,
                    f"--out_dir={out_dir}"], check=True, timeout=6 * 3600)


@pytest.mark.slow
def test_rainbow_solves_cartpole(tmp_path):
    """results/rainbow_cartpole: the full Rainbow machinery with an MLP torso, 3 seeds."""
    finals = []
    for seed in (0, 1, 2):
        _launch(["--preset=cartpole", "--game=CartPole-v1", f"--seed={seed}"], tmp_path / f"s{seed}")
        finals.append(float(_rows(tmp_path / f"s{seed}" / "eval.csv")[-1]["return_mean"]))
    assert np.mean(finals) >= 475, finals


@pytest.mark.slow
def test_atari_flare_runs_end_to_end(tmp_path):
    """results/rainbow_pong_flare: >= 50k frames with evaluation, logs and saved parameters."""
    _launch(["--preset=atari", "--game=pong", "--network=flare", "--frames=60000",
             "--min_replay=5000", "--eval_every_frames=30000", "--eval_frames=8000"], tmp_path)
    rows = _rows(tmp_path / "eval.csv")
    assert int(rows[-1]["step"]) >= 50_000 and len(rows) >= 2
    assert os.path.exists(tmp_path / "params_final.msgpack")
