"""Device-resident replay that stores each frame once and rebuilds stacks at sample time.

A buffer is a config (static, validated at construction) plus a `ReplayState` pytree of arrays on
the JAX device, and a few pure functions over them (`init`, `add`, `sample`, ...): jit them and
donate the state (`jax.jit(add, donate_argnums=0)`); without donation every insert copies the
whole buffer.

Layout. `num_envs` environments write in lockstep; each has its own ring of `slots` frames
([E, S, *frame_shape]). Slot k of an env holds the frame that arrived at one agent step, with the
action, reward and discount of the transition that produced it and a `first` flag when the frame
starts an episode (then action/reward are ignored). A transition is identified by its *arrival*
slot k: obs is the stack ending at k-1, next_obs the stack ending at k (or k+n-1 for n-step).

Stacks never mix episodes: walking back from the newest frame, a stack stops at its episode's
first frame and the missing older frames are either copies of that first frame
(`pad="repeat_first"`, DMC/RAD) or zeros (`pad="zeros"`, Atari/DQN Zoo).

Only valid transitions are sampled: the arrival frame is written and does not start an episode,
all frames of both stacks are still in the ring, and (n-step) the n-1 following slots are written.
Capacity is counted in transitions: S = ceil(capacity / E) + stack + n_step slots per env, so the
buffer holds `capacity` transitions (minus one per episode start it contains).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
PADDINGS = ("repeat_first", "zeros")


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """Static buffer configuration. Shapes are per environment step (one frame, one action)."""
    capacity: int                     # transitions, over all envs
    frame_shape: tuple[int, ...]      # e.g. (100, 100, 3) uint8 pixels, (D,) float32 states
    action_shape: tuple[int, ...]     # (A,) continuous, () discrete
    num_envs: int = 1
    stack: int = 3                    # frames per observation (T)
    frame_dtype: Any = jnp.uint8
    action_dtype: Any = jnp.float32
    pad: str = "repeat_first"
    n_step: int = 1
    discount: float = 0.99            # gamma used for the returned n-step reward and discount

    def __post_init__(self):
        errors = []
        if self.capacity < 1:
            errors.append(f"capacity must be >= 1 transition, got {self.capacity}")
        if self.num_envs < 1:
            errors.append(f"num_envs must be >= 1, got {self.num_envs}")
        if self.stack < 1:
            errors.append(f"stack must be >= 1, got {self.stack}")
        if self.n_step < 1:
            errors.append(f"n_step must be >= 1, got {self.n_step}")
        if self.pad not in PADDINGS:
            errors.append(f"pad must be one of {PADDINGS}, got {self.pad!r}")
        if not 0.0 <= self.discount <= 1.0:
            errors.append(f"discount must be in [0, 1], got {self.discount}")
        if errors:
            raise ValueError("invalid ReplayConfig: " + "; ".join(errors))
        object.__setattr__(self, "frame_shape", tuple(int(d) for d in self.frame_shape))
        object.__setattr__(self, "action_shape", tuple(int(d) for d in self.action_shape))

    @property
    def slots(self) -> int:
        """Ring size per environment (frames)."""
        return math.ceil(self.capacity / self.num_envs) + self.stack + self.n_step

    @property
    def nbytes(self) -> int:
        """Device memory of the state."""
        per_slot = (np.prod(self.frame_shape, dtype=np.int64) * np.dtype(self.frame_dtype).itemsize
                    + np.prod(self.action_shape, dtype=np.int64) * np.dtype(self.action_dtype).itemsize
                    + 4 + 4 + 1)
        return int(per_slot * self.slots * self.num_envs)


@struct.dataclass
class ReplayState:
    frames: Array       # [E, S, *frame_shape]
    actions: Array      # [E, S, *action_shape]: action that led to this slot's frame
    rewards: Array      # [E, S] float32: reward of that transition
    discounts: Array    # [E, S] float32: discount of that transition (0 at a terminal/life loss)
    first: Array        # [E, S] bool: this frame starts an episode
    cursor: Array       # [] int32: next slot to write
    count: Array        # [] int32: slots written so far (<= S)


@struct.dataclass
class Batch:
    obs: Array          # [B, T, *frame_shape]
    action: Array       # [B, *action_shape]
    reward: Array       # [B] n-step discounted reward sum (n=1: the reward)
    discount: Array     # [B] gamma^n_eff * product of transition discounts: y = r + discount * V(s')
    next_obs: Array     # [B, T, *frame_shape]
    env: Array          # [B] int32 env index   } identify the transition (for priorities)
    slot: Array         # [B] int32 arrival slot }


def available_memory_bytes(device=None) -> Optional[int]:
    """Free memory of `device` (accelerator: allocator limit minus use; CPU: MemAvailable)."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: int, summary: str, device=None, headroom: float = 0.8) -> str:
    """"<summary> = X GiB (device has Y GiB free)"; raises MemoryError (one line) when `nbytes`
    exceed `headroom` of the device's free memory."""
    free = available_memory_bytes(device)
    line = f"{summary} = {nbytes / 2**30:.2f} GiB"
    if free is not None:
        line += f" (device has {free / 2**30:.1f} GiB free)"
        if nbytes > headroom * free:
            raise MemoryError(f"{line}: does not fit in {headroom:.0%} of the free device memory; "
                              f"reduce it to at most {headroom * free / 2**30:.2f} GiB (e.g. "
                              f"--replay_capacity x {headroom * free / nbytes:.2f}, or fewer seeds)")
    return line


