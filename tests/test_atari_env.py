"""Tests of the envpool Atari wrapper (reference.md 4, 6) and GymVectorEnv (short: < 30 s)."""
import numpy as np
import pytest

from flare_jax.envs import atari
from flare_jax.envs.atari import AtariEnv, GymVectorEnv

EXTRA_GAMES = ("pong", "space_invaders", "ms_pacman", "qbert", "enduro")


def _random_actions(env, seed=0):
    rng = np.random.default_rng(seed)
    return lambda: rng.integers(0, env.num_actions, env.num_envs)


def _run(env, steps, seed=0):
    """reset + `steps` random-action steps -> list of the steps+1 TimeSteps and lives [T+1, N]."""
    act = _random_actions(env, seed)
    out, lives = [env.reset()], [env.lives]
    for _ in range(steps):
        out.append(env.step(act()))
        lives.append(env.lives)
    return out, np.stack(lives)


# --------------------------------------------------------------------------------------- games
def test_games_cover_paper_and_extras_and_exist_in_envpool():
    for name in atari.PAPER_GAMES + EXTRA_GAMES:
        assert name in atari.GAMES
    assert atari.get_game("montezuma_revenge") == "MontezumaRevenge-v5"
    assert atari.get_game("space_invaders") == "SpaceInvaders-v5"
    registered = set(atari._import_envpool().list_all_envs())
    missing = [t for t in atari.GAMES.values() if t not in registered]
    assert not missing, missing


def test_bad_game_name_lists_valid_games():
    with pytest.raises(ValueError, match="breakout") as err:
        atari.get_game("brekout")
    assert "montezuma_revenge" in str(err.value)
    with pytest.raises(ValueError, match="valid games"):
        AtariEnv("Breakout-v5")


def test_envpool_configured_to_reference_protocol():
    with AtariEnv("breakout", num_envs=1) as env:
        cfg = env._env.config
        assert cfg["frame_skip"] == 4 and cfg["stack_num"] == 1
        assert (cfg["img_height"], cfg["img_width"], cfg["gray_scale"]) == (84, 84, True)
        assert cfg["repeat_action_probability"] == 0.0 and cfg["noop_max"] == 30
        assert cfg["use_fire_reset"] is False and cfg["episodic_life"] is False
        assert cfg["reward_clip"] is False and cfg["full_action_space"] is False
        assert cfg["max_episode_steps"] == 27_000  # agent steps = 108,000 frames
        assert env.max_episode_steps * env.frames_per_step == 108_000
        assert env.num_actions == 4  # breakout's minimal set: NOOP, FIRE, RIGHT, LEFT


# -------------------------------------------------------------------------------------- frames
def test_frames_are_single_grey_84_and_change():
    with AtariEnv("pong", num_envs=2, seed=0) as env:
        assert env.frame_shape == (84, 84) and env.frames_per_step == 4
        steps, _ = _run(env, 10)
    for ts in steps:
        assert ts.frame.dtype == np.uint8 and ts.frame.shape == (2, 84, 84)
        for name in ("reward", "raw_reward", "discount", "episode_return"):
            assert getattr(ts, name).dtype == np.float32 and getattr(ts, name).shape == (2,)
        assert ts.first.dtype == bool and ts.last.dtype == bool
    first = steps[0]
    assert first.first.all() and not first.last.any() and (first.discount == 1).all()
    assert first.frame.std() > 10  # not a constant image
    for prev, cur in zip(steps[:-1], steps[1:]):
        assert (prev.frame != cur.frame).any(axis=(1, 2)).all()


def test_seeds_reproduce_and_differ():
    def frames(seed):
        with AtariEnv("pong", num_envs=2, seed=seed) as env:
            steps, _ = _run(env, 20, seed=1)
        return np.stack([ts.frame for ts in steps], 1)  # [N, T, 84, 84]

    a = frames(3)
    np.testing.assert_array_equal(a, frames(3))
    np.testing.assert_array_equal(a, frames([3, 4]))  # int seed s gives env i the seed s + i
    b = frames([10, 11])
    for i in range(2):
        assert (a[i] != b[i]).any()
    with pytest.raises(ValueError, match="seeds"):
        AtariEnv("pong", num_envs=2, seed=[1, 2, 3])


