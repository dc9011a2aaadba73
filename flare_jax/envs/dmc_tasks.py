"""DeepMind Control tasks: presets (envpool id, action repeat, camera) and state layouts.

Every task here exists in envpool 1.2.5 (`envpool.list_all_envs()`); action repeats follow
reference.md section 2:

- quadruped_walk: 4 (the authors' script);
- cartpole_swingup: 8 (PlaNet/DrQ benchmark convention);
- every other task: 2 (DrQ/Dreamer common practice; the paper's appendix table with the per-task
  action repeats was not available).

Action repeats count env steps (control steps of the dm_control task) per agent step. An episode
is 1000 env steps, i.e. 1000 / action_repeat agent steps.

State layouts
-------------
The flat state vector of a task is the concatenation, in dm_control's order, of the observation
keys of the dm_control task itself (`Task.get_observation` in `dm_control/suite/<domain>.py`).
envpool sometimes returns more keys than the task defines (QuadrupedWalk/Run-v1 add `origin`,
`rangefinder`, `ball_state`, `target_position` from the escape/fetch tasks; FingerSpin-v1 adds
`target_position` and `dist_to_target` from the turn tasks); those extra keys are not used.

Each entry of a layout is `(key, size, kind)`. A key that mixes positions and velocities (quadruped
`egocentric_state`, `imu`) appears as several consecutive entries, each a sub-slice of the key in
order; the sizes of a key's entries add up to the key's size.

kind = "position": configuration and everything that is not a time derivative: joint angles,
  cos/sin and rotation-matrix entries, heights, relative target/tip positions, distances,
  touch/contact and force/torque readings, actuator activations.
kind = "velocity": time derivatives: joint and root velocities (qvel), velocity sensors,
  velocimeter, gyro, and the accelerometer (a second derivative; at rest it also reads the
  gravity direction, but it is a derivative sensor and Markov only through velocities).

`position_indices(task)` are the indices of the flat vector kept by the position-only state
(reference.md section 3); `velocity_indices(task)` are the rest.
"""
from __future__ import annotations

import dataclasses

import numpy as np

POSITION = "position"
VELOCITY = "velocity"
KINDS = (POSITION, VELOCITY)

_AR_AUTHORS = "authors' script"
_AR_PLANET = "PlaNet/DrQ benchmark convention"
_AR_COMMON = "DrQ/Dreamer common practice (paper's appendix table unavailable)"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One DMC task preset.

    Attributes:
      name: dm_control suite name, `<domain>_<task>`, e.g. "walker_run".
      envpool_id: the envpool task id, e.g. "WalkerRun-v1".
      domain: the dm_control domain, e.g. "walker".
      action_repeat: env steps per agent step (the same action repeated, rewards summed).
      action_repeat_source: where the action repeat value comes from.
      camera: MuJoCo camera id for pixel observations (2 for quadruped, 0 otherwise).
    """
    name: str
    envpool_id: str
    domain: str
    action_repeat: int
    action_repeat_source: str
    camera: int


def _spec(name: str, envpool_id: str, domain: str, action_repeat: int = 2,
          source: str = _AR_COMMON) -> TaskSpec:
    return TaskSpec(name=name, envpool_id=envpool_id, domain=domain, action_repeat=action_repeat,
                    action_repeat_source=source, camera=2 if domain == "quadruped" else 0)


TASKS: dict[str, TaskSpec] = {
    s.name: s for s in (
        _spec("cartpole_swingup", "CartpoleSwingup-v1", "cartpole", 8, _AR_PLANET),
        _spec("cartpole_balance", "CartpoleBalance-v1", "cartpole"),
        _spec("pendulum_swingup", "PendulumSwingup-v1", "pendulum"),
        _spec("walker_walk", "WalkerWalk-v1", "walker", 2, _AR_PLANET),
        _spec("walker_run", "WalkerRun-v1", "walker"),
        _spec("walker_stand", "WalkerStand-v1", "walker"),
        _spec("cheetah_run", "CheetahRun-v1", "cheetah", 4, _AR_PLANET),
        _spec("hopper_hop", "HopperHop-v1", "hopper"),
        _spec("hopper_stand", "HopperStand-v1", "hopper"),
        _spec("finger_spin", "FingerSpin-v1", "finger", 2, _AR_PLANET),
        _spec("finger_turn_easy", "FingerTurnEasy-v1", "finger"),
        _spec("finger_turn_hard", "FingerTurnHard-v1", "finger"),
        _spec("reacher_easy", "ReacherEasy-v1", "reacher", 4, _AR_PLANET),
        _spec("reacher_hard", "ReacherHard-v1", "reacher"),
        _spec("quadruped_walk", "QuadrupedWalk-v1", "quadruped", 4, _AR_AUTHORS),
        _spec("quadruped_run", "QuadrupedRun-v1", "quadruped", 4, _AR_AUTHORS + " (quadruped_walk)"),
        _spec("ball_in_cup_catch", "BallInCupCatch-v1", "ball_in_cup", 4, _AR_PLANET),
    )
}


def get_task(name: str) -> TaskSpec:
    """Returns the preset of task `name` (e.g. "walker_run"); ValueError lists the valid names."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown DMC task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


