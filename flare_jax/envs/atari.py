"""Vectorised Atari environments on envpool with the DQN Zoo / Flare preprocessing (reference.md 4).

One `AtariEnv.step` is one *agent step* = `frames_per_step` = 4 emulator *frames* (fewer only when
the game ends inside the 4). Training budgets, learning periods and episode caps in the reference
are in frames: frames = 4 x agent steps.

Preprocessing, all done by envpool's C++ Atari env (gymnasium API), configured as:
- `frame_skip=4`: the action is repeated for 4 frames, the rewards of the 4 are summed and the
  observation is the pixel-wise max of the last 2 frames (envpool max-pools the last two raw
  210x160 frames before resizing, as DQN Zoo does).
- `gray_scale=True, img_height=84, img_width=84` (INTER_AREA resize, `use_inter_area_resize`).
- `stack_num=1`: single frames. Frame stacks (4, zero-padded at episode start) are built by the
  agent / replay, not the env.
- `repeat_action_probability=0.0`: no sticky actions; `full_action_space=False`: minimal action
  set (`num_actions` depends on the game, e.g. pong 6, breakout 4).
- `noop_max=30`: at every reset envpool takes a uniform 1..noop_max no-op *frames* (raw ALE
  frames, not agent steps), as DQN Zoo's random no-op wrapper (1 to 30).
- `use_fire_reset=False`: envpool's default (True) presses FIRE after the no-ops for games whose
  minimal action set contains FIRE (and takes one no-op less); DQN Zoo presses nothing.
- `max_episode_steps = max_episode_frames // 4`: envpool counts this cap in agent steps (its
  `elapsed_step`, incremented once per 4-frame step; the reset no-ops are not counted), so the
  108,000-frame cap is 27,000 agent steps (envpool's registered default is also 27000).
- `episodic_life=False`: a life loss does not end or reset the game.
- `reward_clip=False`: envpool returns the raw score change; this wrapper clips a copy to [-1, 1]
  for learning (`reward`) and keeps the raw one (`raw_reward`, `episode_return`) for reporting.
- `zero_discount_on_life_loss=False`: envpool's own option is NOT used, because in envpool 1.2.5 it
  sets discount = (lives unchanged and not done), i.e. it also zeroes the discount at the
  episode cap (truncation) and on a life *gain*. This wrapper computes the discount itself:
  0 where the game is over (ALE game_over, envpool info "terminated") or the lives counter
  decreased during the step, else 1. So truncation at the cap gives discount 1 (bootstrap) unless
  the game also ended or a life was lost on that step.

Auto-reset follows envpool and the sibling DMC wrapper: after a step that returned `last[i]`, the
next `step` call returns env i's new first frame (`first[i] = True`, rewards 0, discount 1,
episode_return 0, its action ignored); the other envs step normally in the same call.

Speed through this wrapper on the 2-core development machine (CPU only, shared with a training
job and another developer: load average 3.5-3.8 during the runs, so these are lower bounds),
envpool 1.2.5, random actions, 3-4 s per measurement, totals over all envs:
- Pong, 1 env: 1,390-1,560 agent steps/s (5,600-6,200 frames/s); raw envpool ~1,800.
- Pong, 8 envs: 1,400-2,100 agent steps/s (5,600-8,400 frames/s); raw envpool the same, i.e.
  the wrapper's bookkeeping is negligible there. With 2 busy cores more envs barely help;
  reference.md section 5 saw 2-4k agent steps/s with 8-16 envs on a quieter machine.

`GymVectorEnv` gives the same TimeStep for envpool's classic-control tasks with discrete actions
(CartPole-v1 by default) for fast learning checks on vector observations.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from flare_jax.envs.lifetime import EnvLifetime
from flare_jax.envs.rendering import preload_egl

# The 8 games of the paper's Atari experiments (reference.md section 4).
PAPER_GAMES = ("defender", "phoenix", "berzerk", "montezuma_revenge", "assault", "breakout",
               "seaquest", "tutankham")

# The Atari-57 benchmark, snake_case as envpool's ROM names.
ATARI_57 = (
    "alien", "amidar", "assault", "asterix", "asteroids", "atlantis", "bank_heist", "battle_zone",
    "beam_rider", "berzerk", "bowling", "boxing", "breakout", "centipede", "chopper_command",
    "crazy_climber", "defender", "demon_attack", "double_dunk", "enduro", "fishing_derby",
    "freeway", "frostbite", "gopher", "gravitar", "hero", "ice_hockey", "jamesbond", "kangaroo",
    "krull", "kung_fu_master", "montezuma_revenge", "ms_pacman", "name_this_game", "phoenix",
    "pitfall", "pong", "private_eye", "qbert", "riverraid", "road_runner", "robotank", "seaquest",
    "skiing", "solaris", "space_invaders", "star_gunner", "surround", "tennis", "time_pilot",
    "tutankham", "up_n_down", "venture", "video_pinball", "wizard_of_wor", "yars_revenge",
    "zaxxon")

# snake_case game name -> envpool task id ("montezuma_revenge" -> "MontezumaRevenge-v5").
GAMES = {name: "".join(part.capitalize() for part in name.split("_")) + "-v5"
         for name in ATARI_57}

FRAMES_PER_STEP = 4
FRAME_SHAPE = (84, 84)
DEFAULT_MAX_EPISODE_FRAMES = 108_000

# Discrete-action classic-control tasks of envpool usable with GymVectorEnv.
GYM_TASKS = ("CartPole-v1", "CartPole-v0", "Acrobot-v1", "MountainCar-v0")
_CARTPOLE_X_LIMIT = 2.4                           # gym/envpool termination bounds
_CARTPOLE_THETA_LIMIT = 12 * 2 * np.pi / 360


def get_game(name: str) -> str:
    """The envpool task id of a snake_case game name, e.g. "breakout" -> "Breakout-v5".

    Raises ValueError listing the valid names.
    """
    if name not in GAMES:
        raise ValueError(f"unknown Atari game {name!r}; valid games: {', '.join(sorted(GAMES))}")
    return GAMES[name]


@dataclasses.dataclass(frozen=True)
class AtariTimeStep:
    """One agent step of N environments (also used by GymVectorEnv).

    Attributes:
      frame: [N, 84, 84] uint8 grey, the newest frame (max over the last 2 of the 4 frames);
        GymVectorEnv: [N, D] float32 observations.
      reward: [N] float32 raw reward clipped to [-1, 1], for learning (0 on a first step).
        GymVectorEnv: equal to raw_reward (no clipping).
      raw_reward: [N] float32 game score change over the step's frames (0 on a first step).
      discount: [N] float32: 0 at a game over (termination) or a life loss, else 1 (also 1 at a
        truncation by the episode cap, and on first steps).
      first: [N] bool, the frame is the first of a new episode (after a reset).
      last: [N] bool, the episode ended with this frame (game over / termination, or the cap).
      episode_return: [N] float32 sum of raw_reward over the episode so far, this step included
        (0 on a first step); at `last` it is the episode's score.
    """
    frame: np.ndarray
    reward: np.ndarray
    raw_reward: np.ndarray
    discount: np.ndarray
    first: np.ndarray
    last: np.ndarray
    episode_return: np.ndarray


def _import_envpool():
    # envpool must be imported after libEGL is preloaded for DMC pixels to render later in the
    # same process (rendering.py); Atari itself does not need EGL, so a missing libEGL is fine.
    try:
        preload_egl()
    except RuntimeError:
        pass
    import envpool  # pylint: disable=g-import-not-at-top
    return envpool


def _check_seed(seed, num_envs: int):
    """int seed (env i gets envpool's seed + i) or a sequence of num_envs ints."""
    if np.ndim(seed) == 0:
        return int(seed)
    seed = [int(x) for x in np.asarray(seed).reshape(-1)]
    if len(seed) != num_envs:
        raise ValueError(f"got {len(seed)} seeds for num_envs={num_envs}")
    return seed


class _DiscreteVectorEnv(EnvLifetime):
    """Shared lockstep bookkeeping over an envpool gymnasium env with a Discrete action space.

    Subclasses set `self._env`, `num_envs`, `num_actions`, `frame_shape`, `frame_dtype` and
    implement `_frames(obs)` and `_outcome(ids, obs, reward, terminated, truncated, info)`;
    `_on_reset(ids, info)` is called by `reset()` only (auto-resets go through `_outcome`).
    """

    num_envs: int
    num_actions: int
    frame_shape: tuple
    frame_dtype: np.dtype

    def _init_state(self):
        self._all_ids = np.arange(self.num_envs, dtype=np.int32)
        self._frame = None          # [N, *frame_shape] the latest frame of every env
        self._needs_reset = None    # [N] bool: the previous step returned last
        self._return = None         # [N] float64 raw return of the running episodes
        self._mark_open()

    def _frames(self, obs) -> np.ndarray:
        raise NotImplementedError

    def _on_reset(self, ids, info):
        """Hook: per-env state after `reset()` of envs `ids` (B envs, envpool's order)."""

    def _outcome(self, ids, obs, reward, terminated, truncated, info):
        """Per-env results of one envpool step of envs `ids` (B envs, envpool's order).

        Called for every env, auto-reset ones included (their results are then overridden).
        Returns (raw_reward [B] float64, discount [B] float64, last [B] bool).
        """
        raise NotImplementedError

    def _clip(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def reset(self) -> AtariTimeStep:
        """Starts a new episode in every env: first=True, rewards 0, discount 1, last=False."""
        self._check_open()
        obs, info = self._env.reset(self._all_ids)
        ids = np.asarray(info["env_id"])
        frame = np.empty((self.num_envs,) + self.frame_shape, self.frame_dtype)
        frame[ids] = self._frames(obs)
        self._frame = frame
        self._on_reset(ids, info)
        self._needs_reset = np.zeros(self.num_envs, bool)
        self._return = np.zeros(self.num_envs, np.float64)
        n = self.num_envs
        return AtariTimeStep(frame=frame.copy(), reward=np.zeros(n, np.float32),
                             raw_reward=np.zeros(n, np.float32), discount=np.ones(n, np.float32),
                             first=np.ones(n, bool), last=np.zeros(n, bool),
                             episode_return=np.zeros(n, np.float32))

    def _check_action(self, action) -> np.ndarray:
        action = np.asarray(action)
        if action.shape != (self.num_envs,):
            raise ValueError(f"action must have shape [num_envs] = [{self.num_envs}], "
                             f"got {list(action.shape)}")
        if not np.issubdtype(action.dtype, np.integer):
            raise ValueError(f"action must be an integer array with values in "
                             f"[0, {self.num_actions}), got dtype {action.dtype}")
        if action.size and (action.min() < 0 or action.max() >= self.num_actions):
            raise ValueError(f"action values must lie in [0, num_actions) = "
                             f"[0, {self.num_actions}), got values in "
                             f"[{action.min()}, {action.max()}]")
        return action.astype(np.int32)

    def step(self, action) -> AtariTimeStep:
        """One agent step of every env.

        Args:
          action: [N] int in [0, num_actions); entry i is ignored for an env whose previous step
            returned last (it is reset instead).
        """
        self._check_open()
        if self._frame is None:
            raise RuntimeError("call reset() before step()")
        action = self._check_action(action)
        n = self.num_envs
        first = self._needs_reset.copy()
        obs, reward, terminated, truncated, info = self._env.step(action, self._all_ids)
        ids = np.asarray(info["env_id"])
        if ids.shape != (n,):
            raise RuntimeError(f"envpool returned {ids.shape} results for {n} envs")
        frame = self._frame
        frame[ids] = self._frames(obs)

        reset = first[ids]
        elapsed = np.asarray(info["elapsed_step"])
        if np.any(elapsed[reset] != 0):
            raise RuntimeError(f"envpool did not auto-reset envs {ids[reset].tolist()}")
        raw, discount, last_b = self._outcome(ids, obs, np.asarray(reward),
                                              np.asarray(terminated, bool),
                                              np.asarray(truncated, bool), info)
        raw = np.where(reset, 0.0, raw)
        discount = np.where(reset, 1.0, discount)
        last_b = np.where(reset, False, last_b)

        raw_reward = np.zeros(n, np.float64)
        disc = np.ones(n, np.float64)
        last = np.zeros(n, bool)
        raw_reward[ids] = raw
        disc[ids] = discount
        last[ids] = last_b
        self._return[first] = 0.0
        self._return += raw_reward
        self._needs_reset = last.copy()
        return AtariTimeStep(frame=frame.copy(),
                             reward=self._clip(raw_reward).astype(np.float32),
                             raw_reward=raw_reward.astype(np.float32),
                             discount=disc.astype(np.float32), first=first, last=last,
                             episode_return=self._return.astype(np.float32))


class AtariEnv(_DiscreteVectorEnv):
    """N Atari games stepped in lockstep; one agent step = 4 frames (module docstring).

    Args:
      game: a name in `GAMES`, e.g. "breakout".
      num_envs: N, the number of parallel environments.
      seed: envpool seed (env i is seeded from seed + i by envpool), or a sequence of num_envs
        seeds, one per env.
      max_episode_frames: episode cap in frames (108,000 = 30 min of play); must be a multiple
        of 4. Reaching it ends the episode by truncation (last=True, discount 1).
      noop_max: 1..noop_max random no-op frames at every reset (>= 1: envpool always takes at
        least one, and envpool 1.2.5 crashes the process with noop_max=0).

    Attributes:
      game, task_id: the snake_case name and the envpool task id.
      num_envs, max_episode_frames, noop_max: as given.
      max_episode_steps: the cap in agent steps (max_episode_frames // 4).
      num_actions: size of the game's minimal action set.
      frame_shape: (84, 84); frame_dtype: uint8; frames_per_step: 4.
      lives: [N] int32 lives counter of every env after the latest reset/step (a copy).
    """

    frames_per_step = FRAMES_PER_STEP

    def __init__(self, game: str, num_envs: int = 1, seed=0,
                 max_episode_frames: int = DEFAULT_MAX_EPISODE_FRAMES, noop_max: int = 30):
        self.task_id = get_game(game)
        self.game = game
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if (not isinstance(max_episode_frames, (int, np.integer)) or max_episode_frames < 4
                or max_episode_frames % FRAMES_PER_STEP):
            raise ValueError(f"max_episode_frames must be a positive multiple of "
                             f"{FRAMES_PER_STEP} (frames, not agent steps), "
                             f"got {max_episode_frames!r}")
        if not isinstance(noop_max, (int, np.integer)) or noop_max < 1:
            raise ValueError(f"noop_max must be an int >= 1 (envpool takes 1..noop_max no-op "
                             f"frames at reset), got {noop_max!r}")
        self.num_envs = int(num_envs)
        self.max_episode_frames = int(max_episode_frames)
        self.max_episode_steps = self.max_episode_frames // FRAMES_PER_STEP
        self.noop_max = int(noop_max)
        self.frame_shape = FRAME_SHAPE
        self.frame_dtype = np.dtype(np.uint8)

        envpool = _import_envpool()
        config = dict(
            stack_num=1, frame_skip=FRAMES_PER_STEP, img_height=FRAME_SHAPE[0],
            img_width=FRAME_SHAPE[1], gray_scale=True, use_inter_area_resize=True,
            noop_max=self.noop_max, use_fire_reset=False, episodic_life=False,
            zero_discount_on_life_loss=False, reward_clip=False, repeat_action_probability=0.0,
            full_action_space=False, max_episode_steps=self.max_episode_steps)
        self._env = envpool.make_gymnasium(self.task_id, num_envs=self.num_envs,
                                           seed=_check_seed(seed, self.num_envs), **config)
        got = {k: self._env.config[k] for k in config}
        if got != config:  # guard against an envpool version ignoring or renaming an option
            raise RuntimeError(f"envpool configured {got}, expected {config}")
        self.num_actions = int(self._env.action_space.n)
        self._lives = np.zeros(self.num_envs, np.int32)
        self._init_state()

    @property
    def lives(self) -> np.ndarray:
        return self._lives.copy()

    def _frames(self, obs) -> np.ndarray:
        obs = np.asarray(obs)  # [B, 1, 84, 84] uint8
        return obs.reshape((obs.shape[0],) + FRAME_SHAPE)

    def _on_reset(self, ids, info):
        self._lives[ids] = np.asarray(info["lives"])

    def _outcome(self, ids, obs, reward, terminated, truncated, info):
        raw = np.asarray(info["reward"], np.float64)  # unclipped (reward_clip=False: == reward)
        game_over = np.asarray(info["terminated"], bool) | terminated
        lives = np.asarray(info["lives"], np.int32)
        life_lost = lives < self._lives[ids]
        self._lives[ids] = lives
        discount = np.where(game_over | life_lost, 0.0, 1.0)
        return raw, discount, terminated | truncated

    def _clip(self, raw: np.ndarray) -> np.ndarray:
        return np.clip(raw, -1.0, 1.0)

    def __repr__(self):
        return (f"AtariEnv(game={self.game!r}, num_envs={self.num_envs}, "
                f"num_actions={self.num_actions}, max_episode_frames={self.max_episode_frames}, "
                f"noop_max={self.noop_max})")


class GymVectorEnv(_DiscreteVectorEnv):
    """N envpool classic-control tasks (gymnasium API) with the AtariTimeStep fields.

    frame is the [N, D] float32 observation; reward == raw_reward (unclipped); discount 0 on
    termination (CartPole: the pole fell or the cart left the track), 1 on truncation (CartPole-v1:
    500 steps). envpool reports a CartPole episode whose pole falls exactly on the cap step as
    truncated; this wrapper gives it discount 0 (the observation is outside the bounds).

    Args:
      task: one of `GYM_TASKS`.
      num_envs: N.
      seed: envpool seed (env i gets seed + i) or a sequence of num_envs seeds.

    Attributes:
      task, num_envs, num_actions; frame_shape (D,); frame_dtype float32; frames_per_step 1.
    """

    frames_per_step = 1

    def __init__(self, task: str = "CartPole-v1", num_envs: int = 1, seed=0):
        if task not in GYM_TASKS:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(GYM_TASKS)}")
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        self.task = task
        self.num_envs = int(num_envs)
        envpool = _import_envpool()
        self._env = envpool.make_gymnasium(task, num_envs=self.num_envs,
                                           seed=_check_seed(seed, self.num_envs))
        self.num_actions = int(self._env.action_space.n)
        with warnings.catch_warnings():  # gymnasium warns on envpool's float64 Box bounds
            warnings.simplefilter("ignore", UserWarning)
            self.frame_shape = tuple(int(d) for d in self._env.observation_space.shape)
        self.frame_dtype = np.dtype(np.float32)
        self._cartpole = task.startswith("CartPole")
        self._init_state()

    def _frames(self, obs) -> np.ndarray:
        return np.asarray(obs, np.float32).reshape((-1,) + self.frame_shape)

    def _outcome(self, ids, obs, reward, terminated, truncated, info):
        failed = terminated
        if self._cartpole:
            obs = np.asarray(obs, np.float64)
            out = ((np.abs(obs[:, 0]) > _CARTPOLE_X_LIMIT)
                   | (np.abs(obs[:, 2]) > _CARTPOLE_THETA_LIMIT))
            failed = terminated | (truncated & out)
        discount = np.where(failed, 0.0, 1.0)
        return np.asarray(reward, np.float64), discount, terminated | truncated

    def __repr__(self):
        return (f"GymVectorEnv(task={self.task!r}, num_envs={self.num_envs}, "
                f"num_actions={self.num_actions}, frame_shape={self.frame_shape})")
