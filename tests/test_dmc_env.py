"""Tests of the DMC task presets, state layouts and the envpool DMC wrapper (short: < 60 s)."""
import numpy as np
import pytest

from flare_jax.envs import dmc_tasks
from flare_jax.envs.dmc import DMCEnv, make_eval_env
from flare_jax.envs.rendering import preload_egl

REQUIRED_TASKS = (
    "cartpole_swingup", "cartpole_balance", "pendulum_swingup", "walker_walk", "walker_run",
    "walker_stand", "cheetah_run", "hopper_hop", "hopper_stand", "finger_spin",
    "finger_turn_hard", "finger_turn_easy", "reacher_easy", "reacher_hard", "quadruped_walk",
    "quadruped_run", "ball_in_cup_catch")

# One task per domain -> (full state dim, velocity parts as (key, start, stop) within the key).
# Written independently of dmc_tasks from dm_control's suite/<domain>.py.
EXPECTED = {
    "cartpole_swingup": (5, [("velocity", 0, 2)]),
    "pendulum_swingup": (3, [("velocity", 0, 1)]),
    "walker_walk": (24, [("velocity", 0, 9)]),
    "cheetah_run": (17, [("velocity", 0, 9)]),
    "hopper_hop": (15, [("velocity", 0, 7)]),
    "finger_spin": (9, [("velocity", 0, 3)]),
    "finger_turn_hard": (12, [("velocity", 0, 3)]),
    "reacher_easy": (6, [("velocity", 0, 2)]),
    "quadruped_walk": (78, [("egocentric_state", 16, 32), ("torso_velocity", 0, 3),
                            ("imu", 0, 6)]),
    "ball_in_cup_catch": (8, [("velocity", 0, 4)]),
}


def _raw_envpool():
    preload_egl()
    import envpool  # pylint: disable=g-import-not-at-top
    return envpool


def _raw_state(observation, task):
    """The full flat state from a raw envpool observation, [B, D] float32."""
    parts = [np.asarray(getattr(observation, k), np.float64).reshape(-1, n)
             for k, n in dmc_tasks.state_keys(task)]
    return np.concatenate(parts, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Task presets and layouts


def test_required_tasks_present_with_presets():
    for name in REQUIRED_TASKS:
        spec = dmc_tasks.get_task(name)
        assert spec.name == name
        assert spec.camera == (2 if spec.domain == "quadruped" else 0)
    assert dmc_tasks.get_task("quadruped_walk").action_repeat == 4
    assert dmc_tasks.get_task("quadruped_walk").action_repeat_source == "authors' script"
    assert dmc_tasks.get_task("cartpole_swingup").action_repeat == 8
    # PlaNet's benchmark values where it has one, 2 (DrQ/Dreamer practice) for the rest
    planet = {"cheetah_run": 4, "reacher_easy": 4, "ball_in_cup_catch": 4, "walker_walk": 2,
              "finger_spin": 2}
    for name in set(REQUIRED_TASKS) - {"quadruped_walk", "cartpole_swingup", "quadruped_run"}:
        assert dmc_tasks.get_task(name).action_repeat == planet.get(name, 2), name
        assert dmc_tasks.get_task(name).action_repeat_source  # says where it comes from


def test_envpool_ids_exist():
    envpool = _raw_envpool()
    available = set(envpool.list_all_envs())
    for spec in dmc_tasks.TASKS.values():
        assert spec.envpool_id in available, spec.envpool_id


@pytest.mark.parametrize("task", sorted(dmc_tasks.TASKS))
def test_indices_partition_state(task):
    pos, vel = dmc_tasks.position_indices(task), dmc_tasks.velocity_indices(task)
    d = dmc_tasks.state_dim(task)
    assert np.all(np.diff(pos) > 0) and np.all(np.diff(vel) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([pos, vel])), np.arange(d))
    assert len(pos) > 0 and len(vel) > 0
    for _, size, kind in dmc_tasks.state_layout(task):
        assert size > 0 and kind in dmc_tasks.KINDS


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_velocity_entries_match_expected_keys(task):
    dim, vel_parts = EXPECTED[task]
    assert dmc_tasks.state_dim(task) == dim
    offsets, start = {}, 0
    for key, size in dmc_tasks.state_keys(task):
        offsets[key] = start
        start += size
    expected = np.concatenate([np.arange(offsets[k] + a, offsets[k] + b) for k, a, b in vel_parts])
    np.testing.assert_array_equal(dmc_tasks.velocity_indices(task), expected)


def test_velocity_counts_per_domain():
    counts = {t: len(dmc_tasks.velocity_indices(t)) for t in EXPECTED}
    assert counts == {"cartpole_swingup": 2, "pendulum_swingup": 1, "walker_walk": 9,
                      "cheetah_run": 9, "hopper_hop": 7, "finger_spin": 3, "finger_turn_hard": 3,
                      "reacher_easy": 2, "quadruped_walk": 25, "ball_in_cup_catch": 4}