def describe(config: ReplayConfig) -> str:
    return (f"replay: {config.capacity:,d} transitions x {config.num_envs} env(s), "
            f"{config.slots:,d} slots/env of {config.frame_shape} "
            f"{np.dtype(config.frame_dtype).name} frames")


def check_fits(config: ReplayConfig, copies: int = 1, device=None, headroom: float = 0.8) -> str:
    """`check_memory` for `copies` buffers of `config` (e.g. one per vmapped seed)."""
    summary = describe(config) + (f", x {copies} seeds" if copies > 1 else "")
    return check_memory(config.nbytes * copies, summary, device, headroom)


def init(config: ReplayConfig, device=None) -> ReplayState:
    """An empty buffer on `device` (default device if None)."""
    e, s = config.num_envs, config.slots
    zeros = lambda shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731
    state = ReplayState(
        frames=zeros((e, s) + config.frame_shape, config.frame_dtype),
        actions=zeros((e, s) + config.action_shape, config.action_dtype),
        rewards=zeros((e, s), jnp.float32),
        discounts=zeros((e, s), jnp.float32),
        first=jnp.zeros((e, s), bool),
        cursor=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32))
    return jax.device_put(state, device) if device is not None else state


def add(config: ReplayConfig, state: ReplayState, frame: Array, action: Array, reward: Array,
        discount: Array, first: Array) -> ReplayState:
    """Writes one step of every env: the frame that arrived and the transition that led to it.

    frame [E, *frame_shape]; action [E, *action_shape]; reward, discount [E]; first [E] bool
    (True: `frame` starts an episode; its action/reward/discount are ignored).
    """
    e = config.num_envs
    chex.assert_shape(frame, (e,) + config.frame_shape)
    chex.assert_shape(action, (e,) + config.action_shape)
    chex.assert_shape([reward, discount, first], (e,))
    c = state.cursor
    first = first.astype(bool)
    keep = ~first
    return state.replace(
        frames=state.frames.at[:, c].set(frame.astype(config.frame_dtype)),
        actions=state.actions.at[:, c].set(
            jnp.where(keep.reshape((e,) + (1,) * len(config.action_shape)), action, 0)
            .astype(config.action_dtype)),
        rewards=state.rewards.at[:, c].set(jnp.where(keep, reward, 0.0).astype(jnp.float32)),
        discounts=state.discounts.at[:, c].set(jnp.where(keep, discount, 1.0).astype(jnp.float32)),
        first=state.first.at[:, c].set(first),
        cursor=(c + 1) % config.slots,
        count=jnp.minimum(state.count + 1, config.slots))


def _age(config: ReplayConfig, state: ReplayState, slot: Array) -> Array:
    """Steps since `slot` was written: 0 for the newest slot."""
    return (state.cursor - 1 - slot) % config.slots


def _valid(config: ReplayConfig, state: ReplayState, env: Array, slot: Array) -> Array:
    """Whether a transition arriving at `slot` of `env` may be sampled (broadcasts)."""
    s = config.slots
    age = _age(config, state, slot)
    written = age < state.count
    # Frames back to k - stack (the obs stack) must still be in the ring. While the ring is not
    # full, slot 0 holds the first frame of an episode, so stacks stop before reaching unwritten
    # slots; once full, the oldest `stack` slots may be needed by a stack and are skipped.
    history_kept = (state.count < s) | (age + config.stack <= s - 1)
    n_step_ready = age >= config.n_step - 1
    return written & history_kept & n_step_ready & ~state.first[env, slot]


def valid_mask(config: ReplayConfig, state: ReplayState) -> Array:
    """[E, S] bool: arrival slots of transitions that may be sampled."""
    env = jnp.arange(config.num_envs)[:, None]
    slot = jnp.arange(config.slots)[None, :]
    return _valid(config, state, env, slot)