# ------------------------------------------------------------------------------------- rewards
def test_reward_clipped_raw_reward_matches_envpool_score():
    """Space invaders scores 5-30 points per alien: raw > 1, learning reward clipped to 1."""
    n, steps = 2, 150
    env = AtariEnv("space_invaders", num_envs=n, seed=7)
    raw_env = atari._import_envpool().make_gymnasium(
        "SpaceInvaders-v5", num_envs=n, seed=7, stack_num=1, use_fire_reset=False)
    ids = np.arange(n, dtype=np.int32)
    ts = env.reset()
    obs, _ = raw_env.reset(ids)
    np.testing.assert_array_equal(ts.frame, obs[:, 0])
    act = _random_actions(env, 2)
    raw = []
    for _ in range(steps):
        a = act()
        ts = env.step(a)
        obs, r, te, tr, info = raw_env.step(a.astype(np.int32), ids)
        assert (info["env_id"] == ids).all()
        np.testing.assert_array_equal(ts.frame, obs[:, 0])
        np.testing.assert_array_equal(ts.raw_reward, r)
        np.testing.assert_array_equal(ts.reward, np.clip(ts.raw_reward, -1, 1))
        assert not (ts.last.any() or te.any() or tr.any())
        raw.append(ts.raw_reward)
        np.testing.assert_allclose(ts.episode_return, np.sum(raw, 0))
    env.close()
    raw_env.close()
    raw = np.stack(raw)
    assert raw.max() > 1, "no reward > 1 in the horizon: the clipping test is void"


# ---------------------------------------------------------------------------- lives, game over
def test_breakout_life_loss_continues_game_and_game_over_resets():
    with AtariEnv("breakout", num_envs=1, seed=0) as env:
        steps, lives = _run(env, 700, seed=0)
    lives = lives[:, 0]
    assert lives[0] == 5
    last = [t for t, ts in enumerate(steps) if ts.last[0]]
    assert last, "no game over in 700 random steps"
    end = last[0]  # first game over
    episode = steps[: end + 1]
    lost = [t for t in range(1, end + 1) if lives[t] < lives[t - 1]]
    assert len(lost) >= 4  # 5 lives: 4 life losses before the final one
    for t in range(1, end + 1):
        ts = episode[t]
        if t in lost or t == end:
            assert ts.discount[0] == 0.0, t
        else:
            assert ts.discount[0] == 1.0, t
        if t < end:  # a life loss does not end, reset or restart the episode
            assert not ts.last[0] and not ts.first[0], t
        if t in lost and t < end:  # the game goes on after a life loss
            assert not steps[t + 1].first[0]
    # game over: last with discount 0, episode_return = sum of raw rewards of the episode
    total = sum(float(ts.raw_reward[0]) for ts in episode)
    assert steps[end].episode_return[0] == pytest.approx(total)
    np.testing.assert_array_equal(
        [ts.reward[0] for ts in episode], np.clip([ts.raw_reward[0] for ts in episode], -1, 1))
    # then the new episode's first frame, rewards 0, full lives
    new = steps[end + 1]
    assert new.first[0] and not new.last[0]
    assert new.reward[0] == 0 and new.raw_reward[0] == 0 and new.episode_return[0] == 0
    assert new.discount[0] == 1.0 and lives[end + 1] == 5
    if len(last) > 1:  # returns restart from 0 in the next episode
        second = steps[end + 1: last[1] + 1]
        assert second[-1].episode_return[0] == pytest.approx(
            sum(float(ts.raw_reward[0]) for ts in second))


