"""The SAC training loop on DMC: env -> replay -> update -> log, for S seeds at once.

Every seed has its own agent state, replay and environments; the device functions are written
for one seed and `jax.vmap`ped over a leading seed axis, so S seeds cost one compiled call per
agent step (issue 4's multi-seed mode; S=1 is a plain run). The host only moves numpy arrays
between envpool and one jitted call per agent step:

    observe(frame, reward, first) -> replay.add, stack push     (one device call per agent
    [K updates: sample + augment + sac.update, lax.scan]          step: `_train_step`, or
    act on the new stacks -> actions                             `_collect_step` during warm-up)

Units: `env_steps` counts environment steps (agent steps x action repeat); replay capacity,
`init_steps`, `eval_every` and update counts are in agent steps.
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

from agents import sac
from flare_jax import augment, replay as rp, stacking
from flare_jax.envs.dmc import DMCEnv
from flare_jax.envs import dmc_tasks
from flare_jax.logging import Progress, RunLogger
from flare_jax.runtime import StallWatchdog, StopRequests, host_to_device

Array = jax.Array
STORE_CROP = 100        # pixels are stored as the 100x100 centre of the 108 render


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    task: str = "cartpole_swingup"
    pixels: bool = True
    seeds: tuple[int, ...] = (0,)
    env_steps: int = 100_000            # environment steps (agent steps x action repeat)
    action_repeat: Optional[int] = None  # None: the task preset (dmc_tasks)
    num_envs: int = 1                   # environments per seed
    batch_size: int = 128
    replay_capacity: int = 100_000      # transitions per seed
    init_steps: int = 10_000            # agent steps of uniform random actions before learning
    updates_per_step: int = 1           # SAC updates per agent step (per env step of all envs)
    update_every: int = 1               # run updates_per_step*update_every updates every N steps
    eval_every: int = 10_000            # agent steps between evaluations
    eval_episodes: int = 10
    frame_size: int = 108
    max_episode_steps: Optional[int] = None   # env steps; None = the task's 1000 (quick checks)
    sac: sac.SACConfig = sac.SACConfig()
    out_dir: Optional[str] = None
    save_params: bool = True
    tensorboard: bool = True
    # a step that takes longer than this ends the process with tracebacks (runtime.StallWatchdog);
    # evaluations count as one step. <= 0 disables it.
    stall_seconds: float = 3600.0

    def __post_init__(self):
        dmc_tasks.get_task(self.task)  # raises with the valid names
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for name in ("env_steps", "num_envs", "batch_size", "replay_capacity", "eval_every",
                     "eval_episodes", "updates_per_step", "update_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.init_steps < 0:
            raise ValueError(f"init_steps must be >= 0, got {self.init_steps}")

    @property
    def repeat(self) -> int:
        return self.action_repeat or dmc_tasks.get_task(self.task).action_repeat

    @property
    def agent_steps(self) -> int:
        return -(-self.env_steps // self.repeat)

    def encoder(self):
        return self.sac.make_encoder()


@struct.dataclass
class Carry:
    """Device state of all seeds (leading axis S on every array)."""
    agent: sac.SACState
    replay: rp.ReplayState
    stack: Array          # [S, E, T, *frame] newest stacks, storage format
    action: Array         # [S, E, A] last actions sent to the envs
    key: Array            # [S, 2]


def obs_kind(encoder) -> str:
    return "pixels" if encoder.observation == "pixels" else encoder.observation


def make_env(config: TrainConfig, num_envs_per_seed: int, seed_offset: int = 0) -> DMCEnv:
    """Envs of all seeds: env j of seed s is seeded with seeds[s] * 1000 + seed_offset + j."""
    kind = obs_kind(config.encoder())
    if (kind == "pixels") != config.pixels:
        raise ValueError(f"encoder {config.sac.encoder!r} takes {kind} observations but "
                         f"pixels={config.pixels}")
    env_seeds = [s * 1000 + seed_offset + j for s in config.seeds for j in range(num_envs_per_seed)]
    return DMCEnv(config.task, num_envs=len(env_seeds), seed=env_seeds, pixels=config.pixels,
                  obs="full" if kind == "pixels" else kind, size=config.frame_size,
                  action_repeat=config.repeat, max_episode_steps=config.max_episode_steps)


class SACRunner:
    """Builds the jitted per-step device functions for a TrainConfig (S seeds, E envs each)."""

    def __init__(self, config: TrainConfig, frame_shape: tuple[int, ...], frame_dtype, action_dim: int):
        self.config = config
        self.encoder = config.encoder()
        self.num_seeds = len(config.seeds)
        self.pixels = self.encoder.observation == "pixels"
        self.store_shape = ((STORE_CROP, STORE_CROP, frame_shape[-1]) if self.pixels
                            else tuple(frame_shape))
        self.action_dim = action_dim
        t = self.encoder.num_frames
        self.replay_config = rp.ReplayConfig(
            capacity=config.replay_capacity, frame_shape=self.store_shape, action_shape=(action_dim,),
            num_envs=config.num_envs, stack=t, frame_dtype=frame_dtype, action_dtype=jnp.float32,
            pad="repeat_first", n_step=1, discount=0.99)
        self.obs_spec = jax.ShapeDtypeStruct((t,) + self.store_shape, frame_dtype)
        self.action_spec = jax.ShapeDtypeStruct((action_dim,), jnp.float32)
        n_up = config.updates_per_step * config.update_every
        v = lambda f, in_axes=0: jax.vmap(f, in_axes=in_axes)  # noqa: E731
        self._init = jax.jit(v(self._init_one))
        self._collect = jax.jit(v(self._collect_one), donate_argnums=0)
        self._train = jax.jit(v(lambda c, f, r, d, first, count: self._train_one(c, f, r, d, first, count, n_up),
                                in_axes=(0, 0, 0, 0, 0, None)), donate_argnums=0)
        self._observe_only = jax.jit(v(self._observe_and_act_random), donate_argnums=0)
        self._eval_act = jax.jit(v(lambda a, s: sac.act(a, s, jax.random.PRNGKey(0), True)))
        self._stack_init = jax.jit(v(self._stack_init_one))
        self._stack_push = jax.jit(v(self._stack_push_one))

    # ---- per-seed device functions (vmapped over seeds above)

    def _store(self, frame: Array) -> Array:
        return augment.center_crop(frame, STORE_CROP) if self.pixels else frame

    def _stack_init_one(self, frame):
        return stacking.init(self._store(frame), self.encoder.num_frames)

    def _stack_push_one(self, stack, frame, first):
        return stacking.push(stack, self._store(frame), first)

    def _init_one(self, key, first_frame, agent):
        k_loop = jax.random.split(key)[1]
        replay = rp.init(self.replay_config)
        e = self.config.num_envs
        carry = Carry(agent=agent, replay=replay, stack=self._stack_init_one(first_frame),
                      action=jnp.zeros((e, self.action_dim)), key=k_loop)
        return self._observe(carry, first_frame, jnp.zeros(e), jnp.ones(e), jnp.ones(e, bool))

    def _observe(self, c: Carry, frame, reward, discount, first) -> Carry:
        frame_s = self._store(frame)
        replay = rp.add(self.replay_config, c.replay, frame_s, c.action, reward, discount, first)
        stack = stacking.push(c.stack, frame_s, first)
        return c.replace(replay=replay, stack=stack)

    def _random_action(self, c: Carry):
        key, k = jax.random.split(c.key)
        a = jax.random.uniform(k, (self.config.num_envs, self.action_dim), minval=-1.0, maxval=1.0)
        return c.replace(key=key, action=a)

    def _policy_action(self, c: Carry):
        key, k = jax.random.split(c.key)
        return c.replace(key=key, action=sac.act(c.agent, c.stack, k, deterministic=False))

    def _observe_and_act_random(self, c, frame, reward, discount, first):
        return self._random_action(self._observe(c, frame, reward, discount, first))

    def _collect_one(self, c, frame, reward, discount, first):
        """Observe, then act with the policy (no update)."""
        return self._policy_action(self._observe(c, frame, reward, discount, first))

    def _train_one(self, c: Carry, frame, reward, discount, first, count, n_updates: int):
        """Observe, run n_updates SAC updates (replay sampling + augmentation inside), act."""
        c = self._observe(c, frame, reward, discount, first)
        key, k = jax.random.split(c.key)

        def body(agent_and_count, k_i):
            agent, i = agent_and_count
            k_sample, k_update = jax.random.split(k_i)
            batch = rp.sample(self.replay_config, c.replay, k_sample, self.config.batch_size)
            agent, metrics = sac.update(agent, batch, k_update, count=i)
            return (agent, i + 1), metrics

        (agent, _), metrics = jax.lax.scan(body, (c.agent, count), jax.random.split(k, n_updates))
        c = c.replace(agent=agent, key=key)
        metrics = jax.tree.map(lambda m: m[-1], metrics)
        return self._policy_action(c), metrics

    # ---- host-facing API (arrays with the seed axis S first)

    def split_seeds(self, x: np.ndarray) -> np.ndarray:
        """[S*E, ...] env-major -> [S, E, ...]."""
        return x.reshape((self.num_seeds, -1) + x.shape[1:])

    def init(self, first_frames: np.ndarray) -> Carry:
        # keys and frames are on the device before the first program runs (host_to_device)
        keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in self.config.seeds])
        keys, frames = host_to_device(keys, self.split_seeds(first_frames))
        agent_keys = jax.vmap(lambda k: jax.random.split(k)[0])(keys)
        # one seed at a time, not vmapped (sac.init_seeds says why)
        agent = sac.init_seeds(agent_keys, self.obs_spec, self.action_spec, self.config.sac)
        return self._init(keys, frames, agent)


def save_params(path: str, agent: sac.SACState):
    """Critic, target, actor and temperature parameters (msgpack, flax.serialization)."""
    params = {"critic": agent.critic.params, "target": agent.target, "actor": agent.actor.params,
              "alpha": agent.alpha.params, "updates": agent.updates}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.to_bytes(jax.device_get(params)))
    os.replace(tmp, path)


def load_params(path: str, agent: sac.SACState) -> sac.SACState:
    """Restores what `save_params` wrote into an agent state of the same configuration."""
    template = {"critic": agent.critic.params, "target": agent.target, "actor": agent.actor.params,
                "alpha": agent.alpha.params, "updates": agent.updates}
    with open(path, "rb") as f:
        p = flax.serialization.from_bytes(template, f.read())
    return agent.replace(critic=agent.critic.replace(params=p["critic"]), target=p["target"],
                         actor=agent.actor.replace(params=p["actor"]),
                         alpha=agent.alpha.replace(params=p["alpha"]), updates=p["updates"])


def evaluate(runner: SACRunner, env: DMCEnv, agent: sac.SACState) -> np.ndarray:
    """Deterministic episodes on `env` (S * episodes envs); returns [S, episodes] returns."""
    ts = env.reset()
    stack = runner._stack_init(host_to_device(runner.split_seeds(ts.frame)))
    returns = np.zeros(env.num_envs)
    done = np.zeros(env.num_envs, bool)
    while not done.all():
        action = np.asarray(runner._eval_act(agent, stack)).reshape(env.num_envs, -1)
        ts = env.step(action)
        returns += np.where(done, 0.0, ts.reward)
        done |= ts.last
        stack = runner._stack_push(stack, runner.split_seeds(ts.frame), runner.split_seeds(ts.first))
    return runner.split_seeds(returns)


def train(config: TrainConfig, log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Runs SAC for all seeds; returns {"eval": [(env_steps, [S] mean returns)], ...}."""
    t_start = time.time()
    log = log or (lambda *_: None)
    env = make_env(config, config.num_envs)
    eval_env = make_env(config, config.eval_episodes, seed_offset=500)
    runner = SACRunner(config, env.frame_shape, env.frame_dtype, env.action_dim)
    s, repeat = runner.num_seeds, config.repeat
    log(f"[sac] task {config.task} ({'pixels' if config.pixels else env.obs + ' state'}, "
        f"action repeat {repeat}), encoder {config.sac.encoder}, seeds {list(config.seeds)}, "
        f"{config.env_steps:,d} env steps = {config.agent_steps:,d} agent steps x {config.num_envs} env(s)")
    log("[sac] " + rp.check_fits(dataclasses.replace(
        runner.replay_config, num_envs=runner.replay_config.num_envs * s)) + f" for {s} seed(s)")
    loggers = []
    if config.out_dir:
        for seed in config.seeds:
            lg = RunLogger(os.path.join(config.out_dir, f"seed_{seed}"), tensorboard=config.tensorboard)
            lg.write_config({**dataclasses.asdict(config), "seed": seed, "action_repeat": repeat})
            loggers.append(lg)

    ts = env.reset()
    carry = runner.init(ts.frame)
    result = {"eval": [], "seeds": list(config.seeds)}
    progress = Progress(config.agent_steps * repeat * config.num_envs, unit="env steps",
                        desc=f"{config.task} ")
    stop = StopRequests()
    updates = 0
    last_eval = None
    step = 0
    metrics = None

    def do_eval(step_):
        nonlocal last_eval
        t0 = time.time()
        rets = evaluate(runner, eval_env, carry.agent)
        means = rets.mean(1)
        last_eval = means
        env_steps = step_ * repeat * config.num_envs
        result["eval"].append((env_steps, means.tolist()))
        for i, lg in enumerate(loggers):
            lg.log("eval", env_steps, {"agent_steps": step_, "return_mean": means[i],
                                       "return_std": rets[i].std(), "episodes": rets.shape[1],
                                       "eval_seconds": time.time() - t0,
                                       "wall_seconds": time.time() - t_start})
        log(f"[sac] eval at {env_steps:,d} env steps: return {np.round(means, 1).tolist()} "
            f"({time.time() - t0:.0f}s)")
        if config.out_dir and config.save_params:
            save_all("params_latest.msgpack")

    def save_all(name):
        for i, seed in enumerate(config.seeds):
            agent_i = jax.tree.map(lambda x: x[i], carry.agent)
            save_params(os.path.join(config.out_dir, f"seed_{seed}", name), agent_i)

    try:
        with stop, StallWatchdog(config.stall_seconds) as watchdog:
            while step < config.agent_steps and not stop.requested:
                watchdog.beat()
                action = np.asarray(carry.action).reshape(env.num_envs, -1)
                ts = env.step(action)
                # numpy in, straight to the jitted calls (no extra sync per step)
                args = tuple(runner.split_seeds(a) for a in (ts.frame, ts.reward, ts.discount, ts.first))
                step += 1
                learning = step >= config.init_steps
                if learning and step % config.update_every == 0:
                    carry, metrics = runner._train(carry, *args, jnp.int32(updates))
                    updates += config.updates_per_step * config.update_every
                elif learning:
                    carry = runner._collect(carry, *args)
                else:
                    carry = runner._observe_only(carry, *args)
                if step % config.eval_every == 0:
                    do_eval(step)
                if step % 1000 == 0 and metrics is not None and loggers:
                    m = jax.device_get(metrics)
                    for i, lg in enumerate(loggers):
                        lg.log("train", step * repeat * config.num_envs,
                               {"agent_steps": step, "updates": updates,
                                **{k: v[i] for k, v in m.items()},
                                "wall_seconds": time.time() - t_start})
                if step % 10 == 0 or step == config.agent_steps:
                    progress.update(step * repeat * config.num_envs,
                                    eval=("-" if last_eval is None else np.round(last_eval, 1).tolist()),
                                    updates=updates)
    finally:
        progress.close()
    if stop.requested:
        log(f"[sac] interrupted at agent step {step}: saving parameters and logs")
    elif not result["eval"] or result["eval"][-1][0] != step * repeat * config.num_envs:
        do_eval(step)
    if config.out_dir and config.save_params:
        save_all("params_final.msgpack")
    for lg in loggers:
        lg.close()
    env.close()
    eval_env.close()
    result.update(agent_steps=step, updates=updates, seconds=time.time() - t_start,
                  interrupted=stop.requested, carry=carry)
    log(f"[sac] done: {step:,d} agent steps, {updates:,d} updates in {result['seconds']:.0f}s")
    return result
