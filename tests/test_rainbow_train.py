"""Rainbow through the run loop: smoke runs (default suite) and learning runs (`make test-slow`)."""
import csv
import subprocess
import sys

import numpy as np
import pytest

from agents import rainbow, rainbow_train
from flare_jax import config_flags
from flare_jax.loop import RunConfig


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def cartpole_config(out_dir=None, seeds=(1,), **run):
    return rainbow_train.RainbowTrainConfig(
        game="CartPole-v1", num_envs=2, frames=600, eval_every_frames=300,
        eval_frames=200, eval_envs=2, learn_period_frames=4, batch_size=16, replay_capacity=1000,
        min_replay=100, rainbow=rainbow.RainbowConfig(torso="mlp", v_min=0.0, v_max=100.0),
        run=RunConfig(seeds=seeds, out_dir=out_dir, tensorboard=False, **run))


def test_cartpole_smoke_run_updates_on_schedule_logs_losses(tmp_path):
    res = rainbow_train.train(cartpole_config(str(tmp_path), log_every=100), log=None)
    assert res.status == "finished" and res.counters.iteration * 2 == 600
    # learning starts once 100 transitions are stored (2 reset frames, then 2 per iteration of 2
    # frames): at iteration 49, whose frames 97-98 count; then one update per 4 frames
    assert res.counters.updates == (600 - 96) // 4
    assert [int(r["step"]) for r in _rows(tmp_path / "seed_1" / "eval.csv")] == [300, 600]
    train = _rows(tmp_path / "seed_1" / "train.csv")
    assert [int(r["step"]) for r in train] == [100, 200, 300, 400, 500, 600]
    learning = [r for r in train if int(r["updates"]) > 0]
    assert learning and all(np.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0 for r in learning)
    # priorities were written back: some leaves differ from the initial max priority
    leaves = np.asarray(res.carry.replay.priorities.leaves())
    assert (leaves > 0).sum() > 100 and len(np.unique(leaves[leaves > 0])) > 10


def test_vmapped_seeds_equal_single_seed_runs():
    short = dict(frames=400, eval_every_frames=200)
    multi = rainbow_train.train(config_flags.replace(cartpole_config(seeds=(4, 7)), **short), log=None)
    single = rainbow_train.train(config_flags.replace(cartpole_config(seeds=(7,)), **short), log=None)
    assert multi.counters.updates == single.counters.updates == (400 - 96) // 4
    np.testing.assert_allclose([e[1][1] for e in multi.evals], [e[1][0] for e in single.evals],
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(multi.carry.agent.params["advantage_out"]["mu"]["kernel"][1]),
                               np.asarray(single.carry.agent.params["advantage_out"]["mu"]["kernel"][0]),
                               rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(multi.carry.replay.replay.frames[0]),
                           np.asarray(multi.carry.replay.replay.frames[1]))


def test_atari_flare_smoke_run(tmp_path):
    cfg = rainbow_train.RainbowTrainConfig(
        game="pong", num_envs=2, frames=480, eval_every_frames=10**6, eval_frames=64,
        eval_envs=1, batch_size=4, replay_capacity=500, min_replay=40,
        rainbow=rainbow.RainbowConfig(torso="atari_flare"),
        run=RunConfig(out_dir=str(tmp_path), tensorboard=False))
    res = rainbow_train.train(cfg, log=None)
    assert res.counters.iteration * 8 == 480 and res.counters.updates > 0
    assert res.carry.stack.shape == (1, 1, 2, 4, 84, 84, 1)     # [S, D, E / D, T, *frame]
    assert len(_rows(tmp_path / "seed_0" / "eval.csv")) == 1


def test_config_errors():
    with pytest.raises(ValueError, match="valid"):
        rainbow_train.RainbowTrainConfig(game="pongg")
    with pytest.raises(ValueError, match="min_replay"):
        rainbow_train.RainbowTrainConfig(min_replay=4, batch_size=32)
    with pytest.raises(ValueError, match="--torso=mlp"):
        rainbow_train.RainbowTrainConfig(game="CartPole-v1")
    with pytest.raises(ValueError, match="multiple of the frame skip"):
        rainbow_train.RainbowTrainConfig(frames=1001)


def _launch(args, out_dir):
    subprocess.run([sys.executable, "-m", "experiments.train_rainbow", *args,
                    f"--out_dir={out_dir}"], check=True, timeout=6 * 3600)


@pytest.mark.slow
def test_rainbow_solves_cartpole(tmp_path):
    """results/rainbow_cartpole: the full Rainbow machinery with an MLP torso, 3 seeds vmapped."""
    _launch(["--preset=cartpole", "--seeds=0,1,2"], tmp_path)
    finals = [float(_rows(tmp_path / f"seed_{s}" / "eval.csv")[-1]["return_mean"]) for s in (0, 1, 2)]
    assert np.mean(finals) >= 475, finals


@pytest.mark.slow
def test_atari_flare_runs_end_to_end(tmp_path):
    """results/rainbow_pong_flare: >= 50k frames with evaluation, logs and checkpoints."""
    _launch(["--preset=atari", "--game=pong", "--torso=atari_flare", "--frames=60000",
             "--min_replay=5000", "--eval_every_frames=30000", "--eval_frames=8000"], tmp_path)
    rows = _rows(tmp_path / "seed_0" / "eval.csv")
    assert int(rows[-1]["step"]) >= 50_000 and len(rows) >= 2
