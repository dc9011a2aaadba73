"""Distributional Rainbow on envpool Atari (or CartPole) through the shared run loop
(`flare_jax.loop`): its config, its environments and its per-seed device functions (DQN Zoo's
protocol).

    config = RainbowTrainConfig(game="pong", run=RunConfig(seeds=(0, 1, 2), out_dir="runs/pong"))
    result = loop.run(RainbowTrainer, config)

Per loop step (one `env.step` of every env), for each seed: the new frames go into the
prioritised replay and the acting stacks; once `min_replay` transitions are stored, one update
per `learn_period_frames` frames runs (sample with importance weights, update, write the new
priorities back; `learn`, a `lax.scan`); then the agent acts with fresh network noise.

Units: everything the reference counts in *frames* (the training budget, the learn period, the
evaluation phases, the 108k-frame episode cap) is in frames per seed here too; an Atari agent
step is 4 frames (`atari.FRAMES_PER_STEP`), a CartPole step 1. Replay capacity and `min_replay`
are in transitions per seed; checkpoint and log cadences in agent steps; the hard target copy in
updates. DQN Zoo's protocol alternates training phases of `eval_every_frames` with evaluation
phases of `eval_frames` (epsilon `eval_epsilon`, noise still sampled); the reported score is the
mean raw return of the episodes completed in an evaluation phase.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from agents import rainbow
from flare_jax import loop, mesh as mesh_lib, video
from flare_jax.data import prioritized as per, replay as rp, stacking
from flare_jax.envs.atari import FRAMES_PER_STEP, GAMES, GYM_TASKS, AtariEnv, GymVectorEnv, get_game
from flare_jax.loop import RunConfig

Array = jax.Array
EVAL_SEED_OFFSET = 500
RESUME_SEED_STRIDE = 100_003
VIDEO_SEED_OFFSET = 900    # the video env of the first seed s: s * 1000 + 900 (+ resumes x stride)
VIDEO_GYM_TASKS = ("CartPole-v1", "CartPole-v0")   # vector tasks with a (schematic) picture


def _f(default, help_: str, **extra):
    return dataclasses.field(default=default, metadata=dict(help=help_, **extra))


@dataclasses.dataclass(frozen=True)
class RainbowTrainConfig:
    """A Rainbow run; defaults are DQN Zoo's Rainbow protocol with the Flare torso on Pong."""
    game: str = _f("pong", "Atari game (snake_case, e.g. pong, breakout) or a vector task",
                   choices=tuple(sorted(GAMES)) + GYM_TASKS)
    frames: int = _f(100_000_000, "training frames per seed (Atari: 4 per agent step)")
    num_envs: int = _f(4, "parallel training envs per seed")
    eval_every_frames: int = _f(1_000_000, "training frames between evaluation phases")
    eval_frames: int = _f(500_000, "frames per evaluation phase (per seed)")
    eval_envs: int = _f(4, "parallel evaluation envs per seed")
    learn_period_frames: int = _f(16, "frames per update (over all envs of a seed)")
    batch_size: int = _f(32, "batch size")
    replay_capacity: int = _f(1_000_000, "replay capacity per seed, in transitions")
    min_replay: int = _f(20_000, "transitions stored before learning starts")
    n_step: int = _f(3, "n-step returns")
    discount: float = _f(0.99, "discount per agent step")
    priority_exponent: float = _f(0.5, "PER priority exponent alpha")
    importance_start: float = _f(0.4, "PER importance exponent beta at the start (annealed to the end value)")
    importance_end: float = _f(1.0, "PER importance exponent beta at the end of training")
    uniform_mix: float = _f(1e-3, "probability of a uniform draw in PER sampling")
    max_episode_frames: int = _f(108_000, "Atari episode cap in frames")
    train_epsilon: float = _f(0.0, "epsilon-greedy exploration while training (noisy nets explore)")
    eval_epsilon: float = _f(0.0, "epsilon during evaluation")
    rainbow: rainbow.RainbowConfig = dataclasses.field(default_factory=rainbow.RainbowConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self):
        if self.game not in GYM_TASKS:
            get_game(self.game)   # raises with the valid names
        for name in ("num_envs", "frames", "eval_every_frames", "eval_frames", "batch_size",
                     "replay_capacity", "learn_period_frames", "eval_envs", "n_step",
                     "max_episode_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frames % self.frames_per_step:
            raise ValueError(f"frames ({self.frames:,d}) must be a multiple of the frame skip "
                             f"({self.frames_per_step} frames per agent step of {self.game})")
        if self.min_replay < self.batch_size:
            raise ValueError(f"min_replay ({self.min_replay}) must be >= batch_size ({self.batch_size})")
        if self.replay_capacity < self.min_replay:
            raise ValueError(f"replay_capacity ({self.replay_capacity}) must be >= min_replay "
                             f"({self.min_replay})")
        for name in ("discount", "uniform_mix", "importance_start", "importance_end",
                     "train_epsilon", "eval_epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.priority_exponent < 0:
            raise ValueError(f"priority_exponent must be >= 0, got {self.priority_exponent}")
        if self.run.video_every and self.vector_obs and self.game not in VIDEO_GYM_TASKS:
            raise ValueError(f"--video_every: no pictures for {self.game!r}; videos exist for the "
                             f"Atari games and {', '.join(VIDEO_GYM_TASKS)} (or --video_every=0)")
        if self.vector_obs != (self.rainbow.torso == "mlp"):
            raise ValueError(f"torso {self.rainbow.torso!r} does not fit {self.game!r}: use "
                             "--torso=mlp for vector observations and atari_flare or "
                             "atari_baseline for Atari")

    @property
    def vector_obs(self) -> bool:
        return self.game in GYM_TASKS

    @property
    def frames_per_step(self) -> int:
        return 1 if self.vector_obs else FRAMES_PER_STEP


def learn(per_config: per.PrioritizedConfig, batch_size: int, agent: rainbow.RainbowState,
          replay: per.PrioritizedState, key: Array, n: int, beta: Array,
          axis_name: Optional[str] = None):
    """n Rainbow updates, each on a fresh prioritised batch, with the new priorities written
    back before the next (one `lax.scan`). With `axis_name` (a data axis): this shard's replay
    and share of the batch, stratified PER (`prioritized`). Returns (agent, replay, metrics [n])."""
    def body(carry, k):
        agent, replay = carry
        k_sample, k_update = jax.random.split(k)
        batch, weights, _ = per.sample(per_config, replay, mesh_lib.shard_key(k_sample, axis_name),
                                       batch_size, beta, axis_name)
        agent, metrics, priorities = rainbow.update(agent, batch, weights, k_update, axis_name)
        replay = per.update_priorities(per_config, replay, batch.env, batch.slot, priorities,
                                       axis_name)
        return (agent, replay), metrics

    (agent, replay), metrics = jax.lax.scan(body, (agent, replay), jax.random.split(key, n))
    return agent, replay, metrics


class RainbowTrainer(loop.Trainer):
    """The Rainbow side of `flare_jax.loop` for a RainbowTrainConfig (S seeds, E envs each)."""
    name = "rainbow"
    config_cls = RainbowTrainConfig
    resumable = ("frames",)

    def __init__(self, config: RainbowTrainConfig, spec: loop.EnvSpec, data_shards: int = 1):
        self.config, self.spec, self.data_shards = config, spec, data_shards
        self.label = config.game
        net = rainbow.make_network(config.rainbow, spec.num_actions)
        self.num_frames = net.torso.num_frames
        self.frame_shape = tuple(spec.frame_shape) + ((1,) if len(spec.frame_shape) == 2 else ())
        self.per_config = per.PrioritizedConfig(
            replay=rp.ReplayConfig(capacity=-(-config.replay_capacity // data_shards),  # a shard's
                                   frame_shape=self.frame_shape, action_shape=(),
                                   num_envs=config.num_envs // data_shards, stack=self.num_frames,
                                   frame_dtype=spec.frame_dtype, action_dtype=jnp.int32, pad="zeros",
                                   n_step=config.n_step, discount=config.discount),
            alpha=config.priority_exponent, uniform_mix=config.uniform_mix)
        self.obs_spec = jax.ShapeDtypeStruct((self.num_frames,) + self.frame_shape, spec.frame_dtype)
        self.replay_nbytes = per.nbytes(self.per_config)
        self.replay_summary = "prioritised " + rp.describe(self.per_config.replay)
        self.eval_frames = config.eval_frames
        e, run = config.num_envs, config.run
        fpi = e * config.frames_per_step
        eval_every = max(1, config.eval_every_frames // fpi)
        self.schedule = loop.Schedule(
            iterations=-(-config.frames // fpi), agent_steps_per_iteration=e,
            units_per_iteration=fpi, unit="frames",
            warmup=max(0, -(-(config.min_replay - e) // e)), random_until=0,
            updates_per_iteration=fpi / config.learn_period_frames, update_every=1,
            eval_every=eval_every, log_every=loop.agent_steps_cadence(run.log_every, e, eval_every),
            checkpoint_every=loop.agent_steps_cadence(run.checkpoint_every, e, eval_every))

    @classmethod
    def eval_envs_per_seed(cls, config: RainbowTrainConfig) -> int:
        return config.eval_envs

    @classmethod
    def make_env(cls, config: RainbowTrainConfig, role: str, resumes: int = 0, members=None):
        n = config.num_envs if role == "train" else config.eval_envs
        members = members or [(i, j) for i in range(len(config.run.seeds)) for j in range(n)]
        offset = (0 if role == "train" else EVAL_SEED_OFFSET) + RESUME_SEED_STRIDE * resumes
        seeds = [config.run.seeds[i] * 1000 + offset + j for i, j in members]
        if config.vector_obs:
            return GymVectorEnv(config.game, num_envs=len(seeds), seed=seeds)
        return AtariEnv(config.game, num_envs=len(seeds), seed=seeds,
                        max_episode_frames=config.max_episode_frames)

    @classmethod
    def make_video_env(cls, config: RainbowTrainConfig, resumes: int = 0):
        """The first seed's video env (loop.Trainer.make_video_env): Atari, a one-env AtariEnv
        whose 84 x 84 grey observation frames are the pictures (as RGB); CartPole, a one-env
        GymVectorEnv drawn schematically from its state (`video.draw_cartpole`: no renderer
        exists for envpool's classic-control tasks)."""
        seed = config.run.seeds[0] * 1000 + VIDEO_SEED_OFFSET + RESUME_SEED_STRIDE * resumes
        if config.vector_obs:
            if config.game not in VIDEO_GYM_TASKS:
                raise ValueError(f"no pictures for {config.game!r}: videos exist for the Atari "
                                 f"games and {', '.join(VIDEO_GYM_TASKS)}")
            return video.ObservationVideoEnv(GymVectorEnv(config.game, num_envs=1, seed=seed),
                                             video.draw_cartpole, "drawn schematically from the state")
        env = AtariEnv(config.game, num_envs=1, seed=seed, max_episode_frames=config.max_episode_frames)
        return video.ObservationVideoEnv(env, video.to_rgb, "the agent's grey frames")

    def describe(self, env) -> str:
        c = self.config
        return (f"{c.game}: {env.num_actions} actions, torso {c.rainbow.torso}, seeds "
                f"{list(c.run.seeds)}, {c.num_envs} envs per seed, {c.frames:,d} training frames "
                f"({c.frames_per_step} frames per agent step), one update per "
                f"{c.learn_period_frames} frames")

    def init_agent(self, key):
        return rainbow.init(key, self.obs_spec, self.spec.num_actions, self.config.rainbow)

    def init_replay(self):
        return per.init(self.per_config)

    def store(self, frame):
        return frame.reshape(frame.shape[:1] + self.frame_shape).astype(self.spec.frame_dtype)

    def add(self, replay, frame, action, reward, discount, first):
        return per.add(self.per_config, replay, frame, action, reward, discount, first)

    def stack_init(self, frame):
        return stacking.init(frame, self.num_frames, "zeros")

    def stack_push(self, stack, frame, first):
        return stacking.push(stack, frame, first, "zeros")

    def learn(self, agent, replay, key, n, update_count, progress, axis_name=None):
        del update_count
        c = self.config
        beta = per.beta_schedule(progress, c.importance_start, c.importance_end)
        return learn(self.per_config, c.batch_size // self.data_shards, agent, replay, key, n, beta,
                     axis_name)

    def act(self, agent, stack, key, mode):
        if mode == "random":
            return jax.random.randint(key, (stack.shape[0],), 0, self.spec.num_actions, jnp.int32)
        epsilon = self.config.eval_epsilon if mode == "eval" else self.config.train_epsilon
        return rainbow.act(agent, stack, key, epsilon)


def train(config: RainbowTrainConfig, log=print, command=None) -> loop.RunResult:
    """`loop.run(RainbowTrainer, config)`."""
    return loop.run(RainbowTrainer, config, log=log, command=command)