def _stack_positions(config: ReplayConfig, state: ReplayState, env: Array, end: Array,
                     length: int) -> tuple[Array, Array]:
    """Slots of the `length` frames ending at slot `end` of env `env`, oldest first, and a mask
    of the positions that lie before the episode's first frame (they repeat that first frame).

    Walks back from `end`; once it reaches an episode's first frame it stays there.
    """
    s = config.slots
    pos, pad = [end], [jnp.zeros((), bool)]
    for _ in range(length - 1):
        at_start = state.first[env, pos[-1]] | pad[-1]
        pos.append(jnp.where(at_start, pos[-1], (pos[-1] - 1) % s))
        pad.append(at_start)
    return jnp.stack(pos[::-1]), jnp.stack(pad[::-1])


def _gather_stack(config: ReplayConfig, state: ReplayState, env: Array, end: Array) -> Array:
    """[T, *frame_shape]: the observation stack ending at slot `end` of env `env`."""
    pos, pad = _stack_positions(config, state, env, end, config.stack)
    stack = state.frames[env, pos]
    if config.pad == "zeros":
        mask = (~pad).reshape(pad.shape + (1,) * len(config.frame_shape))
        stack = jnp.where(mask, stack, jnp.zeros((), stack.dtype))
    return stack


def _n_step(config: ReplayConfig, state: ReplayState, env: Array, slot: Array):
    """n-step reward, discount and bootstrap slot of the transition arriving at `slot`.

    The window covers slots slot..slot+n-1 (all written: see `valid_mask`) and stops before a
    frame that starts a new episode; there it bootstraps from the episode's last frame with the
    discounts stored so far (0 after a terminal step or life loss, 1 at a time limit).
    """
    s, gamma = config.slots, config.discount
    ret, disc, end, alive = jnp.float32(0.0), jnp.float32(1.0), slot, jnp.bool_(True)
    for i in range(config.n_step):
        k = (slot + i) % s
        if i > 0:
            alive = alive & ~state.first[env, k]
        ret = ret + jnp.where(alive, disc * state.rewards[env, k], 0.0)
        disc = jnp.where(alive, disc * gamma * state.discounts[env, k], disc)
        end = jnp.where(alive, k, end)
    return ret, disc, end


def gather(config: ReplayConfig, state: ReplayState, env: Array, slot: Array) -> Batch:
    """The transitions with arrival slots `slot` [B] of envs `env` [B]."""
    def one(e, k):
        reward, discount, end = _n_step(config, state, e, k)
        obs = _gather_stack(config, state, e, (k - 1) % config.slots)
        next_obs = _gather_stack(config, state, e, end)
        return obs, state.actions[e, k], reward, discount, next_obs

    obs, action, reward, discount, next_obs = jax.vmap(one)(env, slot)
    return Batch(obs=obs, action=action, reward=reward, discount=discount, next_obs=next_obs,
                 env=env, slot=slot)


