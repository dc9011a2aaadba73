"""Multi-seed runs: S seeds vmapped in one process give each seed the run it would get alone."""
import jax
import numpy as np
import pytest

from agents import sac, sac_train
from flare_jax.loop import RunConfig


def _config(seeds, encoder="state_flare"):
    return sac_train.TrainConfig(
        task="cartpole_swingup", pixels=False, env_steps=8 * 40, init_steps=10,
        eval_every=20, eval_episodes=2, batch_size=32, replay_capacity=300, max_episode_steps=120,
        sac=sac.SACConfig(encoder=encoder, hidden_dim=32, augmentation="none"),
        run=RunConfig(seeds=seeds))


@pytest.mark.parametrize("encoder", ["state_flare", "state_recurrent"])
def test_vmapped_seeds_equal_single_seed_runs(encoder):
    multi = sac_train.train(_config((4, 7), encoder), log=None)
    single = sac_train.train(_config((7,), encoder), log=None)
    # evaluation returns of seed 7, at every evaluation
    np.testing.assert_allclose([e[1][1] for e in multi.evals], [e[1][0] for e in single.evals],
                               rtol=1e-4)
    # the parameters after 31 updates, and the replay contents
    a = jax.tree.map(lambda x: np.asarray(x[1]), multi.carry.agent)
    b = jax.tree.map(lambda x: np.asarray(x[0]), single.carry.agent)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(multi.carry.replay.frames[1]),
                               np.asarray(single.carry.replay.frames[0]), rtol=1e-5, atol=1e-6)
    # and the two seeds of the multi run differ
    assert not np.allclose(np.asarray(multi.carry.replay.frames[0]),
                           np.asarray(multi.carry.replay.frames[1]))
