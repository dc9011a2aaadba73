"""Vectorised DeepMind Control environments on envpool's dm API, with action repeat.

One `DMCEnv.step` is one *agent step*: the same action is applied for `action_repeat` *env steps*
(control steps of the dm_control task), the rewards are summed, and the repeat stops early for an
env whose episode ends. DMC episodes are 1000 env steps (time limit only), so
1000 / action_repeat agent steps. Report training progress in env steps
(agent steps x action_repeat), reference.md section 2.

envpool's `frame_skip` for DMC is the task's physics substep count (walker 10, quadruped 4, ...),
not the action repeat; it is left at envpool's value. Pixel observations are rendered by envpool
(EGL; `rendering.preload_egl()` runs before envpool is imported) at `size` x `size` from the task's
camera (0, quadruped 2), and returned channels-last. envpool renders after every env step, so a
pixel agent step costs `action_repeat` renders.

Actions: the agent's action space is [-1, 1]^A for every task. Tasks whose actuator ranges differ
(quadruped: [-1, 1], [-1, 1.1], [-0.8, 0.8] per leg) get the action linearly rescaled to the
actuator range, as dmc2gym did in the authors' RAD code; tasks whose range is already [-1, 1]
receive the action unchanged.

Auto-reset follows envpool's dm API: after a step that returned `last[i] = True`, the next `step`
call returns env i's new first frame (`first[i] = True`, reward 0, its action ignored). The other
envs step normally in the same call. (envpool itself repeats the previous reward on an auto-reset
first step; this wrapper reports 0.)

Speed through this wrapper on the 2-core development machine (CPU only, Mesa software EGL, shared
with other work, so ranges over repeated runs), envpool 1.2.5, totals over all envs:
- cartpole_swingup states (action repeat 8): 4,100-5,200 env steps/s (520-650 agent steps/s)
  with 1 env; 23,000-34,000 env steps/s (2,800-4,200 agent steps/s) with 8 envs.
- cartpole_swingup pixels, 108 px, 2 envs: 31-61 rendered env steps/s, i.e. 3.9-7.6 agent
  steps/s (1.9-3.8 `step` calls/s) at action repeat 8, and 15-34 agent steps/s at action
  repeat 2. Rendering dominates: the cost is per env step, not per agent step.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from flare_jax.envs import dmc_tasks
from flare_jax.envs.lifetime import EnvLifetime
from flare_jax.envs.rendering import preload_egl

OBS_CHOICES = ("full", "position")
_FIRST, _MID, _LAST = 0, 1, 2  # dm_env.StepType values as returned by envpool


@dataclasses.dataclass(frozen=True)
class TimeStep:
    """One agent step of N environments.

    Attributes:
      frame: [N, H, W, 3] uint8 channels-last pixels, or [N, D] float32 states.
      reward: [N] float32, summed over the env steps of the action repeat (0 on a first step).
      discount: [N] float32; 1.0 (DMC episodes end only by the time limit).
      first: [N] bool, the frame is the first of a new episode.
      last: [N] bool, the frame is the last of its episode (time limit).
      episode_return: [N] float32, the sum of the episode's rewards so far, this step included
        (0 on a first step); at `last` it is the episode's return.
    """
    frame: np.ndarray
    reward: np.ndarray
    discount: np.ndarray
    first: np.ndarray
    last: np.ndarray
    episode_return: np.ndarray


def _import_envpool():
    preload_egl()  # before envpool is imported; harmless for state tasks
    import envpool  # pylint: disable=g-import-not-at-top
    return envpool


class DMCEnv(EnvLifetime):
    """N DMC environments stepped in lockstep, one agent step = `action_repeat` env steps.

    Args:
      task: a name in `dmc_tasks.TASKS`, e.g. "walker_run".
      num_envs: N, the number of parallel environments.
      seed: envpool seed (env i is seeded from seed and i by envpool), or a sequence of
        num_envs seeds, one per env (multi-seed runs: each seed's envs get the seeds a
        single-seed run would give them).
      pixels: RGB frames [N, size, size, 3] uint8 instead of states.
      obs: states only: "full" (positions and velocities, `dmc_tasks.state_layout` order) or
        "position" (only `dmc_tasks.position_indices`).
      size: pixel frame height and width.
      max_episode_steps: episode time limit in env steps (default: the task's, 1000).
      action_repeat: env steps per agent step; None takes the task preset.

    Attributes:
      task: the `dmc_tasks.TaskSpec`.
      num_envs, action_repeat, pixels, obs: as given (action_repeat resolved).
      frame_shape: (size, size, 3) for pixels, (D,) for states.
      frame_dtype: uint8 for pixels, float32 for states.
      action_dim: A.
      action_low, action_high: [A] float32, the agent's action bounds (-1, 1).
      env_action_low, env_action_high: [A] float64, the actuator bounds the action is mapped to.
    """

    def __init__(self, task: str, num_envs: int = 1, seed=0, pixels: bool = False,
                 obs: str = "full", size: int = 108, action_repeat: int | None = None,
                 max_episode_steps: int | None = None):
        self.task = dmc_tasks.get_task(task)
        if obs not in OBS_CHOICES:
            raise ValueError(f"obs must be one of {OBS_CHOICES}, got {obs!r}")
        if pixels and obs != "full":
            raise ValueError(
                f"obs={obs!r} applies to state observations only; with pixels=True use obs='full'")
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if action_repeat is None:
            action_repeat = self.task.action_repeat
        if not isinstance(action_repeat, (int, np.integer)) or action_repeat < 1:
            raise ValueError(f"action_repeat must be a positive int or None, got {action_repeat!r}")
        if pixels and (not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.num_envs = int(num_envs)
        self.action_repeat = int(action_repeat)
        self.pixels = bool(pixels)
        self.obs = obs
        self.size = int(size)

        envpool = _import_envpool()
        kwargs = {}
        if self.pixels:
            kwargs = dict(from_pixels=True, render_height=self.size, render_width=self.size,
                          render_camera_id=self.task.camera)
        if max_episode_steps is not None:   # shorter episodes (env steps), for quick checks
            if max_episode_steps < 1:
                raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
            kwargs["max_episode_steps"] = int(max_episode_steps)
        if np.ndim(seed) == 0:
            seed = int(seed)
        else:
            seed = [int(x) for x in seed]
            if len(seed) != self.num_envs:
                raise ValueError(f"got {len(seed)} seeds for num_envs={self.num_envs}")
        self._env = envpool.make_dm(self.task.envpool_id, num_envs=self.num_envs, seed=seed,
                                    **kwargs)
        self._all_ids = np.arange(self.num_envs, dtype=np.int32)

        if self.pixels:
            self.frame_shape = (self.size, self.size, 3)
            self.frame_dtype = np.dtype(np.uint8)
            self._keys = None
            self._select = None
        else:
            self._keys = dmc_tasks.state_keys(self.task.name)
            full_dim = dmc_tasks.state_dim(self.task.name)
            self._select = (dmc_tasks.position_indices(self.task.name) if obs == "position"
                            else None)
            dim = full_dim if self._select is None else len(self._select)
            self.frame_shape = (dim,)
            self.frame_dtype = np.dtype(np.float32)

        spec = self._env.action_spec()
        self.action_dim = int(np.prod(spec.shape))
        self.env_action_low = np.broadcast_to(
            np.asarray(spec.minimum, np.float64), (self.action_dim,)).copy()
        self.env_action_high = np.broadcast_to(
            np.asarray(spec.maximum, np.float64), (self.action_dim,)).copy()
        self._rescale = not (np.all(self.env_action_low == -1.0)
                             and np.all(self.env_action_high == 1.0))
        self.action_low = -np.ones(self.action_dim, np.float32)
        self.action_high = np.ones(self.action_dim, np.float32)

        self._frame = None       # [N, ...] the latest frame of every env
        self._needs_reset = None  # [N] bool: the previous step returned last
        self._return = None      # [N] float64 return of the running episodes
        self._mark_open()

    # ------------------------------------------------------------------------------------------
    def _frames(self, observation) -> np.ndarray:
        """envpool observation of B envs -> [B, *frame_shape] in `frame_dtype`."""
        if self.pixels:
            return np.ascontiguousarray(np.asarray(observation.pixels).transpose(0, 2, 3, 1))
        parts = []
        for key, size in self._keys:
            value = np.asarray(getattr(observation, key), np.float64)
            value = value.reshape(value.shape[0], -1)
            if value.shape[1] != size:
                raise RuntimeError(
                    f"{self.task.envpool_id} observation {key!r} has {value.shape[1]} entries, "
                    f"the layout of {self.task.name} expects {size}")
            parts.append(value)
        state = np.concatenate(parts, axis=1).astype(np.float32)
        return state if self._select is None else state[:, self._select]

    def reset(self) -> TimeStep:
        """Starts a new episode in every env: first=True, reward 0, discount 1, last=False."""
        self._check_open()
        ts = self._env.reset(self._all_ids)
        ids = np.asarray(ts.observation.env_id)
        frame = np.empty((self.num_envs,) + self.frame_shape, self.frame_dtype)
        frame[ids] = self._frames(ts.observation)
        self._frame = frame
        self._needs_reset = np.zeros(self.num_envs, bool)
        n = self.num_envs
        self._return = np.zeros(n, np.float64)
        return TimeStep(frame=frame.copy(), reward=np.zeros(n, np.float32),
                        discount=np.ones(n, np.float32), first=np.ones(n, bool),
                        last=np.zeros(n, bool), episode_return=np.zeros(n, np.float32))

    def _check_action(self, action) -> np.ndarray:
        action = np.asarray(action)
        expected = (self.num_envs, self.action_dim)
        if action.shape != expected:
            raise ValueError(f"action must have shape [num_envs, action_dim] = {list(expected)}, "
                             f"got {list(action.shape)}")
        if not np.issubdtype(action.dtype, np.floating):
            raise ValueError(f"action must be a float array in [-1, 1], got dtype {action.dtype}")
        action = action.astype(np.float64)
        if not np.all(np.isfinite(action)):
            raise ValueError("action contains NaN or inf")
        if np.any(np.abs(action) > 1.0 + 1e-6):
            raise ValueError(f"action must lie in [-1, 1], got values in "
                             f"[{action.min():.4g}, {action.max():.4g}]")
        action = np.clip(action, -1.0, 1.0)
        if self._rescale:
            action = self.env_action_low + (action + 1.0) * 0.5 * (
                self.env_action_high - self.env_action_low)
        return action

    def step(self, action: np.ndarray) -> TimeStep:
        """One agent step of every env.

        Args:
          action: [N, A] float in [-1, 1]; row i is ignored for an env whose previous step was last.

        Returns:
          TimeStep; reward is summed (float64, then cast to float32) over the <= action_repeat env
          steps actually taken.
        """
        self._check_open()
        if self._frame is None:
            raise RuntimeError("call reset() before step()")
        action = self._check_action(action)
        n = self.num_envs
        frame = self._frame  # updated in place per env below
        reward = np.zeros(n, np.float64)
        discount = np.ones(n, np.float64)
        first = self._needs_reset.copy()
        last = np.zeros(n, bool)

        if first.any():
            # envpool auto-resets an env stepped after its last step (its action is ignored).
            ids = np.flatnonzero(first).astype(np.int32)
            ts = self._env.step(action[ids], ids)
            got = np.asarray(ts.observation.env_id)
            if not np.all(np.asarray(ts.step_type) == _FIRST):
                raise RuntimeError(f"envpool did not auto-reset envs {got.tolist()}")
            frame[got] = self._frames(ts.observation)

        for _ in range(self.action_repeat):
            ids = np.flatnonzero(~first & ~last).astype(np.int32)
            if ids.size == 0:
                break
            ts = self._env.step(action[ids], ids)
            got = np.asarray(ts.observation.env_id)
            frame[got] = self._frames(ts.observation)
            reward[got] += np.asarray(ts.reward, np.float64)
            discount[got] *= np.asarray(ts.discount, np.float64)
            last[got] = np.asarray(ts.step_type) == _LAST

        self._needs_reset = last.copy()
        self._return[first] = 0.0
        self._return += reward
        return TimeStep(frame=frame.copy(), reward=reward.astype(np.float32),
                        discount=discount.astype(np.float32), first=first, last=last,
                        episode_return=self._return.astype(np.float32))


    def __repr__(self):
        return (f"DMCEnv(task={self.task.name!r}, num_envs={self.num_envs}, "
                f"action_repeat={self.action_repeat}, pixels={self.pixels}, obs={self.obs!r}, "
                f"frame_shape={self.frame_shape})")


def make_eval_env(task: str, num_episodes: int, seed: int, pixels: bool = False,
                  obs: str = "full", size: int = 108,
                  action_repeat: int | None = None) -> DMCEnv:
    """A DMCEnv with one env per evaluation episode (num_envs = num_episodes).

    After `reset()`, stepping until every env has returned `last` once (1000 / action_repeat agent
    steps) yields exactly `num_episodes` complete episodes.
    """
    return DMCEnv(task, num_envs=num_episodes, seed=seed, pixels=pixels, obs=obs, size=size,
                  action_repeat=action_repeat)