# ---------------------------------------------------------------------------------------------
# Environment


@pytest.mark.parametrize("task", REQUIRED_TASKS)
def test_every_task_builds_with_state_dim(task):
    env = DMCEnv(task, num_envs=1, seed=0)
    try:
        ts = env.reset()
        d = dmc_tasks.state_dim(task)
        assert env.frame_shape == (d,) and env.frame_dtype == np.float32
        assert ts.frame.shape == (1, d) and ts.frame.dtype == np.float32
        assert ts.first.all() and not ts.last.any() and ts.reward[0] == 0
        ts = env.step(np.zeros((1, env.action_dim), np.float32))
        assert ts.frame.shape == (1, d) and np.all(np.isfinite(ts.frame))
        assert not ts.first.any()
        np.testing.assert_array_equal(env.action_low, -1)
        np.testing.assert_array_equal(env.action_high, 1)
    finally:
        env.close()


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_position_only_drops_exactly_velocities(task):
    rng = np.random.default_rng(0)
    full, pos = DMCEnv(task, num_envs=2, seed=7), DMCEnv(task, num_envs=2, seed=7, obs="position")
    try:
        keep = dmc_tasks.position_indices(task)
        n_vel = len(dmc_tasks.velocity_indices(task))
        assert pos.frame_shape == (dmc_tasks.state_dim(task) - n_vel,)
        tf, tp = full.reset(), pos.reset()
        for _ in range(3):
            assert tp.frame.shape == (2, len(keep))
            np.testing.assert_array_equal(tp.frame, tf.frame[:, keep])
            np.testing.assert_array_equal(tp.reward, tf.reward)
            a = rng.uniform(-1, 1, (2, full.action_dim)).astype(np.float32)
            tf, tp = full.step(a), pos.step(a)
        np.testing.assert_array_equal(tp.frame, tf.frame[:, keep])
    finally:
        full.close()
        pos.close()


@pytest.mark.parametrize("task", ["walker_walk", "cartpole_swingup", "quadruped_walk"])
def test_action_repeat_sums_raw_rewards(task):
    envpool = _raw_envpool()
    env = DMCEnv(task, num_envs=2, seed=5)
    raw = envpool.make_dm(env.task.envpool_id, num_envs=2, seed=5)
    ids = np.arange(2, dtype=np.int32)
    rng = np.random.default_rng(1)
    try:
        ts, rts = env.reset(), raw.reset()
        np.testing.assert_array_equal(ts.frame, _raw_state(rts.observation, task))
        for _ in range(3):
            a = rng.uniform(-1, 1, (2, env.action_dim)).astype(np.float32).astype(np.float64)
            # The wrapper maps [-1, 1] onto the actuator range (identity where it is [-1, 1]).
            lo, hi = env.env_action_low, env.env_action_high
            identity = np.all(lo == -1) and np.all(hi == 1)
            assert identity == (task != "quadruped_walk")
            raw_a = a if identity else lo + (a + 1.0) * 0.5 * (hi - lo)
            ts = env.step(a.astype(np.float32))
            total = np.zeros(2)
            for _ in range(env.action_repeat):
                rts = raw.step(raw_a, ids)
                total += rts.reward
            assert ts.reward.dtype == np.float32
            np.testing.assert_array_equal(ts.reward, total.astype(np.float32))
            np.testing.assert_array_equal(ts.frame, _raw_state(rts.observation, task))
    finally:
        env.close()
        raw.close()


def test_episode_boundary_cartpole_swingup():
    env = DMCEnv("cartpole_swingup", num_envs=2, seed=0)
    assert env.action_repeat == 8
    a = np.full((2, 1), 0.5, np.float32)
    try:
        ts = env.reset()
        assert ts.first.all() and not ts.last.any()
        for t in range(1, 126):
            ts = env.step(a)
            assert not ts.first.any(), t
            assert ts.last.all() == (t == 125) and ts.last.any() == (t == 125), t
            np.testing.assert_array_equal(ts.discount, 1.0)
        first_frame = env.step(a)
        assert first_frame.first.all() and not first_frame.last.any()
        np.testing.assert_array_equal(first_frame.reward, 0.0)
        assert not np.array_equal(first_frame.frame, ts.frame)
        ts = env.step(a)
        assert not ts.first.any() and not ts.last.any()
    finally:
        env.close()


