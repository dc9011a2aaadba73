"""The run loop of both agents (SAC and Rainbow): envs -> one compiled device step per agent
step -> evaluations, logs, checkpoints; resumable, guarded, for S seeds at once.

    result = loop.run(SACTrainer, config)        # or RainbowTrainer; agents/ define them

An agent gives the loop a `Trainer`: its environments and pure per-seed device functions
(`init_agent`, `init_replay`, `store`, `add`, `stack_init`, `stack_push`, `learn`, `act`). The
loop writes the device step once for every agent (`Stepper`),

    store frames -> add to the replay, push on the stacks -> n x (sample -> update) -> act,

`jax.vmap`s it over the seeds of a device (every seed has its own agent, replay, stacks, keys and
envs), `jax.shard_map`s that over the run's device mesh (`flare_jax.mesh`: a seed axis, and a
data axis over which one agent's envs, replay and batch are split and its gradients averaged),
jits it (the carry donated) and calls it once per loop iteration. The host side owns
everything else: the schedule (`Schedule`: warm-up, update cadence, evaluation,
checkpoints, counted in loop iterations converted from the units the flags name), envpool
stepping, the stall watchdog, Ctrl-C/SIGTERM, logging and progress, the divergence guard, the
output-directory lock and resume.

Units. One loop iteration is one `env.step` of every env: `num_envs` agent steps per seed
(`Schedule.agent_steps_per_iteration`); the logs' x-axis counts `Schedule.unit` ("env steps" =
agent steps x action repeat for DMC, "frames" = agent steps x 4 for Atari) per seed.

Several hosts: every process runs the loop with the same config; each steps the envs of its
own devices' shards; stop requests and the divergence flag are reduced over the mesh inside the
device step, so all processes stop at the same step; process 0 alone logs and writes.

Checkpoints (`flare_jax.checkpoint`) bundle the whole carry (agent, replay with PER trees, frame
stacks, last actions, PRNG keys; the replay only with `checkpoint_replay`), the host counters
(`Counters`) and the config under `<out_dir>/checkpoints/<agent step>`. A run whose out_dir holds
one resumes from the newest readable one: the config must match (`Trainer.resumable` fields may
differ, e.g. the budget), the logs are cut back to its step, the envs start new episodes (their
internal state is not saved; env seeds move on with `Counters.resumes`), and the device state
continues bit for bit. An interrupted run saves a checkpoint and returns status "interrupted".

Videos (`RunConfig.video_every` = N > 0): at every N-th evaluation and at the final one, process 0
(when it holds seed index 0's evaluation) plays one more deterministic episode of the first seed
on its own env (`Trainer.make_video_env`) with its own key, and writes it as
`<out_dir>/seed_<first seed>/videos/eval_<step>.mp4` and a TensorBoard frame strip
(`flare_jax.video`); nothing else changes, so the logs equal those of a run without videos.

Divergence guard: every device step returns whether its losses, gradient norms, parameter norm
and actions are all finite; the host checks that flag before the actions reach the envs, before
an evaluation and before a checkpoint, and stops with status "diverged" naming the step, the
first non-finite metric and its seed; the last checkpoint on disk is the last good one.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from flare_jax import checkpoint as ckpt_lib
from flare_jax import config_flags
from flare_jax import mesh as mesh_lib
from flare_jax.data import replay as rp
from flare_jax import video as video_lib
from flare_jax.logging import Progress, RunLogger, write_command
from flare_jax.runtime import RunDirLock, StallWatchdog, StopRequests

Array = jax.Array
FINISHED, INTERRUPTED, DIVERGED = "finished", "interrupted", "diverged"
EXIT_DIVERGED = 3


def _help(text: str, **extra) -> dict:
    return dict(help=text, **extra)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a run is executed and kept (shared by both agents); counts in agent steps per seed."""
    seeds: tuple[int, ...] = dataclasses.field(
        default=(0,), metadata=_help("seeds, run vmapped in one process, e.g. 0,1,2"))
    out_dir: Optional[str] = dataclasses.field(
        default=None, metadata=_help("output directory (default: runs/<derived from the config>)"))
    resume: bool = dataclasses.field(
        default=True, metadata=_help("continue from the newest checkpoint in out_dir; false: "
                                     "refuse an out_dir that is not empty"))
    checkpoint_every: Optional[int] = dataclasses.field(
        default=None, metadata=_help("agent steps between checkpoints (default: at every "
                                     "evaluation); one is also written at the end and on Ctrl-C"))
    keep_checkpoints: int = dataclasses.field(default=2, metadata=_help("checkpoints kept on disk"))
    checkpoint_replay: bool = dataclasses.field(
        default=True, metadata=_help("include the replay in checkpoints (false: the agent only; "
                                     "a resumed run refills its replay)"))
    log_every: int = dataclasses.field(default=1000, metadata=_help("agent steps between train.csv rows"))
    tensorboard: bool = dataclasses.field(default=True, metadata=_help("write TensorBoard logs"))
    stall_seconds: float = dataclasses.field(
        default=3600.0, metadata=_help("end the process with tracebacks when one loop step (an "
                                       "evaluation or checkpoint included) takes longer; <= 0: never"))
    mesh: str = dataclasses.field(
        default="", metadata=_help("device mesh seed:S,data:D (flare_jax.mesh): seeds split over S "
                                   "devices, each agent's envs, replay and batch over D; auto: all "
                                   "devices on the seed axis when several seeds are given, else on "
                                   "the data axis; empty: one device"))
    coordinator_address: Optional[str] = dataclasses.field(
        default=None, metadata=_help("multi-host: host:port of process 0's coordinator (with "
                                     "--num_processes, --process_id), or auto (SLURM, TPU pods)"))
    num_processes: Optional[int] = dataclasses.field(
        default=None, metadata=_help("multi-host: number of processes"))
    process_id: Optional[int] = dataclasses.field(
        default=None, metadata=_help("multi-host: this process's index (0 writes logs and checkpoints)"))
    video_every: int = dataclasses.field(
        default=0, metadata=_help("evaluations between videos: one deterministic evaluation episode "
                                  "of the first seed as <out_dir>/seed_<s>/videos/eval_<step>.mp4 "
                                  "(and a TensorBoard frame strip) at every N-th evaluation and "
                                  "at the final one; 0: no videos"))
    overlap: bool = dataclasses.field(
        default=False, metadata=_help("step the envs while the updates run: the actions come from "
                                      "the agent before the loop step's updates (one loop step of "
                                      "policy lag; flare_jax.loop.Stepper)"))
    video_max_steps: int = dataclasses.field(
        default=1000, metadata=_help("agent steps at most in a video episode (DMC episodes have "
                                     "1000 / action repeat; Atari up to 27,000)"))

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if dup:
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)} (repeated: {dup})")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 agent step (or unset: at every "
                             f"evaluation), got {self.checkpoint_every}")
        for name in ("keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.video_every < 0:
            raise ValueError(f"video_every must be >= 0 evaluations (0: no videos), got "
                             f"{self.video_every}")
        if self.video_max_steps < 1:
            raise ValueError(f"video_max_steps must be >= 1 agent step, got {self.video_max_steps}")
        mesh_lib.parse_spec(self.mesh)
        if self.coordinator_address not in (None, "", "auto"):
            if self.num_processes is None or self.process_id is None:
                raise ValueError("--coordinator_address needs --num_processes and --process_id "
                                 "(or --coordinator_address=auto on SLURM / TPU pods)")
            if not 0 <= self.process_id < self.num_processes:
                raise ValueError(f"--process_id={self.process_id} must lie in "
                                 f"[0, --num_processes={self.num_processes})")
        elif self.num_processes is not None or self.process_id is not None:
            raise ValueError("--num_processes and --process_id need --coordinator_address=host:port")


# RunConfig fields that may differ between a checkpoint and the command that resumes it.
# The mesh may change between a checkpoint and its resume as long as the data axis stays (the
# replay is split over it): checked against the checkpoint's own record of its mesh.
RUN_RESUMABLE = ("out_dir", "resume", "checkpoint_every", "keep_checkpoints", "checkpoint_replay",
                 "log_every", "tensorboard", "stall_seconds", "mesh", "coordinator_address",
                 "num_processes", "process_id", "video_every", "video_max_steps", "overlap")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The loop's cadences, in loop iterations (one env.step of all envs)."""
    iterations: int                  # of the whole run
    agent_steps_per_iteration: int   # per seed (= envs per seed)
    units_per_iteration: int         # log x-axis units per iteration, per seed
    unit: str                        # "env steps" | "frames"
    warmup: int                      # iterations after a replay (re)start before learning
    random_until: int                # iterations with uniformly random actions
    updates_per_iteration: float     # owed updates accrue at this rate while learning
    update_every: int                # iterations per learn call (owed updates are fused)
    eval_every: int
    log_every: int
    checkpoint_every: int

    def __post_init__(self):
        for name in ("iterations", "agent_steps_per_iteration", "units_per_iteration",
                     "update_every", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"schedule: {name} must be >= 1, got {getattr(self, name)}")


def agent_steps_cadence(agent_steps: Optional[int], per_iteration: int, default: int) -> int:
    """A cadence given in agent steps (None: `default` iterations) -> iterations (>= 1)."""
    return default if agent_steps is None else max(1, -(-int(agent_steps) // per_iteration))


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What the device state needs to know of an environment (one env, one step)."""
    frame_shape: tuple[int, ...]
    frame_dtype: str
    action_shape: tuple[int, ...]
    action_dtype: str
    num_actions: Optional[int] = None      # discrete actions

    @staticmethod
    def of(env) -> "EnvSpec":
        discrete = hasattr(env, "num_actions")
        return EnvSpec(frame_shape=tuple(int(d) for d in env.frame_shape),
                       frame_dtype=np.dtype(env.frame_dtype).name,
                       action_shape=() if discrete else (int(env.action_dim),),
                       action_dtype="int32" if discrete else "float32",
                       num_actions=int(env.num_actions) if discrete else None)


@struct.dataclass
class Carry:
    """The device state of the run; under the loop every leaf has a leading seed axis S."""
    agent: Any
    replay: Any
    stack: Array        # [E, T, *frame] the acting stacks (storage format)
    action: Array       # [E, *action_shape] the actions for the next env step
    key: Array          # [2] this seed's loop key


class Trainer(abc.ABC):
    """What an agent gives the loop. Device functions are for ONE seed on ONE data shard (the
    loop vmaps them over a device's seeds and shard_maps them over the mesh).

    Subclasses are built as `Trainer(config, spec, data_shards=D)` (the mesh's data axis: each
    shard holds E / D envs, capacity / D replay transitions and samples B / D of a batch) and
    set `schedule`, `eval_frames` (None: one deterministic episode per eval env; else a frame
    budget per seed, DQN Zoo style), `replay_nbytes` and `replay_summary` (one shard's replay of
    one seed in device memory) and `label`; the class sets `name`, `config_cls` (its config
    dataclass) and `resumable` (config leaf names that may differ on resume, e.g. the budget).
    Env output reaches the device functions in the env's format; `store` turns a frame into the
    storage format of the replay and the stacks.
    """
    name: str = ""
    config_cls: type = None
    resumable: tuple[str, ...] = ()
    config: Any
    spec: EnvSpec
    schedule: Schedule
    data_shards: int = 1
    eval_frames: Optional[int] = None
    replay_nbytes: int = 0
    replay_summary: str = ""
    label: str = ""            # the task or game, for the progress line

    @classmethod
    @abc.abstractmethod
    def make_env(cls, config, role: str, resumes: int = 0, members=None):
        """Envs for `members` [(seed index, env index within the seed)] (None: all, seed-major:
        env j of seed i is env i * E + j); role "train" (E = envs per seed) or "eval" (E =
        evaluation envs per seed). Their TimeSteps have frame, reward, discount, first, last and
        episode_return ([len(members), ...] numpy)."""

    @classmethod
    @abc.abstractmethod
    def eval_envs_per_seed(cls, config) -> int:
        """Evaluation envs per seed."""

    @classmethod
    def make_video_env(cls, config, resumes: int = 0):
        """ONE env (N = 1) for the evaluation videos of the run's first seed
        (`RunConfig.video_every`): the TimeStep API of the "eval" envs of `make_env` with N = 1,
        plus `render() -> [H, W, 3] uint8` (the picture of its current state), `kind` (a few
        words on how the pictures are made, for the log) and `close()`. Its env seed is its own
        (no other env's episodes change); `resumes` moves it on as for `make_env`."""
        raise NotImplementedError(f"{cls.__name__} makes no video env (--video_every)")

    @abc.abstractmethod
    def describe(self, env) -> str:
        """One line about the run, printed at its start."""

    @abc.abstractmethod
    def init_agent(self, key: Array):
        """The agent state of one seed (called one seed at a time, not vmapped)."""

    @abc.abstractmethod
    def init_replay(self):
        """An empty replay state of one seed."""

    @abc.abstractmethod
    def store(self, frame: Array) -> Array:
        """[E, *env frame] -> [E, *stored frame]."""

    @abc.abstractmethod
    def add(self, replay, frame, action, reward, discount, first):
        """Adds one env step of the E envs (stored frames) to the replay."""

    @abc.abstractmethod
    def stack_init(self, frame: Array) -> Array:
        """[E, *stored frame] first frames -> [E, T, *stored frame] acting stacks."""

    @abc.abstractmethod
    def stack_push(self, stack: Array, frame: Array, first: Array) -> Array:
        """Pushes stored frames [E, ...] onto the stacks (reset where `first`)."""

    @abc.abstractmethod
    def learn(self, agent, replay, key, n: int, update_count: Array, progress: Array,
              axis_name: Optional[str] = None):
        """n updates (sampling included) -> (agent, replay, metrics with a leading axis [n]).

        `update_count` ([] int32) counts the updates before these; `progress` ([] float32) is the
        run's fraction done. Metrics hold the losses, gradient norms and `param_norm`. With
        `axis_name` (the data axis, inside shard_map) `replay` is this shard's, `key` is the same
        on every shard, and gradients and metrics are averaged over the axis, so the agent stays
        identical on all shards.
        """

    @abc.abstractmethod
    def act(self, agent, stack, key, mode: str) -> Array:
        """Actions [E, *action_shape] for the stacks; mode "random", "explore" or "eval"."""


def init_seeds(init_fn: Callable[[Array], Any], keys: Array):
    """`jax.vmap(init_fn)(keys)` computed one seed at a time (jitted), then stacked.

    The same values as the vmapped init, but no batched LAPACK QR (an orthogonal initialiser
    under vmap), which deadlocked XLA's CPU thread pool in most process starts on a 2-core
    machine (jaxlib 0.10.2: every worker idle, the kernel waiting on its own sub-tasks).
    """
    one = jax.jit(init_fn)
    states = [jax.block_until_ready(one(k)) for k in keys]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@dataclasses.dataclass
class Counters:
    """The host side of the loop state, saved with every checkpoint."""
    iteration: int = 0        # loop iterations done
    updates: int = 0          # updates done (per seed)
    owed: float = 0.0         # updates accrued but not yet run
    replay_start: int = 0     # iteration at which the replay started filling
    last_eval: int = -1       # iteration of the last logged evaluation
    resumes: int = 0
    finished: bool = False    # the run reached its budget (the last checkpoint is the final state)


@dataclasses.dataclass
class RunResult:
    status: str                       # finished | interrupted | diverged
    config: Any
    counters: Counters
    evals: list                       # [(step in units, [S] mean returns)]
    carry: Optional[Carry]
    seconds: float
    message: str = ""
    exit_code: int = 0
    unit: str = ""                    # of the evaluation steps: "env steps" or "frames"
    # loop iterations and their wall seconds since the last step that compiled a new device
    # program (the steady state, evaluations and checkpoints included)
    steady: tuple[int, float] = (0, 0.0)

    @property
    def final(self) -> Optional[tuple]:
        return self.evals[-1] if self.status == FINISHED and self.evals else None


class RunError(RuntimeError):
    """A run cannot start (one-line message for the user; no traceback)."""


def _empty_shard(trainer: Trainer) -> Carry:
    """One data shard's carry of one seed without agent and key: empty replay, zero stacks and
    actions for its E / D envs."""
    spec, e = trainer.spec, trainer.schedule.agent_steps_per_iteration // trainer.data_shards
    frame = trainer.store(jnp.zeros((e,) + spec.frame_shape, spec.frame_dtype))
    return Carry(agent=None, replay=trainer.init_replay(), stack=trainer.stack_init(frame),
                 action=jnp.zeros((e,) + spec.action_shape, spec.action_dtype), key=None)


def seed_keys(seeds) -> np.ndarray:
    """[S, 2] PRNG keys, PRNGKey(seed) for each seed."""
    return np.stack([np.asarray(jax.random.PRNGKey(seed)) for seed in seeds])


# The carry's leaves by role (flare_jax.mesh): per seed, or per seed and data shard.
CARRY_SPECS = Carry(agent=P("seed"), replay=P("seed", "data"), stack=P("seed", "data"),
                    action=P("seed", "data"), key=P("seed"))


def _is_spec(x) -> bool:
    return isinstance(x, P)


def carry_shardings(layout: mesh_lib.Layout, carry: Carry) -> Carry:
    """NamedShardings for every leaf of `carry` (its structure; values unused) on the mesh."""
    return jax.tree.map(lambda spec, sub: jax.tree.map(lambda _: NamedSharding(layout.mesh, spec), sub),
                        CARRY_SPECS, carry, is_leaf=_is_spec)


def init_carry(trainer: Trainer, keys, layout: Optional[mesh_lib.Layout] = None) -> Carry:
    """The start of a run for keys [S, 2], on the layout's mesh (default: one device): seed s
    gets its agent from split(key)[0] and its loop key split(key)[1]; replay, stacks and actions
    [S, D, ...] are empty."""
    keys = jnp.asarray(keys)
    layout = layout or single_device_layout(trainer, len(keys))
    k_agent, k_loop = jax.vmap(jax.random.split, out_axes=1)(keys)
    lead = (len(keys), layout.shape.data)
    shape = jax.eval_shape(lambda: _empty_shard(trainer))
    shards = carry_shardings(layout, shape)
    empty = jax.jit(lambda: jax.tree.map(lambda x: jnp.broadcast_to(x, lead + x.shape),
                                         _empty_shard(trainer)), out_shardings=shards)()
    agent = init_seeds(trainer.init_agent, k_agent)
    agent, key = layout.put((agent, k_loop), (jax.tree.map(lambda _: layout.seed_sharding, agent),
                                              layout.seed_sharding))
    return empty.replace(agent=agent, key=key)


def carry_template(trainer: Trainer, keys, data_shards: int = 1) -> Carry:
    """The carry's structure, shapes and dtypes for keys [S, 2] and `data_shards`, computing
    nothing."""
    s = len(keys)

    def one():
        shard = jax.tree.map(lambda x: jnp.broadcast_to(x, (s, data_shards) + x.shape),
                             _empty_shard(trainer))
        agent = jax.vmap(trainer.init_agent)(jnp.asarray(keys))
        return shard.replace(agent=agent, key=jnp.asarray(keys))
    return jax.eval_shape(one)


def single_device_layout(trainer: Trainer, num_seeds: int) -> mesh_lib.Layout:
    return mesh_lib.Layout(mesh_lib.make(mesh_lib.MeshShape()), num_seeds,
                           trainer.schedule.agent_steps_per_iteration)


def _squeezed(fn, in_axes=0):
    """`jax.vmap(fn, in_axes)` for a mapped axis of size 1 (in_axes: 0 or None per argument, as
    pytree prefixes; every output mapped): the leaves mapped over are reshaped to drop their
    leading 1, `fn` runs unbatched (no unit batch dimension on its ops), and every output leaf
    gets the 1 back."""
    def run(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        args = [jax.tree.map(lambda a, t: t if a is None else
                             jax.tree.map(lambda x: x.reshape(x.shape[1:]), t),
                             ax, arg, is_leaf=lambda x: x is None)
                for ax, arg in zip(axes, args)]
        return jax.tree.map(lambda x: jnp.reshape(x, (1,) + jnp.shape(x)), fn(*args))
    return run


class Stepper:
    """The compiled device functions of a Trainer on a mesh (`flare_jax.mesh.Layout`).

    `step` is the one device step of both agents, for each seed and data shard: store the env
    frames, add them to the replay and the stacks, run `n` updates (`Trainer.learn`, gradients
    averaged over the data axis), act; it returns the new carry (the old one is donated), the
    last update's metrics [S] and run flags [2] (all losses, norms and actions finite; some
    process asked to stop). One compiled program per (n, random): `jax.shard_map` over the mesh
    of the per-device function, vmapped over the device's seeds.

    `overlap=True` (`RunConfig.overlap`) splits a step with updates into two programs, dispatched
    one after the other: *act* (store, add, stack push, act with the agent as it is) and *learn*
    (the n updates on agent, replay and key). The host reads the actions as soon as *act* is done
    and steps the envs while *learn* runs, so env stepping overlaps the updates. The price is
    one loop step of policy lag: the actions of step t come from the agent before step t's
    updates (without overlap, after them). The keys are the same as without overlap (act and
    learn take their halves of the same split), so a step without updates, or with random
    actions, computes exactly what the plain step computes. The flags returned by a step
    include the previous learn program's (finite losses) and its own (finite actions, stop);
    `settled(flags)` adds the last learn program's (the loop calls it before an evaluation, a
    checkpoint and at the end).
    """

    def __init__(self, trainer: Trainer, layout: Optional[mesh_lib.Layout] = None,
                 num_seeds: Optional[int] = None, overlap: bool = False):
        self.layout = layout or single_device_layout(trainer, num_seeds)
        self.trainer, self.num_seeds = trainer, self.layout.num_seeds
        if trainer.data_shards != self.layout.shape.data:
            raise ValueError(f"the trainer is built for {trainer.data_shards} data shards, the "
                             f"mesh has {self.layout.shape.data}")
        self.overlap = bool(overlap)
        self._fns = {}
        self._learn_ok = None     # overlap: the last learn program's flag, not yet in a step's flags
        t = trainer
        # evaluation: one device, the seeds of this process (Layout.eval_seeds)
        self.eval_act = jax.jit(jax.vmap(lambda a, st, k: t.act(a, st, k, "eval")))
        self.stack_init = jax.jit(jax.vmap(lambda f: t.stack_init(t.store(f))))
        self.stack_push = jax.jit(jax.vmap(lambda st, f, first: t.stack_push(st, t.store(f), first)))

    # the three parts of a step, for one seed on one data shard (axis: the data axis name or None)
    def _observe(self, carry: Carry, frame, reward, discount, first):
        t = self.trainer
        frame = t.store(frame)
        replay = t.add(carry.replay, frame, carry.action, reward, discount, first)
        return replay, t.stack_push(carry.stack, frame, first)

    def _learn(self, agent, replay, key, n, count, progress, axis):
        agent, replay, stacked = self.trainer.learn(agent, replay, key, n, count, progress,
                                                    axis_name=axis)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(m)) for m in stacked.values()]))
        return agent, replay, jax.tree.map(lambda m: m[-1], stacked), finite

    def _act(self, agent, stack, key, random, axis):
        action = self.trainer.act(agent, stack, mesh_lib.shard_key(key, axis),
                                  "random" if random else "explore")
        finite = (jnp.all(jnp.isfinite(action)) if jnp.issubdtype(action.dtype, jnp.floating)
                  else jnp.bool_(True))
        return action, finite

    def _compile(self, n: int, random: bool, part: str = "step"):
        """part: "step" (the whole step), "act" or "learn" (the two programs of `overlap`).

        Each is made of three segments per device, for each seed and data shard: observe
        (store, replay add, stack push), learn (the n updates, `Trainer.learn`) and act. A
        device holds [S_d, 1, ...] of every per-shard leaf (its seeds, its one data shard).
        Observe and act are vmapped over that size-1 axis (agent and key broadcast) and then
        over the seeds: squeezed and unsqueezed again around a replay add, the donated replay
        buffers were copied (5 copies of the frames per step that samples: ~0.9 s at 100k Atari
        frames). Learn is vmapped the same way when a device holds several seeds; with one seed
        its size-1 axes are reshaped away (`_squeezed`): a vmap of size 1 leaves a unit batch
        dimension on every op of the update, which measured ~15% slower per Rainbow step on Pong
        shapes (and the learn segment only reads the frames, so nothing is copied)."""
        axis = "data" if self.layout.shape.data > 1 else None
        learn_vmap = jax.vmap if self.layout.seeds_per_row > 1 else _squeezed
        all_ok = lambda finite: jax.lax.pmin(jnp.all(finite).astype(jnp.int32), mesh_lib.AXES)  # noqa: E731
        any_stop = lambda stop: jax.lax.pmax(jnp.max(stop), mesh_lib.AXES)  # noqa: E731
        first = lambda tree: jax.tree.map(lambda x: x[:, 0], tree)  # noqa: E731  [S_d, 1] -> [S_d]
        shard_axes = Carry(agent=None, replay=0, stack=0, action=0, key=None)
        split = jax.vmap(lambda k: tuple(jax.random.split(k, 3)))   # [S_d, 2] -> 3 x [S_d, 2]

        def observe(carry, frame, reward, discount, first_):     # -> replay, stack [S_d, 1, ...]
            one = jax.vmap(self._observe, in_axes=(shard_axes, 0, 0, 0, 0))
            return jax.vmap(one)(carry, frame, reward, discount, first_)

        def learn(agent, replay, k_learn, count, progress):
            """-> agent [S_d], replay [S_d, 1], metrics [S_d], finite [S_d, 1]"""
            one = lambda a, r, k: self._learn(a, r, k, n, count, progress, axis)  # noqa: E731
            agent, replay, metrics, finite = learn_vmap(learn_vmap(one, in_axes=(None, 0, None)))(
                agent, replay, k_learn)
            return first(agent), replay, first(metrics), finite

        def act(agent, stack, k_act):                            # -> action, finite [S_d, 1]
            one = lambda a, st, k: self._act(a, st, k, random, axis)  # noqa: E731
            return jax.vmap(jax.vmap(one, in_axes=(None, 0, None)))(agent, stack, k_act)

        def per_device_step(carry, frame, reward, discount, first_, stop, count, progress):
            replay, stack = observe(carry, frame, reward, discount, first_)
            key, k_learn, k_act = split(carry.key)
            agent, metrics, finite = carry.agent, {}, jnp.bool_(True)
            if n:
                agent, replay, metrics, finite = learn(agent, replay, k_learn, count, progress)
            action, finite_action = act(agent, stack, k_act)
            out = Carry(agent=agent, replay=replay, stack=stack, action=action, key=key)
            return out, metrics, jnp.stack([all_ok(finite & finite_action), any_stop(stop)])

        def per_device_act(carry, frame, reward, discount, first_, stop, learn_ok):
            """observe and act with the agent as it is; the loop key moves on here only when no
            learn program follows (else learn moves it, from the same split)."""
            replay, stack = observe(carry, frame, reward, discount, first_)
            key, _, k_act = split(carry.key)
            action, finite = act(carry.agent, stack, k_act)
            out = Carry(agent=carry.agent, replay=replay, stack=stack, action=action,
                        key=carry.key if n else key)
            return out, jnp.stack([jnp.minimum(all_ok(finite), learn_ok), any_stop(stop)])

        def per_device_learn(agent, replay, key, count, progress):
            """the n updates, with the k_learn of the step's split"""
            key, k_learn, _ = split(key)
            agent, replay, metrics, finite = learn(agent, replay, k_learn, count, progress)
            return agent, replay, key, metrics, all_ok(finite)

        env_spec, c = P("seed", "data"), CARRY_SPECS
        fn, in_specs, out_specs = {
            "step": (per_device_step, (c, env_spec, env_spec, env_spec, env_spec, env_spec, P(), P()),
                     (c, P("seed"), P())),
            "act": (per_device_act, (c, env_spec, env_spec, env_spec, env_spec, env_spec, P()),
                    (c, P())),
            "learn": (per_device_learn, (c.agent, c.replay, c.key, P(), P()),
                      (c.agent, c.replay, c.key, P("seed"), P())),
        }[part]
        # check_vma=False: the CPU conv's custom VJP (flare_jax.cpu.conv) returns gradients that
        # vary over `data` for parameters that do not; the update averages them itself (pmean),
        # so the replication types are not tracked
        fn = jax.shard_map(fn, mesh=self.layout.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
        return jax.jit(fn, donate_argnums=(0, 1, 2) if part == "learn" else 0)

    def _fn(self, n: int, random: bool, part: str):
        fn = self._fns.get((n, random, part))
        if fn is None:
            fn = self._fns[(n, random, part)] = self._compile(n, random, part)
        return fn

    def step(self, carry: Carry, frame, reward, discount, first, *, n: int, random: bool,
             update_count: int, progress: float, stop: bool = False):
        """One device step. frame [L, *env frame], reward/discount/first [L] (numpy, this
        process's envs in `Layout.train_members` order) -> (carry, metrics [S], flags [2])."""
        env_args, stop, count, progress = self._device_args(frame, reward, discount, first, stop,
                                                            update_count, progress)
        if not self.overlap:
            return self._fn(n, random, "step")(carry, *env_args, stop, count, progress)
        learn_ok = np.int32(1) if self._learn_ok is None else self._learn_ok
        carry, flags = self._fn(n, random, "act")(carry, *env_args, stop, learn_ok)
        self._learn_ok, metrics = None, {}
        if n:   # dispatched without waiting: the caller reads the actions while it runs
            agent, replay, key, metrics, self._learn_ok = self._fn(n, random, "learn")(
                carry.agent, carry.replay, carry.key, count, progress)
            carry = carry.replace(agent=agent, replay=replay, key=key)
        return carry, metrics, flags

    def _device_args(self, frame, reward, discount, first, stop, update_count, progress):
        lay = self.layout
        stop = lay.put_per_device(np.full(len(lay.blocks), int(stop), np.int32))
        env_args = (lay.put_envs(frame), lay.put_envs(reward), lay.put_envs(discount),
                    lay.put_envs(first))
        return env_args, stop, np.int32(update_count), np.float32(progress)

    def lower(self, carry: Carry, frame, reward, discount, first, *, n: int, random: bool):
        """The whole-step program (`step` without overlap) lowered for these arguments, e.g. to
        read its optimised HLO (`.compile().as_text()`); nothing runs, nothing is donated."""
        env_args, stop, count, progress = self._device_args(frame, reward, discount, first, False,
                                                            0, 0.0)
        return self._fn(n, random, "step").lower(carry, *env_args, stop, count, progress)

    def settled(self, flags):
        """The flags of the last step including its learn program's (overlap; waits for it)."""
        if self._learn_ok is None:
            return flags
        return jnp.stack([jnp.minimum(flags[0], self._learn_ok), flags[1]])

    def actions(self, carry: Carry) -> np.ndarray:
        """[L, *action_shape]: the actions of this process's envs."""
        return self.layout.get_envs(carry.action)


def checkpoint_tree(carry: Carry, with_replay: bool) -> dict:
    """What a checkpoint holds of the carry (the replay only `with_replay`)."""
    tree = {"agent": carry.agent, "stack": carry.stack, "action": carry.action, "key": carry.key}
    if with_replay:
        tree["replay"] = carry.replay
    return tree


def _check_out_dir(path: str):
    """Creates `path` and a file in it, or raises RunError saying why not."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"--out_dir={path} is a file, not a directory")
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise RunError(f"--out_dir={path} is not writable: {err.strerror} "
                       f"({err.filename or path})") from None


def _config_record(trainer_name: str, config, spec: Optional[EnvSpec]) -> dict:
    return {"agent": trainer_name, "config": config_flags.to_dict(config),
            "env_spec": None if spec is None else dataclasses.asdict(spec)}


def read_config_json(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def check_resume(run_dir: str, trainer_name: str, config, resumable: tuple[str, ...]):
    """Refuses to continue `run_dir` with another config (or another agent), naming the fields."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    try:
        saved = read_config_json(run_dir)
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is unreadable ({err}); use another --out_dir") from None
    if saved.get("agent") != trainer_name:
        raise RunError(f"{run_dir} holds a {saved.get('agent')!r} run, not {trainer_name!r}; "
                       "use another --out_dir")
    saved_config = saved.get("config", {})
    try:    # fields added since the run was written take their defaults (what the run used)
        saved_config = config_flags.to_dict(config_flags.from_dict(type(config), saved_config))
    except (TypeError, ValueError):
        pass
    diffs = config_flags.diff(saved_config, config_flags.to_dict(config),
                              ignore=RUN_RESUMABLE + tuple(resumable))
    if diffs:
        raise RunError(f"{run_dir} holds a run with another config; resuming would mix runs: "
                       f"{config_flags.describe_diff(diffs)}. Use another --out_dir, or "
                       "--resume=false with an empty one")


def _first_nonfinite(metrics: Optional[dict], seeds: tuple[int, ...]) -> str:
    """The first non-finite metric of a diverged step, and its seed (host side, rare)."""
    for name, values in (jax.device_get(metrics) or {}).items():
        values = np.asarray(values).reshape(len(seeds), -1)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            return f"{name} is {values[i][~np.isfinite(values[i])][0]} for seed {seeds[i]}"
    return "the actions are not finite"


def run(trainer_cls, config, log: Optional[Callable[[str], None]] = print,
        command: Optional[tuple[str, list]] = None) -> RunResult:
    """Runs (or resumes) a training run of `trainer_cls` with `config` (which has `.run`).

    `command`: (module, argv) of the launcher, appended to `<out_dir>/command.txt`.
    Raises RunError (one line) when the run cannot start; returns a RunResult otherwise. On
    several hosts every process calls it with the same config; only process 0 logs and writes.
    """
    log = log or (lambda *_: None)
    if jax.process_index() != 0:
        log = lambda *_: None  # noqa: E731
    rc = config.run
    out = rc.out_dir
    if out is None or jax.process_index() != 0:
        return _Run(trainer_cls, config, log, out, command).execute()
    _check_out_dir(out)
    with RunDirLock(out):
        return _Run(trainer_cls, config, log, out, command).execute()


def _mesh_record(layout: mesh_lib.Layout) -> dict:
    return dataclasses.asdict(layout.shape)


class _Run:
    def __init__(self, trainer_cls, config, log, out, command):
        self.cls, self.config, self.log, self.out, self.command = trainer_cls, config, log, out, command
        self.rc = config.run
        self.seeds = self.rc.seeds
        self.primary = jax.process_index() == 0
        self.t_start = time.time()

    # -------------------------------------------------------------------- start and resume

    def _prepare_out_dir(self):
        """Refuses an out_dir that holds something else; claims it with config.json (process 0).

        Every process makes the same checks on the same view of the directory: they look only
        after process 0 has probed and locked it, and process 0 writes only after all have looked
        (a process that looked while process 0 was writing saw a directory with no config.json).
        """
        mesh_lib.barrier("flare_jax.loop.out_dir_locked")
        entries = [e for e in os.listdir(self.out) if e != ".lock"] if os.path.isdir(self.out) else []
        if not self.rc.resume and entries:
            raise RunError(f"--out_dir={self.out} is not empty and --resume=false: use an empty "
                           "directory, or --resume=true to continue the run it holds")
        if entries and not os.path.exists(os.path.join(self.out, "config.json")):
            raise RunError(f"--out_dir={self.out} is not empty and holds no run (no config.json); "
                           "use an empty or new directory")
        check_resume(self.out, self.cls.name, self.config, self.cls.resumable)
        mesh_lib.barrier("flare_jax.loop.out_dir_checked")
        if self.primary:
            if not entries:
                self._write_config(None)
            self.checkpointer = ckpt_lib.Checkpointer(os.path.join(self.out, "checkpoints"),
                                                      keep=self.rc.keep_checkpoints, warn=self.log)
        mesh_lib.barrier("flare_jax.loop.out_dir_claimed")
        if not self.primary:   # reads the checkpoints process 0 writes (a shared file system)
            self.checkpointer = ckpt_lib.Checkpointer(os.path.join(self.out, "checkpoints"),
                                                      read_only=True, warn=self.log)

    def _write_config(self, spec: Optional[EnvSpec]):
        if not self.primary:
            return
        path = os.path.join(self.out, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_config_record(self.cls.name, self.config, spec), f, indent=2)
        os.replace(path + ".tmp", path)

    def execute(self) -> RunResult:
        cfg = self.config
        try:
            shape = mesh_lib.resolve(self.rc.mesh, len(self.seeds), cfg.num_envs, cfg.batch_size)
        except ValueError as err:
            raise RunError(str(err)) from None
        self.layout = mesh_lib.Layout(mesh_lib.make(shape), len(self.seeds), cfg.num_envs)
        if self.out:
            self._prepare_out_dir()
        else:
            self.checkpointer = None
        # a resumed run's envs get new seeds (new episodes, not a replay of the first ones)
        meta = ckpt_lib.latest_meta(self.checkpointer.directory) if self.checkpointer else None
        if meta and meta.get("mesh", {}).get("data", 1) != shape.data:
            raise RunError(
                f"the checkpoints in {self.checkpointer.directory} were written on a data axis of "
                f"{meta.get('mesh', {}).get('data', 1)} (each agent's envs and replay split over it), "
                f"this run's mesh is {shape}: resume with the same data axis (the seed axis may change)")
        resumes = int(meta["counters"]["resumes"]) + 1 if meta and "counters" in meta else 0
        lay = self.layout
        env = self.cls.make_env(cfg, "train", resumes, members=lay.train_members())
        eval_env = self.video_env = None
        try:
            n_eval = self.cls.eval_envs_per_seed(cfg)
            members = [(i, j) for i in lay.eval_seeds() for j in range(n_eval)]
            if members:
                eval_env = self.cls.make_env(cfg, "eval", resumes, members=members)
            self.video_env = self._make_video_env(resumes)
            return self._execute(env, eval_env)
        finally:
            env.close()
            if eval_env is not None:
                eval_env.close()
            if self.video_env is not None:
                self.video_env.close()

    def _make_video_env(self, resumes: int):
        """The env of the evaluation videos, or None: videos off, no out_dir, or not this
        process's (the process that holds seed index 0's evaluation and writes the logs records
        them; on several hosts, if those differ, no videos are recorded: said in one line)."""
        if self.rc.video_every <= 0:
            return None
        if not self.out:
            self.log(f"[{self.cls.name}] --video_every={self.rc.video_every} without an out_dir: "
                     "no videos")
            return None
        if not self.primary:
            return None
        if 0 not in self.layout.eval_seeds():
            self.log(f"[{self.cls.name}] no videos: seed {self.seeds[0]}'s evaluation runs on "
                     "another process than the one that writes the logs")
            return None
        try:
            return self.cls.make_video_env(self.config, resumes)
        except (NotImplementedError, RuntimeError, ValueError) as err:
            raise RunError(f"--video_every={self.rc.video_every}: no video env: {err}") from None

    def _execute(self, env, eval_env) -> RunResult:
        cfg, log, seeds, lay = self.config, self.log, self.seeds, self.layout
        spec = EnvSpec.of(env)
        trainer = self.cls(cfg, spec, data_shards=lay.shape.data)
        sched = trainer.schedule
        self.trainer, self.sched = trainer, sched
        name = trainer.name
        s = len(seeds)
        log(f"[{name}] " + trainer.describe(env))
        per_device = lay.seeds_per_row
        where = (f", x {s} seed(s)" if lay.shape.size == 1 else
                 f" per data shard, x {per_device} seed(s) per device; mesh {lay.shape} over "
                 f"{lay.shape.size} {lay.mesh.devices.flat[0].platform} devices"
                 + (f" in {jax.process_count()} processes" if lay.multi_process else ""))
        try:
            log(f"[{name}] " + rp.check_memory(trainer.replay_nbytes * per_device,
                                               f"{trainer.replay_summary}{where}",
                                               device=lay.mesh.devices.flat[0]))
        except MemoryError as err:
            raise RunError(str(err)) from None
        self.stepper = Stepper(trainer, lay, overlap=self.rc.overlap)
        keys = seed_keys(seeds)

        # the state: fresh, or restored from the newest readable checkpoint
        counters, restored = Counters(), None
        if self.checkpointer is not None:
            restored = self._restore(trainer, keys)
        if restored is not None:
            carry, counters, with_replay = restored
            counters.resumes += 1
            if not with_replay:
                carry = carry.replace(replay=init_carry(trainer, keys, lay).replay)
                counters.replay_start = counters.iteration
                counters.owed = 0.0
                log(f"[{name}] warning: the checkpoint holds no replay (--checkpoint_replay=false): "
                    f"refilling it, learning again after {sched.warmup:,d} loop steps")
        else:
            carry = init_carry(trainer, keys, lay)
        if self.out:
            if self.primary:
                try:   # the next checkpoint must fit (the previous ones stay until it is complete)
                    self.checkpointer.check_disk(ckpt_lib.tree_nbytes(
                        checkpoint_tree(carry, self.rc.checkpoint_replay)))
                except ckpt_lib.CheckpointError as err:
                    raise RunError(str(err)) from None
            self._start_logs(counters, restored is not None, spec)
        self.seed_of_env = [i for i, _ in lay.train_members()]
        mesh_lib.barrier("flare_jax.loop.first_step")   # processes start their steps together
        ts = env.reset()
        carry, _, flags = self._step(carry, ts, 0, counters.iteration < sched.random_until, counters)
        return self._loop(trainer, env, eval_env, carry, flags, counters)

    def _restore(self, trainer, keys):
        """(carry, counters, with_replay) of the newest readable checkpoint, or None."""
        if not self.checkpointer.steps():
            return None
        lay = self.layout
        template = carry_template(trainer, keys, lay.shape.data)
        t0 = time.time()
        try:
            step, tree, meta = self.checkpointer.restore(
                lambda meta: checkpoint_tree(template, meta.get("with_replay", True)))
        except ckpt_lib.CheckpointError as err:
            raise RunError(str(err)) from None
        counters = Counters(**meta["counters"])
        tree = lay.put(tree, checkpoint_tree(carry_shardings(lay, template), "replay" in tree))
        carry = Carry(agent=tree["agent"], replay=tree.get("replay", template.replay),
                      stack=tree["stack"], action=tree["action"], key=tree["key"])
        done = " (finished; nothing left to do)" if (
            counters.finished and counters.iteration >= self.sched.iterations) else ""
        self.log(f"[{trainer.name}] resuming from {self.checkpointer.path(step)}: agent step "
                 f"{counters.iteration * self.sched.agent_steps_per_iteration:,d}, "
                 f"{counters.iteration * self.sched.units_per_iteration:,d} {self.sched.unit} "
                 f"(read in {time.time() - t0:.1f} s){done}")
        return carry, counters, meta.get("with_replay", True)

    def _start_logs(self, counters: Counters, resumed: bool, spec: EnvSpec):
        if not self.primary:
            return
        trainer = self.trainer
        units = counters.iteration * self.sched.units_per_iteration
        has_logs = any(os.path.exists(os.path.join(self.out, f"seed_{s}")) for s in self.seeds)
        if not resumed and has_logs:
            self.log(f"[{trainer.name}] no checkpoint in {self.out}: starting from step 0 (the "
                     "logs of the unfinished earlier start are cut)")
        self._write_config(spec)
        if self.command:
            write_command(self.out, self.command[0], self.command[1], append=True)
        self.loggers = [RunLogger(os.path.join(self.out, f"seed_{s}"), tensorboard=self.rc.tensorboard,
                                  resume_step=units if (resumed or has_logs) else None)
                        for s in self.seeds]

    # -------------------------------------------------------------------- device step

    def _step(self, carry, ts, n, random, counters, stop=False):
        return self.stepper.step(carry, ts.frame, ts.reward, ts.discount, ts.first, n=n,
                                 random=random, update_count=counters.updates,
                                 progress=counters.iteration / self.sched.iterations, stop=stop)

    # -------------------------------------------------------------------- the loop

    def _loop(self, trainer, env, eval_env, carry, flags, c: Counters) -> RunResult:
        sched, log, name, seeds = self.sched, self.log, trainer.name, self.seeds
        result = RunResult(status=FINISHED, config=self.config, counters=c, evals=[], carry=None,
                           seconds=0.0, unit=sched.unit)
        metrics = None
        recent = [[] for _ in seeds]           # train episode returns since the last train row
        last_returns: Optional[np.ndarray] = None
        progress = Progress(sched.iterations * sched.units_per_iteration, unit=sched.unit,
                            desc=f"{trainer.label} ", initial=c.iteration * sched.units_per_iteration,
                            stream=sys.stderr if self.primary else open(os.devnull, "w"))
        steps = self.checkpointer.steps() if self.checkpointer else []
        last_ckpt = steps[-1] if steps else -1          # in agent steps, as the step names
        step_of = lambda c: c.iteration * sched.agent_steps_per_iteration  # noqa: E731
        stop = StopRequests()
        diverged = None
        stopping = False          # some process was asked to stop (the flags of the last step)
        c.finished = False
        programs, new_program = set(), True     # (n, random) of the compiled device steps
        steady_from = (c.iteration, time.time())

        def check(flags_host) -> bool:
            nonlocal diverged, stopping
            stopping = bool(flags_host[1])
            if flags_host[0]:
                return True
            diverged = _first_nonfinite(self.layout.fetch(metrics), seeds)
            return False

        try:
            with stop, StallWatchdog(self.rc.stall_seconds) as watchdog:
                while c.iteration < sched.iterations:
                    watchdog.beat()
                    action = self.stepper.actions(carry)
                    if not check(np.asarray(flags)) or stopping:
                        break
                    if new_program:      # the previous step compiled (and ran): restart the clock
                        steady_from, new_program = (c.iteration, time.time()), False
                    ts = env.step(action)
                    c.iteration += 1
                    for i in np.flatnonzero(ts.last):
                        recent[self.seed_of_env[i]].append(float(ts.episode_return[i]))
                    n = 0
                    if c.iteration - c.replay_start >= sched.warmup:
                        c.owed += sched.updates_per_iteration
                        if c.iteration % sched.update_every == 0:
                            n = int(c.owed + 1e-9)
                            c.owed -= n
                    random = c.iteration < sched.random_until
                    new_program = (n, random) not in programs
                    programs.add((n, random))
                    carry, m, flags = self._step(carry, ts, n, random, c, stop=stop.requested)
                    if n:
                        c.updates += n
                        metrics = m
                    units = c.iteration * sched.units_per_iteration
                    is_eval = c.iteration % sched.eval_every == 0
                    # the last step's checkpoint is written after the final evaluation
                    is_ckpt = c.iteration % sched.checkpoint_every == 0 and c.iteration < sched.iterations
                    if (is_eval or is_ckpt) and not check(np.asarray(self.stepper.settled(flags))):
                        break
                    if c.iteration % sched.log_every == 0 and self.out:
                        self._log_train(c, metrics, recent)
                        recent = [[] for _ in seeds]
                    if is_eval:
                        watchdog.beat()
                        last_returns = self._evaluate(eval_env, carry, c, result)
                    if is_ckpt and self.checkpointer is not None:
                        watchdog.beat()
                        self._save(carry, c)
                        last_ckpt = step_of(c)
                    if c.iteration % 10 == 0 or c.iteration == sched.iterations:
                        progress.update(units, eval=("-" if last_returns is None
                                                     else np.round(last_returns, 1).tolist()),
                                        updates=c.updates)
                if diverged is None and not stopping:
                    check(np.asarray(self.stepper.settled(flags)))   # the last step's flags
                result.steady = (c.iteration - steady_from[0], time.time() - steady_from[1])
        finally:
            progress.close()
        interrupted = stopping or stop.requested
        agent_steps = c.iteration * sched.agent_steps_per_iteration
        where = f"agent step {agent_steps:,d} ({c.iteration * sched.units_per_iteration:,d} {sched.unit})"
        if diverged is None and not interrupted and c.last_eval != c.iteration:
            last_returns = self._evaluate(eval_env, carry, c, result)
        if diverged is not None:
            last = (f"the last good checkpoint is {self.checkpointer.path(last_ckpt)}"
                    if self.checkpointer and last_ckpt >= 0 else "no checkpoint was written")
            result.status, result.exit_code = DIVERGED, EXIT_DIVERGED
            result.message = (f"[{name}] diverged at {where}: {diverged}; stopped before a "
                              f"non-finite action reached the environment; {last}")
        else:
            c.finished = c.iteration >= sched.iterations
            if self.checkpointer is not None and last_ckpt != step_of(c):
                self._save(carry, c)
            if interrupted:
                result.status = INTERRUPTED
                result.exit_code = stop.exit_code if stop.requested else 128 + 15
                saved = (f"checkpoint {self.checkpointer.path(step_of(c))}; run the same command "
                         "to resume" if self.checkpointer else "no out_dir, nothing saved")
                result.message = f"[{name}] interrupted at {where}: {saved}"
            else:
                result.message = (f"[{name}] done: {where}, {c.updates:,d} updates in "
                                  f"{time.time() - self.t_start:.0f} s")
        for lg in getattr(self, "loggers", []):
            lg.close()
        result.carry, result.seconds = carry, time.time() - self.t_start
        log(result.message)
        return result

    def _log_train(self, c: Counters, metrics, recent):
        host = self.layout.fetch(metrics) if metrics else {}
        sums = np.array([[np.sum(r), len(r)] for r in recent], np.float64)
        sums = mesh_lib.gather_hosts(sums).sum(0)         # [S, 2] over all processes' envs
        if not self.primary:
            return
        sched = self.sched
        for i, lg in enumerate(self.loggers):
            row = {"agent_steps": c.iteration * sched.agent_steps_per_iteration, "updates": c.updates,
                   "episode_return": float(sums[i, 0] / sums[i, 1]) if sums[i, 1] else float("nan"),
                   "episodes": int(sums[i, 1])}
            row.update({k: np.asarray(v)[i] for k, v in host.items()})
            row["wall_seconds"] = time.time() - self.t_start
            lg.log("train", c.iteration * sched.units_per_iteration, row)

    def _evaluate(self, eval_env, carry, c: Counters, result: RunResult) -> np.ndarray:
        """Evaluates every seed (each process its `Layout.eval_seeds`), logs on process 0."""
        t0 = time.time()
        lay = self.layout
        mine = lay.eval_seeds()
        fields = ("return_mean", "return_std", "episodes", "complete")
        table = np.full((len(self.seeds), len(fields)), np.nan)
        agent = keys = None
        if mine:
            keys = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(self.seeds[i]),
                                                           c.iteration)) for i in mine])
            agent = lay.local_rows(carry.agent)
            stats = self._eval_episodes(eval_env, agent, keys, self.trainer.eval_frames)
            table[mine] = [[st[f] for f in fields] for st in stats]
        if lay.multi_process:    # each seed from the process that evaluated it
            parts = mesh_lib.gather_hosts(table)
            table = np.where(np.isnan(parts), -np.inf, parts).max(0)
        units = c.iteration * self.sched.units_per_iteration
        means = table[:, 0].copy()
        result.evals.append((units, means.tolist()))
        c.last_eval = c.iteration
        for lg, row in zip(getattr(self, "loggers", []), table):
            st = dict(zip(fields, row))
            st["episodes"], st["complete"] = int(st["episodes"]), int(st["complete"])
            lg.log("eval", units, {"agent_steps": c.iteration * self.sched.agent_steps_per_iteration,
                                   **st, "eval_seconds": time.time() - t0,
                                   "wall_seconds": time.time() - self.t_start})
        self.log(f"[{self.trainer.name}] eval at {units:,d} {self.sched.unit}: return "
                 f"{np.round(means, 1).tolist()} ({time.time() - t0:.0f} s)")
        if self._video_due(c):
            i = mine.index(0)
            self._record_video(jax.tree.map(lambda x: x[i:i + 1], agent),
                               jax.random.split(keys[i])[1], c)
        return means

    # -------------------------------------------------------------------- videos

    def _video_due(self, c: Counters) -> bool:
        """Whether this evaluation records a video: videos on (and this process's), and its
        number (1, 2, ... counted from the run's start, ceil(iteration / eval_every)) is a
        multiple of `video_every`, or it is the final evaluation of the run."""
        if getattr(self, "video_env", None) is None:
            return False
        number = -(-c.iteration // self.sched.eval_every)
        return number % self.rc.video_every == 0 or c.iteration >= self.sched.iterations

    def _record_video(self, agent, key: Array, c: Counters):
        """One evaluation episode of seed index 0 (`agent`: its rows [1, ...] on the eval device;
        `key`: the video's own key, split from the seed's evaluation key, so no other stream
        changes) on the video env with the trainer's "eval" acts, at most `video_max_steps`
        agent steps; written as `<out_dir>/seed_<first seed>/videos/eval_<step>.mp4` (one
        frame per agent step, the reset frame first: steps + 1 frames; `flare_jax.video`) and,
        with TensorBoard on, a strip of its frames as the image `eval/video`."""
        t0 = time.time()
        env, st, sched, name = self.video_env, self.stepper, self.sched, self.trainer.name
        dev = self.layout.eval_device()
        put = lambda x: jax.device_put(np.asarray(x)[None], dev)  # noqa: E731  [1 seed, 1 env, ...]
        units = c.iteration * sched.units_per_iteration
        head = f"{self.trainer.label}  eval at {units:,d} {sched.unit}"

        def picture(step: int, ret: float) -> np.ndarray:
            return video_lib.annotate(video_lib.upscale(env.render()),
                                      [head, f"step {step}  return {ret:.1f}"])

        ts = env.reset()
        stack = st.stack_init(put(ts.frame))
        frames, steps = [picture(0, 0.0)], 0
        while steps < self.rc.video_max_steps:
            action = np.asarray(st.eval_act(agent, stack, put(jax.random.fold_in(key, steps))))
            ts = env.step(action[0])
            steps += 1
            frames.append(picture(steps, float(ts.episode_return[0])))
            if ts.last[0]:
                break
            stack = st.stack_push(stack, put(ts.frame), put(ts.first))
        path = os.path.join(self.out, f"seed_{self.seeds[0]}", "videos", f"eval_{units}.mp4")
        try:
            n, h, w = video_lib.write_mp4(path, frames)
        except (OSError, RuntimeError) as err:     # a video is not worth the run
            self.log(f"[{name}] warning: the video at {units:,d} {sched.unit} was not written: {err}")
            return
        self.loggers[0].image(units, "eval/video", video_lib.frame_strip(frames))
        end = "episode end" if ts.last[0] else f"cut at --video_max_steps={self.rc.video_max_steps}"
        self.log(f"[{name}] video at {units:,d} {sched.unit}: {n} frames of {w}x{h} px ({steps} agent "
                 f"steps, {end}, return {float(ts.episode_return[0]):.1f}; {env.kind}) -> {path} "
                 f"({time.time() - t0:.1f} s)")

    def _eval_episodes(self, env, agent, keys: np.ndarray, frames: Optional[int]) -> list[dict]:
        """Evaluation episodes on `env` (S seeds x N envs, seed-major) with the agent's "eval" acts.

        frames=None: every env runs one episode; a seed's return is the mean over its N envs.
        Else each seed runs `frames` frames over its N envs; its return is the mean of the episodes
        completed in that budget (if none completed, of the unfinished ones, with complete=0).
        Returns one dict per seed: return_mean, return_std, episodes, complete.
        """
        st, s, dev = self.stepper, len(keys), self.layout.eval_device()
        split = lambda x: jax.device_put(x.reshape((s, -1) + x.shape[1:]), dev)  # noqa: E731
        ts = env.reset()
        stack = st.stack_init(split(ts.frame))
        n = env.num_envs // s
        done = np.zeros(env.num_envs, bool)
        first_returns = np.zeros(env.num_envs)
        completed = [[] for _ in range(s)]
        used = 0
        step = 0
        while True:
            if frames is None and done.all():
                break
            if frames is not None and used >= frames:
                break
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(jax.device_put(keys, dev), step)
            action = np.asarray(st.eval_act(agent, stack, step_keys))
            ts = env.step(action.reshape((env.num_envs,) + action.shape[2:]))
            step += 1
            used += n * getattr(env, "frames_per_step", 1)
            returns = ts.episode_return
            for i in np.flatnonzero(ts.last):
                if frames is None and not done[i]:
                    first_returns[i] = returns[i]
                completed[i // n].append(float(returns[i]))
            done |= ts.last
            stack = st.stack_push(stack, split(ts.frame), split(ts.first))
        out = []
        for i in range(s):
            if frames is None:
                r = first_returns[i * n:(i + 1) * n]
                out.append(dict(return_mean=float(r.mean()), return_std=float(r.std()), episodes=n, complete=1))
            elif completed[i]:
                r = np.array(completed[i])
                out.append(dict(return_mean=float(r.mean()), return_std=float(r.std()),
                                episodes=len(r), complete=1))
            else:
                r = np.asarray(ts.episode_return)[i * n:(i + 1) * n]
                out.append(dict(return_mean=float(r.mean()), return_std=float(r.std()), episodes=0, complete=0))
        return out

    def _save(self, carry: Carry, c: Counters):
        meta = {"counters": dataclasses.asdict(c), "with_replay": self.rc.checkpoint_replay,
                "mesh": _mesh_record(self.layout),
                **_config_record(self.trainer.name, self.config, self.trainer.spec)}
        tree = checkpoint_tree(carry, self.rc.checkpoint_replay)
        if self.layout.multi_process:      # every process takes part; process 0 writes
            tree = self.layout.fetch(tree)
        if not self.primary:
            return
        try:
            rep = self.checkpointer.save(c.iteration * self.sched.agent_steps_per_iteration, tree, meta)
        except ckpt_lib.CheckpointError as err:
            raise RunError(str(err)) from None
        self.log(f"[{self.trainer.name}] checkpoint at agent step "
                 f"{c.iteration * self.sched.agent_steps_per_iteration:,d}: "
                 f"{rep.nbytes / 2**20:,.1f} MiB in {rep.seconds:.1f} s -> {rep.path}")


def load_state(trainer_cls, run_dir: str, step: Optional[int] = None):
    """(config, trainer, carry, counters) of a run directory's newest readable checkpoint (or
    `step`), read without changing the directory; the carry's leaves are [S, ...] (agent, key)
    and [S, D, ...] (replay, stacks, actions; D data shards), on the default device."""
    record = read_config_json(run_dir)
    if record.get("agent") != trainer_cls.name:
        raise RunError(f"{run_dir} holds a {record.get('agent')!r} run, not {trainer_cls.name!r}")
    config = config_flags.from_dict(trainer_cls.config_cls, record["config"])
    spec = record["env_spec"]
    spec = EnvSpec(**dict(spec, frame_shape=tuple(spec["frame_shape"]),
                          action_shape=tuple(spec["action_shape"])))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    if not checkpointer.steps():
        raise RunError(f"{run_dir} holds no checkpoint")
    made = {}

    def template(meta):
        made["trainer"] = trainer_cls(config, spec, data_shards=meta.get("mesh", {}).get("data", 1))
        made["template"] = carry_template(made["trainer"], seed_keys(config.run.seeds),
                                          made["trainer"].data_shards)
        return checkpoint_tree(made["template"], meta.get("with_replay", True))
    _, tree, meta = checkpointer.restore(template, step=step)
    carry = Carry(agent=tree["agent"], replay=tree.get("replay", made["template"].replay),
                  stack=tree["stack"], action=tree["action"], key=tree["key"])
    return config, made["trainer"], carry, Counters(**meta["counters"])


def run_status(run_dir: str) -> Optional[dict]:
    """The host counters of a run directory's newest checkpoint (None if it has none)."""
    meta = ckpt_lib.latest_meta(os.path.join(run_dir, "checkpoints"))
    return None if meta is None else meta["counters"]


def exit_with(result: RunResult):
    """Ends a launcher: status 0 when the run finished, else the result's exit code."""
    sys.stdout.flush()
    if result.exit_code:
        sys.exit(result.exit_code)

