"""RAD-SAC on DeepMind Control through the shared run loop (`flare_jax.loop`): its config, its
environments and its per-seed device functions.

    config = TrainConfig(task="cartpole_swingup", pixels=False,
                         sac=sac.SACConfig(encoder="state_full", augmentation="none"),
                         run=RunConfig(seeds=(0, 1, 2), out_dir="runs/cartpole"))
    result = loop.run(SACTrainer, config)

Per loop step (one `env.step` of every env), for each seed: the new frames go into the replay
and the acting stacks; once `init_steps` agent steps are stored, `updates_per_step` SAC updates
per agent step run (each on a fresh uniform batch: sampling, augmentation and `sac.update` in one
`lax.scan`, `learn`); then the policy acts (uniformly random actions before `init_steps`).

Units: `env_steps` counts environment steps per seed (agent steps x action repeat); replay
capacity, `init_steps`, `eval_every`, checkpoint and log cadences are in agent steps per seed
(one transition of one env); `update_every` in loop steps.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from agents import sac
from flare_jax import loop, mesh as mesh_lib, video
from flare_jax.data import augment, replay as rp, stacking
from flare_jax.envs import dmc_tasks
from flare_jax.envs.dmc import DMCEnv
from flare_jax.loop import RunConfig

Array = jax.Array
STORE_CROP = 100           # pixels are stored as the 100x100 centre of the render
EVAL_SEED_OFFSET = 500     # env j of seed s: s * 1000 + j (+ 500 for evaluation envs)
RESUME_SEED_STRIDE = 100_003   # a resumed run's envs: + resumes x this, new episodes
VIDEO_SEED_OFFSET = 900    # the video env of the first seed s: s * 1000 + 900 (+ resumes x stride)


def _f(default, help_: str, **extra):
    return dataclasses.field(default=default, metadata=dict(help=help_, **extra))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A SAC run; defaults are the reference's (Flare from pixels, the paper's DMC protocol)."""
    task: str = _f("walker_run", "DMC task", choices=tuple(sorted(dmc_tasks.TASKS)))
    pixels: bool = _f(True, "learn from pixels (else from states)")
    env_steps: int = _f(500_000, "environment steps per seed (agent steps x action repeat)")
    action_repeat: Optional[int] = _f(None, "env steps per agent step (default: the task's)")
    num_envs: int = _f(1, "parallel environments per seed")
    batch_size: int = _f(128, "SAC batch size")
    replay_capacity: int = _f(100_000, "replay capacity per seed, in transitions")
    init_steps: int = _f(10_000, "agent steps of uniform random actions before learning")
    updates_per_step: int = _f(1, "SAC updates per agent step")
    update_every: int = _f(1, "fuse updates: run the updates of N loop steps in one compiled call "
                              "every N loop steps")
    eval_every: int = _f(10_000, "agent steps between evaluations")
    eval_episodes: int = _f(10, "deterministic episodes per evaluation (one env each)")
    max_episode_steps: Optional[int] = _f(None, "episode length in env steps (default: the "
                                                "task's 1000; for quick checks)")
    sac: sac.SACConfig = dataclasses.field(default_factory=sac.SACConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self):
        dmc_tasks.get_task(self.task)  # raises with the valid names
        for name in ("env_steps", "num_envs", "batch_size", "replay_capacity", "eval_every",
                     "eval_episodes", "updates_per_step", "update_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.init_steps < 0:
            raise ValueError(f"init_steps must be >= 0, got {self.init_steps}")
        if self.action_repeat is not None and self.action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1 (or unset: the task's "
                             f"{dmc_tasks.get_task(self.task).action_repeat}), got {self.action_repeat}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {self.max_episode_steps}")
        if self.replay_capacity < self.batch_size:
            raise ValueError(f"replay_capacity ({self.replay_capacity}) must be >= batch_size "
                             f"({self.batch_size})")
        kind = self.sac.make_encoder().observation
        if self.pixels and kind != "pixels":
            raise ValueError(f"encoder {self.sac.encoder!r} takes {kind}-state observations, not "
                             f"pixels: use --pixels=false, or a pixel encoder ("
                             f"{', '.join(sac.PIXEL_ENCODERS)})")
        if not self.pixels and kind == "pixels":
            raise ValueError(f"encoder {self.sac.encoder!r} takes pixels but --pixels=false: use "
                             f"--pixels=true, or a state encoder ({', '.join(sac.STATE_ENCODERS)})")
        if self.pixels and self.sac.image_size < STORE_CROP:
            raise ValueError(f"image_size must be >= {STORE_CROP} (frames are stored as their "
                             f"{STORE_CROP} px centre), got {self.sac.image_size}")

    @property
    def repeat(self) -> int:
        return self.action_repeat or dmc_tasks.get_task(self.task).action_repeat


def learn(replay_config: rp.ReplayConfig, batch_size: int, agent: sac.SACState, replay, key: Array,
          n: int, count: Array, axis_name: Optional[str] = None):
    """n SAC updates, each on a fresh uniform batch of `replay` (one `lax.scan`).

    `count` ([] int32, not batched under a seed vmap) is the number of updates before these; it
    decides the every-2 actor and target steps. With `axis_name` (a data axis) `replay` is this
    shard's replay and `batch_size` its share of the batch; `key` is the same on every shard
    (the update's), the sampling key is the shard's own. Returns (agent, replay, metrics [n]).
    """
    def body(carry, k):
        agent, i = carry
        k_sample, k_update = jax.random.split(k)
        batch = rp.sample(replay_config, replay, mesh_lib.shard_key(k_sample, axis_name), batch_size)
        agent, metrics = sac.update(agent, batch, k_update, count=i, axis_name=axis_name)
        return (agent, i + 1), metrics

    (agent, _), metrics = jax.lax.scan(body, (agent, count), jax.random.split(key, n))
    return agent, replay, metrics


class SACTrainer(loop.Trainer):
    """The SAC side of `flare_jax.loop` for a TrainConfig (S seeds, E envs per seed)."""
    name = "sac"
    config_cls = TrainConfig
    resumable = ("env_steps",)

    def __init__(self, config: TrainConfig, spec: loop.EnvSpec, data_shards: int = 1):
        self.config, self.spec, self.data_shards = config, spec, data_shards
        self.encoder = config.sac.make_encoder()
        self.pixels = config.pixels
        self.label = config.task
        t = self.encoder.num_frames
        store_shape = ((STORE_CROP, STORE_CROP, spec.frame_shape[-1]) if self.pixels
                       else tuple(spec.frame_shape))
        self.replay_config = rp.ReplayConfig(   # one data shard's
            capacity=-(-config.replay_capacity // data_shards), frame_shape=store_shape,
            action_shape=spec.action_shape, num_envs=config.num_envs // data_shards, stack=t,
            frame_dtype=spec.frame_dtype,
            action_dtype=jnp.float32, pad="repeat_first", n_step=1, discount=0.99)
        self.obs_spec = jax.ShapeDtypeStruct((t,) + store_shape, spec.frame_dtype)
        self.action_spec = jax.ShapeDtypeStruct(spec.action_shape, jnp.float32)
        self.replay_nbytes = self.replay_config.nbytes
        self.replay_summary = rp.describe(self.replay_config)
        e, run = config.num_envs, config.run
        eval_every = -(-config.eval_every // e)
        self.schedule = loop.Schedule(
            iterations=-(-config.env_steps // (config.repeat * e)), agent_steps_per_iteration=e,
            units_per_iteration=config.repeat * e, unit="env steps",
            warmup=-(-config.init_steps // e), random_until=-(-config.init_steps // e),
            updates_per_iteration=float(config.updates_per_step * e),
            update_every=config.update_every, eval_every=eval_every,
            log_every=loop.agent_steps_cadence(run.log_every, e, eval_every),
            checkpoint_every=loop.agent_steps_cadence(run.checkpoint_every, e, eval_every))

    @classmethod
    def eval_envs_per_seed(cls, config: TrainConfig) -> int:
        return config.eval_episodes

    @classmethod
    def make_env(cls, config: TrainConfig, role: str, resumes: int = 0, members=None) -> DMCEnv:
        n = config.num_envs if role == "train" else config.eval_episodes
        members = members or [(i, j) for i in range(len(config.run.seeds)) for j in range(n)]
        offset = (0 if role == "train" else EVAL_SEED_OFFSET) + RESUME_SEED_STRIDE * resumes
        kind = config.sac.make_encoder().observation
        seeds = [config.run.seeds[i] * 1000 + offset + j for i, j in members]
        return DMCEnv(config.task, num_envs=len(seeds), seed=seeds, pixels=config.pixels,
                      obs="full" if kind == "pixels" else kind, size=config.sac.image_size,
                      action_repeat=config.repeat, max_episode_steps=config.max_episode_steps)

    @classmethod
    def make_video_env(cls, config: TrainConfig, resumes: int = 0):
        """The first seed's video env (loop.Trainer.make_video_env). From pixels: a one-env
        DMCEnv whose observation frames (the agent's view, `image_size` px, the last render of
        each agent step) are the pictures; from states: `video.DMCRenderEnv` on dm_control
        (envpool's state envs do not render), the same task, state layout, action repeat,
        time limit and action rescaling, rendered at 240 x 320 px from the task's camera."""
        seed = config.run.seeds[0] * 1000 + VIDEO_SEED_OFFSET + RESUME_SEED_STRIDE * resumes
        if config.pixels:
            env = DMCEnv(config.task, num_envs=1, seed=seed, pixels=True, obs="full",
                         size=config.sac.image_size, action_repeat=config.repeat,
                         max_episode_steps=config.max_episode_steps)
            return video.ObservationVideoEnv(env, lambda frame: frame, "the agent's pixel frames")
        return video.DMCRenderEnv(config.task, seed=seed, obs=config.sac.make_encoder().observation,
                                  action_repeat=config.repeat,
                                  max_episode_steps=config.max_episode_steps)

    def describe(self, env) -> str:
        c = self.config
        what = "pixels" if c.pixels else f"{env.obs} state"
        return (f"task {c.task} ({what}, action repeat {c.repeat}), encoder {c.sac.encoder}, seeds "
                f"{list(c.run.seeds)}, {c.env_steps:,d} env steps = {self.schedule.iterations:,d} "
                f"loop steps x {c.num_envs} env(s) per seed")

    def init_agent(self, key):
        return sac.init(key, self.obs_spec, self.action_spec, self.config.sac)

    def init_replay(self):
        return rp.init(self.replay_config)

    def store(self, frame):
        return augment.center_crop(frame, STORE_CROP) if self.pixels else frame

    def add(self, replay, frame, action, reward, discount, first):
        return rp.add(self.replay_config, replay, frame, action, reward, discount, first)

    def stack_init(self, frame):
        return stacking.init(frame, self.encoder.num_frames)

    def stack_push(self, stack, frame, first):
        return stacking.push(stack, frame, first)

    def learn(self, agent, replay, key, n, update_count, progress, axis_name=None):
        del progress
        return learn(self.replay_config, self.config.batch_size // self.data_shards, agent, replay,
                     key, n, update_count, axis_name)

    def act(self, agent, stack, key, mode):
        if mode == "random":
            return jax.random.uniform(key, (stack.shape[0],) + self.spec.action_shape,
                                      minval=-1.0, maxval=1.0)
        return sac.act(agent, stack, key, deterministic=mode == "eval")


def train(config: TrainConfig, log=print, command=None) -> loop.RunResult:
    """`loop.run(SACTrainer, config)`."""
    return loop.run(SACTrainer, config, log=log, command=command)