def sample_proportional(key: Array, weights: Array, batch_size: int) -> Array:
    """Draws `batch_size` flat indices with probability proportional to `weights` (>= 0).

    Inverse-CDF sampling on a two-level cumulative sum (blocks of 1024), vectorised: O(N) work
    per call but no sequential tree updates, and the float32 sums stay accurate at 1M items.
    A zero-weight item is never returned: a draw that lands on one (float rounding at a block
    or array edge) moves to the nearest preceding positive item, or the first positive one.
    If every weight is zero the result is undefined (callers check `valid_mask(...).any()`).
    """
    n = weights.shape[0]
    block = 1024
    nb = -(-n // block)
    w = jnp.pad(weights.astype(jnp.float32), (0, nb * block - n)).reshape(nb, block)
    block_cdf = jnp.cumsum(w.sum(1))                             # [nb]
    total = block_cdf[-1]
    u = jax.random.uniform(key, (batch_size,), jnp.float32) * total
    b = jnp.clip(jnp.searchsorted(block_cdf, u, side="right"), 0, nb - 1)
    u_in = u - jnp.where(b > 0, block_cdf[jnp.maximum(b - 1, 0)], 0.0)
    in_cdf = jnp.cumsum(w[b], axis=1)                            # [B, block]
    j = jnp.clip(jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(in_cdf, u_in), 0, block - 1)
    idx = jnp.minimum(b * block + j, n - 1)
    positive = weights > 0
    flat_pos = jnp.arange(n)
    last_pos_before = jax.lax.cummax(jnp.where(positive, flat_pos, -1))       # [N]
    first_pos = jnp.argmax(positive)
    fixed = jnp.where(positive[idx], idx, last_pos_before[idx])
    return jnp.where(fixed >= 0, fixed, first_pos).astype(jnp.int32)


def sample_uniform(key: Array, mask: Array, batch_size: int) -> Array:
    """`batch_size` flat indices drawn uniformly from the True entries of `mask` [N].

    Exact: the u-th valid index for u ~ U{0..#valid-1}, found on an integer cumulative count.
    """
    counts = jnp.cumsum(mask.astype(jnp.int32))
    u = jax.random.randint(key, (batch_size,), 0, jnp.maximum(counts[-1], 1))
    return jnp.searchsorted(counts, u, side="right").astype(jnp.int32)


def sample_valid_uniform(config: ReplayConfig, state: ReplayState, key: Array, batch_size: int,
                         tries: int = 16) -> tuple[Array, Array]:
    """(env, slot) [B] int32 of valid transitions, uniform, with replacement; O(B * tries) work
    unless the rare exact pass runs (O(E * S)).

    Fast path: each of the B draws takes the first valid one of `tries` candidates drawn
    uniformly from the written slots (env in [0, E), age in [0, count)); given that one is
    valid, it is uniform over the valid slots. When some draw has no valid candidate (at most a
    fraction (invalid/written)^tries of draws: episode starts are ~1% of slots), the whole batch
    comes instead from the exact sampler, `sample_uniform` on the [E * S] valid mask.

    The exact pass is the body of a `lax.while_loop` that runs 0 or 1 times (its flag says "a
    draw found no valid candidate and the exact pass has not run yet"), not a branch of a
    `lax.cond`. The result is the same for one call, but under `jax.vmap` over seeds (or inside
    shard_map around such a vmap) a cond with a batched predicate becomes a `select` that
    computes both branches for every member, so every call would pay O(E * S); a while_loop
    with a batched predicate runs while any member needs it: zero times when none does, once
    otherwise (members that did not need it keep their fast draws). The body reads the state
    through the loop flag: without that, XLA's loop-invariant code motion would hoist the
    O(E * S) mask and cumsum out of the loop and run them on every call.
    """
    k_env, k_age, k_exact = jax.random.split(key, 3)
    env = jax.random.randint(k_env, (batch_size, tries), 0, config.num_envs)
    age = jax.random.randint(k_age, (batch_size, tries), 0, jnp.maximum(state.count, 1))
    slot = (state.cursor - 1 - age) % config.slots
    ok = _valid(config, state, env, slot)                         # [B, tries]
    pick = jnp.argmax(ok, axis=1)
    env_f = jnp.take_along_axis(env, pick[:, None], 1)[:, 0].astype(jnp.int32)
    slot_f = jnp.take_along_axis(slot, pick[:, None], 1)[:, 0].astype(jnp.int32)
    need_exact = ~ok.any(axis=1).all()                            # [] bool

    def exact(carry):
        pending = carry[2]                                        # True whenever this runs
        # The fields valid_mask reads pass through the loop flag (a no-op: it is True here), so
        # the O(E * S) work depends on a loop variable and stays inside the loop.
        live = state.replace(first=state.first & pending,
                             cursor=jnp.where(pending, state.cursor, 0),
                             count=jnp.where(pending, state.count, 0))
        flat = sample_uniform(k_exact, valid_mask(config, live).reshape(-1), batch_size)
        return ((flat // config.slots).astype(jnp.int32), (flat % config.slots).astype(jnp.int32),
                jnp.zeros((), bool))

    env, slot, _ = jax.lax.while_loop(lambda carry: carry[2], exact, (env_f, slot_f, need_exact))
    return env, slot


def sample(config: ReplayConfig, state: ReplayState, key: Array, batch_size: int) -> Batch:
    """A uniform batch of valid transitions (with replacement)."""
    env, slot = sample_valid_uniform(config, state, key, batch_size)
    return gather(config, state, env, slot)


def num_valid(config: ReplayConfig, state: ReplayState) -> Array:
    return valid_mask(config, state).sum()


class Replay:
    """Bundles a config with its jitted pure functions (state donated), for training loops.

        buf = Replay(config); state = buf.init()
        state = buf.add(state, frame, action, reward, discount, first)
        batch = buf.sample(state, key, 128)
    """

    def __init__(self, config: ReplayConfig):
        self.config = config
        self.add = jax.jit(lambda s, *a: add(config, s, *a), donate_argnums=0)
        self.sample = jax.jit(lambda s, k, b: sample(config, s, k, b), static_argnums=2)
        self.num_valid = jax.jit(lambda s: num_valid(config, s))

    def init(self, device=None) -> ReplayState:
        return init(self.config, device)