def test_truncation_at_episode_cap_bootstraps():
    """Pong has no lives and does not end in 100 agent steps: 400 frames cap it at step 100."""
    with AtariEnv("pong", num_envs=2, seed=0, max_episode_frames=400) as env:
        assert env.max_episode_steps == 100
        steps, _ = _run(env, 205)
    for t, ts in enumerate(steps):
        assert ts.last.all() == (t in (100, 201)) and ts.last.any() == ts.last.all(), t
        assert ts.first.all() == (t in (0, 101, 202)) and ts.first.any() == ts.first.all(), t
        assert (ts.discount == 1.0).all(), t
    np.testing.assert_allclose(steps[100].episode_return,
                               np.sum([ts.raw_reward for ts in steps[:101]], 0))


def test_bad_arguments_and_actions_raise():
    with pytest.raises(ValueError, match="multiple of 4"):
        AtariEnv("pong", max_episode_frames=401)
    with pytest.raises(ValueError, match="noop_max"):
        AtariEnv("pong", noop_max=0)
    with AtariEnv("pong", num_envs=2) as env:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(2, np.int64))
        env.reset()
        with pytest.raises(ValueError, match=r"\[num_envs\] = \[2\]"):
            env.step(np.zeros(3, np.int64))
        with pytest.raises(ValueError, match=r"\[0, 6\)"):
            env.step(np.array([0, 6]))
        with pytest.raises(ValueError, match=r"\[0, 6\)"):
            env.step(np.array([-1, 0]))
        with pytest.raises(ValueError, match="integer"):
            env.step(np.zeros(2, np.float32))
        env.step(np.array([5, 0]))
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


# ------------------------------------------------------------------------------- GymVectorEnv
def test_cartpole_termination_discount_zero_and_returns_equal_lengths():
    with GymVectorEnv("CartPole-v1", num_envs=3, seed=0) as env:
        assert env.num_actions == 2 and env.frame_shape == (4,)
        ts = env.reset()
        assert ts.frame.dtype == np.float32 and ts.frame.shape == (3, 4)
        length = np.zeros(3, int)
        ends = 0
        for _ in range(60):  # always pushing left: the pole falls within ~10 steps
            ts = env.step(np.zeros(3, np.int64))
            np.testing.assert_array_equal(ts.reward, ts.raw_reward)
            length = np.where(ts.first, 0, length + 1)
            np.testing.assert_array_equal(ts.reward, np.where(ts.first, 0.0, 1.0))
            np.testing.assert_array_equal(ts.episode_return, length)
            np.testing.assert_array_equal(ts.discount, np.where(ts.last, 0.0, 1.0))
            ends += ts.last.sum()
        assert ends >= 9


def test_cartpole_truncation_at_500_bootstraps():
    with GymVectorEnv(num_envs=2, seed=0) as env:
        ts = env.reset()
        for t in range(501):
            o = ts.frame  # a balancing controller keeps the pole up for the 500 steps
            ts = env.step((o[:, 2] + 0.5 * o[:, 3] + 0.01 * o[:, 0] + 0.1 * o[:, 1] > 0)
                          .astype(np.int64))
            if t == 499:
                assert ts.last.all() and (ts.discount == 1).all()
                np.testing.assert_array_equal(ts.episode_return, 500)
            elif t == 500:
                assert ts.first.all() and (ts.episode_return == 0).all()
            else:
                assert not ts.last.any(), t
        # envpool calls a pole that falls on the cap step truncated; the wrapper gives it 0
        out = np.array([[0.0, 0, 0.3, 0], [0.0, 0, 0.1, 0]], np.float32)
        _, discount, last = env._outcome(np.arange(2), out, np.ones(2), np.zeros(2, bool),
                                         np.ones(2, bool), {})
        np.testing.assert_array_equal(discount, [0.0, 1.0])
        assert last.all()


def test_gym_bad_task_names_valid_ones():
    with pytest.raises(ValueError, match="CartPole-v1"):
        GymVectorEnv("Cartpole")
    with GymVectorEnv("Acrobot-v1", num_envs=2) as env:
        ts = env.reset()
        assert ts.frame.shape == (2,) + env.frame_shape and env.num_actions == 3
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            env.step(np.array([0, 3]))