def test_early_stop_when_repeat_does_not_divide_episode():
    """action_repeat 3: 333 full agent steps, then one of 1 env step ending the episode."""
    envpool = _raw_envpool()
    env = DMCEnv("pendulum_swingup", num_envs=1, seed=2, action_repeat=3)
    raw = envpool.make_dm("PendulumSwingup-v1", num_envs=1, seed=2)
    a = np.full((1, 1), 0.3)
    try:
        env.reset()
        raw.reset()
        for t in range(1, 335):
            ts = env.step(a)
            n = 3 if t <= 333 else 1
            total = sum(float(raw.step(a, np.zeros(1, np.int32)).reward[0]) for _ in range(n))
            assert ts.reward[0] == np.float32(total), t
            assert ts.last[0] == (t == 334), t
        ts = env.step(a)
        assert ts.first[0] and ts.reward[0] == 0 and not ts.last[0]
    finally:
        env.close()
        raw.close()


def test_misaligned_envs_reset_independently():
    """Env 0 is pushed one env step ahead (through envpool directly) so the episodes end on
    different agent steps; each env must get its own last / first / reward-0 step."""
    env = DMCEnv("pendulum_swingup", num_envs=2, seed=4, action_repeat=3)
    a = np.full((2, 1), -0.2, np.float32)
    try:
        env.reset()
        env._env.step(np.zeros((1, 1)), np.zeros(1, np.int32))  # pylint: disable=protected-access
        for t in range(1, 333):
            ts = env.step(a)
            assert not ts.last.any() and not ts.first.any(), t
        ts = env.step(a)  # 333: env 0 reaches 1000 env steps, env 1 is at 999
        np.testing.assert_array_equal(ts.last, [True, False])
        ts = env.step(a)  # 334: env 0 restarts, env 1 takes its final env step
        np.testing.assert_array_equal(ts.first, [True, False])
        np.testing.assert_array_equal(ts.last, [False, True])
        assert ts.reward[0] == 0
        ts = env.step(a)  # 335: env 0 steps on, env 1 restarts
        np.testing.assert_array_equal(ts.first, [False, True])
        np.testing.assert_array_equal(ts.last, [False, False])
        assert ts.reward[1] == 0
        ts = env.step(a)
        assert not ts.first.any() and not ts.last.any()
    finally:
        env.close()


def test_pixels_cartpole_swingup():
    envpool = _raw_envpool()
    env = make_eval_env("cartpole_swingup", num_episodes=2, seed=3, pixels=True, obs="full",
                        size=108)
    raw = envpool.make_dm("CartpoleSwingup-v1", num_envs=2, seed=3, from_pixels=True,
                          render_height=108, render_width=108, render_camera_id=0)
    try:
        assert env.frame_shape == (108, 108, 3) and env.frame_dtype == np.uint8
        ts = env.reset()
        assert ts.frame.shape == (2, 108, 108, 3) and ts.frame.dtype == np.uint8
        assert ts.frame.flags.c_contiguous
        assert ts.frame.min() < ts.frame.max()
        raw_pixels = np.asarray(raw.reset().observation.pixels)  # [N, 3, H, W]
        np.testing.assert_array_equal(ts.frame, raw_pixels.transpose(0, 2, 3, 1))
        nxt = env.step(np.ones((2, 1), np.float32))
        assert nxt.frame.shape == (2, 108, 108, 3) and nxt.frame.dtype == np.uint8
        for i in range(2):
            assert not np.array_equal(nxt.frame[i], ts.frame[i])
    finally:
        env.close()
        raw.close()


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="walker_run") as err:
        dmc_tasks.get_task("walker_sprint")
    assert "cartpole_swingup" in str(err.value)
    with pytest.raises(ValueError, match="quadruped_walk"):
        DMCEnv("walker_sprint")
    with pytest.raises(ValueError, match="valid tasks"):
        dmc_tasks.state_layout("nope")
    with pytest.raises(ValueError, match="valid tasks"):
        dmc_tasks.position_indices("nope")


def test_bad_obs_and_pixels_combination():
    with pytest.raises(ValueError, match="'full'.*'position'"):
        DMCEnv("cartpole_swingup", obs="velocity")
    with pytest.raises(ValueError, match="pixels"):
        DMCEnv("cartpole_swingup", pixels=True, obs="position")
    with pytest.raises(ValueError, match="num_envs"):
        DMCEnv("cartpole_swingup", num_envs=0)
    with pytest.raises(ValueError, match="action_repeat"):
        DMCEnv("cartpole_swingup", action_repeat=0)


def test_bad_actions():
    env = DMCEnv("walker_walk", num_envs=2, seed=0)
    try:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros((2, 6), np.float32))
        env.reset()
        with pytest.raises(ValueError, match=r"\[2, 6\]"):
            env.step(np.zeros((2, 5), np.float32))
        with pytest.raises(ValueError, match=r"\[2, 6\]"):
            env.step(np.zeros(6, np.float32))
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            env.step(np.full((2, 6), 1.5, np.float32))
        with pytest.raises(ValueError, match="NaN"):
            env.step(np.full((2, 6), np.nan, np.float32))
        env.step(np.zeros((2, 6), np.float32))  # still usable after rejected actions
    finally:
        env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()
