"""The Rainbow training loop: env -> prioritised replay -> update -> log (DQN Zoo protocol).

One jitted device call per agent step of the E envs: add the frames to the prioritised replay,
push them onto the acting stacks, run the due updates (sample with importance weights, update,
write the new priorities back; a `lax.scan`), and pick the next actions with fresh network noise.

Units: everything the reference counts in *frames* (training budget, learn period 16, target
period 32,000, evaluation phases, the 108k-frame episode cap) is in frames here too; an Atari agent
step is 4 frames (`env.frames_per_step`), a CartPole step is 1. Replay capacity and the learning
start (`min_replay`) are in transitions. DQN Zoo's protocol alternates training phases of
`eval_every_frames` with evaluation phases of `eval_frames` (epsilon 0, noise still sampled);
the reported score is the mean raw return of the episodes completed in an evaluation phase.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from agents import rainbow
from flare_jax import prioritized as per
from flare_jax import replay as rp
from flare_jax import stacking
from flare_jax.envs.atari import GYM_TASKS, AtariEnv, GymVectorEnv, get_game
from flare_jax.logging import Progress, RunLogger
from flare_jax.runtime import StallWatchdog, StopRequests, host_to_device

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RainbowTrainConfig:
    env: str = "pong"                    # Atari game (flare_jax.envs.atari.GAMES) or CartPole-v1
    seed: int = 0
    num_envs: int = 4
    train_frames: int = 1_000_000
    eval_every_frames: int = 1_000_000   # training frames per phase
    eval_frames: int = 500_000           # evaluation frames per phase
    eval_envs: int = 4
    learn_period_frames: int = 16        # one update per 16 frames (over all envs)
    batch_size: int = 32
    replay_capacity: int = 1_000_000     # transitions
    min_replay: int = 20_000             # transitions before learning starts
    n_step: int = 3
    discount: float = 0.99
    priority_exponent: float = 0.5
    importance_start: float = 0.4
    importance_end: float = 1.0
    uniform_mix: float = 1e-3
    max_episode_frames: int = 108_000
    train_epsilon: float = 0.0
    eval_epsilon: float = 0.0
    rainbow: rainbow.RainbowConfig = rainbow.RainbowConfig()
    out_dir: Optional[str] = None
    tensorboard: bool = True
    # a step that takes longer than this ends the process with tracebacks (runtime.StallWatchdog);
    # evaluations count as one step. <= 0 disables it.
    stall_seconds: float = 3600.0

    def __post_init__(self):
        if self.env not in GYM_TASKS:
            get_game(self.env)   # raises with the valid names
        for name in ("num_envs", "train_frames", "eval_every_frames", "batch_size",
                     "replay_capacity", "learn_period_frames", "eval_envs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_replay < self.batch_size:
            raise ValueError(f"min_replay ({self.min_replay}) must be >= batch_size ({self.batch_size})")

    @property
    def vector_obs(self) -> bool:
        return self.env in GYM_TASKS


def make_env(config: RainbowTrainConfig, num_envs: int, seed_offset: int = 0):
    seeds = [config.seed * 1000 + seed_offset + j for j in range(num_envs)]
    if config.vector_obs:
        return GymVectorEnv(config.env, num_envs=num_envs, seed=seeds)
    return AtariEnv(config.env, num_envs=num_envs, seed=seeds,
                    max_episode_frames=config.max_episode_frames)


@struct.dataclass
class Carry:
    agent: rainbow.RainbowState
    replay: per.PrioritizedState
    stack: Array                  # [E, T, *frame] storage format (uint8 84x84x1 or float vectors)
    action: Array                 # [E] int32
    key: Array


class RainbowRunner:
    """Jitted device functions for one configuration."""

    def __init__(self, config: RainbowTrainConfig, frame_shape, frame_dtype, num_actions: int):
        self.config = config
        self.torso = config.rainbow  # noqa
        self.num_actions = num_actions
        net = rainbow.make_network(config.rainbow, num_actions)
        self.num_frames = net.torso.num_frames
        self.frame_shape = tuple(frame_shape) + ((1,) if len(frame_shape) == 2 else ())
        self.frame_dtype = frame_dtype
        self.pad = "zeros"
        self.per_config = per.PrioritizedConfig(
            replay=rp.ReplayConfig(capacity=config.replay_capacity, frame_shape=self.frame_shape,
                                   action_shape=(), num_envs=config.num_envs, stack=self.num_frames,
                                   frame_dtype=frame_dtype, action_dtype=jnp.int32, pad=self.pad,
                                   n_step=config.n_step, discount=config.discount),
            alpha=config.priority_exponent, uniform_mix=config.uniform_mix)
        self.obs_spec = jax.ShapeDtypeStruct((self.num_frames,) + self.frame_shape, frame_dtype)
        self._step_fns = {}
        self.act_eval = jax.jit(self._act_eval)
        self.stack_init = jax.jit(lambda f: stacking.init(self._frame(f), self.num_frames, self.pad))
        self.stack_push = jax.jit(lambda s, f, first: stacking.push(s, self._frame(f), first, self.pad))

    def _frame(self, frame):
        return frame.reshape(frame.shape[:1] + self.frame_shape).astype(self.frame_dtype)

    def init(self, key, first_frames) -> Carry:
        k_agent, k_loop = jax.random.split(key)
        agent = rainbow.init(k_agent, self.obs_spec, self.num_actions, self.config.rainbow)
        e = self.config.num_envs
        carry = Carry(agent=agent, replay=per.init(self.per_config),
                      stack=stacking.init(self._frame(first_frames), self.num_frames, self.pad),
                      action=jnp.zeros((e,), jnp.int32), key=k_loop)
        frame = self._frame(first_frames)
        replay = per.add(self.per_config, carry.replay, frame, carry.action, jnp.zeros(e),
                         jnp.ones(e), jnp.ones(e, bool))
        return carry.replace(replay=replay)

    def _step(self, c: Carry, frame, reward, discount, first, beta, n_updates: int, epsilon):
        frame = self._frame(frame)
        replay = per.add(self.per_config, c.replay, frame, c.action, reward, discount, first)
        stack = stacking.push(c.stack, frame, first, self.pad)
        key, k_act, k_up = jax.random.split(c.key, 3)
        agent = c.agent
        metrics = {}
        if n_updates:
            def body(carry, k):
                agent, replay = carry
                k_s, k_u = jax.random.split(k)
                batch, weights, _ = per.sample(self.per_config, replay, k_s, self.config.batch_size, beta)
                agent, m, prio = rainbow.update(agent, batch, weights, k_u)
                replay = per.update_priorities(self.per_config, replay, batch.env, batch.slot, prio)
                return (agent, replay), m
            (agent, replay), ms = jax.lax.scan(body, (agent, replay), jax.random.split(k_up, n_updates))
            metrics = jax.tree.map(lambda m: m[-1], ms)
        action = rainbow.act(agent, stack, k_act, epsilon)
        return c.replace(agent=agent, replay=replay, stack=stack, action=action, key=key), metrics

    def step(self, carry, ts, beta: float, n_updates: int, epsilon: float):
        fn = self._step_fns.get(n_updates)
        if fn is None:
            fn = jax.jit(lambda c, f, r, d, first, b, eps: self._step(c, f, r, d, first, b, n_updates, eps),
                         donate_argnums=0)
            self._step_fns[n_updates] = fn
        # numpy in, straight to the jitted call (its own transfer; no extra sync per step)
        return fn(carry, ts.frame, ts.reward, ts.discount, ts.first, np.float32(beta),
                  np.float32(epsilon))

    def _act_eval(self, agent, stack, key, epsilon):
        return rainbow.act(agent, stack, key, epsilon)


def evaluate(runner: RainbowRunner, env, agent, key, frames: int, epsilon: float) -> dict:
    """Runs the policy for `frames` frames over `env`'s envs; mean raw return of the completed
    episodes (and of the unfinished ones if none completed, flagged)."""
    ts = env.reset()
    stack = runner.stack_init(host_to_device(ts.frame))
    returns, done_frames = [], 0
    while done_frames < frames:
        key, k = jax.random.split(key)
        action = np.asarray(runner.act_eval(agent, stack, k, epsilon))
        ts = env.step(action)
        done_frames += env.num_envs * env.frames_per_step
        returns += ts.episode_return[ts.last].tolist()
        stack = runner.stack_push(stack, ts.frame, ts.first)
    if returns:
        return {"return_mean": float(np.mean(returns)), "episodes": len(returns), "complete": 1}
    return {"return_mean": float(np.mean(ts.episode_return)), "episodes": 0, "complete": 0}


def save_params(path: str, agent: rainbow.RainbowState):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.to_bytes(jax.device_get(
            {"params": agent.params, "target_params": agent.target_params, "updates": agent.updates})))
    os.replace(tmp, path)


def train(config: RainbowTrainConfig, log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Trains Rainbow; returns {"eval": [(train frames, eval return)], "train_returns": [...], ...}."""
    t_start = time.time()
    log = log or (lambda *_: None)
    env = make_env(config, config.num_envs)
    eval_env = make_env(config, config.eval_envs, seed_offset=500)
    fps = env.frames_per_step
    runner = RainbowRunner(config, env.frame_shape, env.frame_dtype, env.num_actions)
    frames_per_iter = config.num_envs * fps
    if config.learn_period_frames % frames_per_iter and frames_per_iter % config.learn_period_frames:
        log(f"[rainbow] note: {frames_per_iter} frames per iteration vs learn period "
            f"{config.learn_period_frames}: updates are spread to keep 1 per {config.learn_period_frames} frames")
    log(f"[rainbow] {config.env}: {env.num_actions} actions, torso {config.rainbow.torso}, "
        f"{config.num_envs} envs, {config.train_frames:,d} training frames "
        f"({fps} frames per agent step), learn every {config.learn_period_frames} frames")
    log("[rainbow] " + rp.check_fits(runner.per_config.replay))
    logger = None
    if config.out_dir:
        logger = RunLogger(config.out_dir, tensorboard=config.tensorboard)
        logger.write_config(dataclasses.asdict(config))
    ts = env.reset()
    # key and frames on the device before the first program runs (host_to_device)
    carry = runner.init(*host_to_device(np.asarray(jax.random.PRNGKey(config.seed)), ts.frame))
    stop = StopRequests()
    progress = Progress(config.train_frames, unit="frames", desc=f"{config.env} ")
    frames, transitions, updates, owed = 0, config.num_envs, 0, 0.0
    recent, result = [], {"eval": [], "train_returns": []}
    next_eval = config.eval_every_frames
    key = jax.random.PRNGKey(config.seed + 10_000)

    def run_eval():
        nonlocal key
        key, k = jax.random.split(key)
        t0 = time.time()
        ev = evaluate(runner, eval_env, carry.agent, k, config.eval_frames, config.eval_epsilon)
        result["eval"].append((frames, ev["return_mean"]))
        if logger:
            logger.log("eval", frames, {**ev, "eval_seconds": time.time() - t0,
                                        "wall_seconds": time.time() - t_start})
            save_params(os.path.join(config.out_dir, "params_latest.msgpack"), carry.agent)
        log(f"[rainbow] eval after {frames:,d} frames: mean raw return {ev['return_mean']:.1f} over "
            f"{ev['episodes']} episodes ({time.time() - t0:.0f}s)")

    metrics = None
    try:
        with stop, StallWatchdog(config.stall_seconds) as watchdog:
            while frames < config.train_frames and not stop.requested:
                watchdog.beat()
                ts = env.step(np.asarray(carry.action))
                frames += frames_per_iter
                transitions += config.num_envs
                done = ts.episode_return[ts.last]
                if done.size:
                    recent = (recent + done.tolist())[-20:]
                    result["train_returns"] += [(frames, float(r)) for r in done]
                n_updates = 0
                if transitions >= config.min_replay:
                    owed += frames_per_iter / config.learn_period_frames
                    n_updates = int(owed)
                    owed -= n_updates
                beta = float(per.beta_schedule(frames / config.train_frames, config.importance_start,
                                               config.importance_end))
                carry, m = runner.step(carry, ts, beta, n_updates, config.train_epsilon)
                if n_updates:
                    updates += n_updates
                    metrics = m
                if frames >= next_eval:
                    run_eval()
                    next_eval += config.eval_every_frames
                if logger and done.size:
                    logger.log("train", frames, {"episode_return": float(np.mean(done)), "updates": updates,
                                                 **({k: v for k, v in jax.device_get(metrics).items()} if metrics else {}),
                                                 "wall_seconds": time.time() - t_start})
                if (frames // frames_per_iter) % 25 == 0:
                    progress.update(frames, ret=(f"{np.mean(recent):.1f}" if recent else "-"), updates=updates)
    finally:
        progress.close()
    if stop.requested:
        log(f"[rainbow] interrupted after {frames:,d} frames; saving parameters and logs")
    elif not result["eval"] or result["eval"][-1][0] != frames:
        run_eval()
    if config.out_dir:
        save_params(os.path.join(config.out_dir, "params_final.msgpack"), carry.agent)
    if logger:
        logger.close()
    env.close()
    eval_env.close()
    seconds = time.time() - t_start
    result.update(frames=frames, updates=updates, seconds=seconds, carry=carry,
                  interrupted=stop.requested)
    log(f"[rainbow] done: {frames:,d} frames, {updates:,d} updates in {seconds:.0f}s "
        f"({frames / seconds:.0f} frames/s)")
    return result