# ---------------------------------------------------------------------------------------------
# Observation layouts, derived from dm_control 1.0.50 `suite/<domain>.py` (`get_observation` and
# the Physics methods it calls). Entries: (key, size, kind); consecutive entries with the same key
# are consecutive sub-slices of that key.

_CARTPOLE = (
    # cartpole.py Physics.bounded_position: cart x, pole xmat zz/xz (cos/sin angle)
    ("position", 3, POSITION),
    # cartpole.py get_observation physics.velocity() = qvel: cart speed, pole angular velocity
    ("velocity", 2, VELOCITY),
)

_PENDULUM = (
    # pendulum.py Physics.pole_orientation: pole xmat zz/xz (cos/sin angle)
    ("orientation", 2, POSITION),
    # pendulum.py Physics.angular_velocity: hinge qvel
    ("velocity", 1, VELOCITY),
)

_WALKER = (
    # walker.py Physics.orientations: xmat xx/xz of the 7 bodies
    ("orientations", 14, POSITION),
    # walker.py Physics.torso_height: torso xpos z
    ("height", 1, POSITION),
    # walker.py get_observation physics.velocity() = qvel: rootz/x/y + 6 joints
    ("velocity", 9, VELOCITY),
)

_CHEETAH = (
    # cheetah.py get_observation qpos[1:]: rootz, rooty, 6 joint angles
    ("position", 8, POSITION),
    # cheetah.py get_observation physics.velocity() = qvel: rootx/z/y + 6 joints
    ("velocity", 9, VELOCITY),
)

_HOPPER = (
    # hopper.py get_observation qpos[1:]: rootz, rooty, waist, hip, knee, ankle
    ("position", 6, POSITION),
    # hopper.py get_observation physics.velocity() = qvel: rootx/z/y + 4 joints
    ("velocity", 7, VELOCITY),
    # hopper.py Physics.touch: log1p of toe/heel touch sensors (contact force)
    ("touch", 2, POSITION),
)

_FINGER_SPIN = (
    # finger.py Physics.bounded_position: proximal/distal angle sensors, tip (x,z) rel. hinge
    ("position", 4, POSITION),
    # finger.py Physics.velocity: proximal/distal/hinge velocity sensors
    ("velocity", 3, VELOCITY),
    # finger.py Physics.touch: log1p of touchtop/touchbottom sensors (contact force)
    ("touch", 2, POSITION),
)

_FINGER_TURN = _FINGER_SPIN + (
    # finger.py Physics.target_position: target (x,z) rel. hinge
    ("target_position", 2, POSITION),
    # finger.py Physics.dist_to_target: signed tip-to-target-surface distance
    ("dist_to_target", 1, POSITION),
)

_REACHER = (
    # reacher.py get_observation physics.position() = qpos: shoulder, wrist angles
    ("position", 2, POSITION),
    # reacher.py Physics.finger_to_target: target - finger (x,y)
    ("to_target", 2, POSITION),
    # reacher.py get_observation physics.velocity() = qvel: shoulder, wrist
    ("velocity", 2, VELOCITY),
)

_QUADRUPED_MOVE = (
    # quadruped.py Physics.egocentric_state [0:16]: qpos of the 16 hinges
    ("egocentric_state", 16, POSITION),
    # quadruped.py Physics.egocentric_state [16:32]: qvel of the 16 hinges
    ("egocentric_state", 16, VELOCITY),
    # quadruped.py Physics.egocentric_state [32:44]: data.act, 12 filter-actuator activations
    ("egocentric_state", 12, POSITION),
    # quadruped.py Physics.torso_velocity: velocimeter (torso frame)
    ("torso_velocity", 3, VELOCITY),
    # quadruped.py Physics.torso_upright: torso xmat zz
    ("torso_upright", 1, POSITION),
    # quadruped.py Physics.imu [0:3]: imu_accel accelerometer (first in sensor-id order)
    ("imu", 3, VELOCITY),
    # quadruped.py Physics.imu [3:6]: imu_gyro gyro (angular velocity)
    ("imu", 3, VELOCITY),
    # quadruped.py Physics.force_torque: arcsinh of 4 toe force + 4 toe torque sensors
    ("force_torque", 24, POSITION),
)

_BALL_IN_CUP = (
    # ball_in_cup.py get_observation physics.position() = qpos: cup x/z, ball x/z
    ("position", 4, POSITION),
    # ball_in_cup.py get_observation physics.velocity() = qvel: cup x/z, ball x/z
    ("velocity", 4, VELOCITY),
)

_LAYOUTS: dict[str, tuple[tuple[str, int, str], ...]] = {
    "cartpole_swingup": _CARTPOLE,
    "cartpole_balance": _CARTPOLE,
    "pendulum_swingup": _PENDULUM,
    "walker_walk": _WALKER,
    "walker_run": _WALKER,
    "walker_stand": _WALKER,
    "cheetah_run": _CHEETAH,
    "hopper_hop": _HOPPER,
    "hopper_stand": _HOPPER,
    # finger.py Spin.get_observation: no target keys (envpool adds them)
    "finger_spin": _FINGER_SPIN,
    "finger_turn_easy": _FINGER_TURN,
    "finger_turn_hard": _FINGER_TURN,
    "reacher_easy": _REACHER,
    "reacher_hard": _REACHER,
    "quadruped_walk": _QUADRUPED_MOVE,  # quadruped.py Move.get_observation = _common_observations
    "quadruped_run": _QUADRUPED_MOVE,
    "ball_in_cup_catch": _BALL_IN_CUP,
}
assert set(_LAYOUTS) == set(TASKS), "every task needs a state layout"


def state_layout(task_name: str) -> list[tuple[str, int, str]]:
    """The flat-state layout of a task: [(key, size, kind)], kind in {"position", "velocity"}.

    Entries are in flat-vector order; a key split by kind appears as consecutive entries.
    """
    get_task(task_name)
    return list(_LAYOUTS[task_name])


def state_keys(task_name: str) -> list[tuple[str, int]]:
    """The observation keys of a task in flat-vector order, with their full sizes: [(key, size)]."""
    keys: list[tuple[str, int]] = []
    for key, size, _ in state_layout(task_name):
        if keys and keys[-1][0] == key:
            keys[-1] = (key, keys[-1][1] + size)
        else:
            keys.append((key, size))
    return keys


def state_dim(task_name: str) -> int:
    """Length D of the task's flat full state vector (positions and velocities)."""
    return sum(size for _, size, _ in state_layout(task_name))


def _indices(task_name: str, kind: str) -> np.ndarray:
    out, start = [], 0
    for _, size, k in state_layout(task_name):
        if k == kind:
            out.extend(range(start, start + size))
        start += size
    return np.asarray(out, dtype=np.int64)


def position_indices(task_name: str) -> np.ndarray:
    """Increasing int64 indices into the flat full state of the "position" entries."""
    return _indices(task_name, POSITION)


def velocity_indices(task_name: str) -> np.ndarray:
    """Increasing int64 indices into the flat full state of the "velocity" entries."""
    return _indices(task_name, VELOCITY)
