"""Prioritised replay on the device (Schaul et al. 2016, as in DQN Zoo's Rainbow).

The frames, stacks and n-step returns come from `flare_jax.data.replay` (one frame per slot); this
module adds two sum trees over its [E, S] slots (`flare_jax.data.sum_tree`):

* `priorities`: leaf = priority ** alpha for slots holding a valid transition, 0 otherwise;
* `valid`: leaf = 1 for valid slots, 0 otherwise (uniform draws over valid transitions and their
  count).

A draw is uniform over valid transitions with probability `uniform_mix` (1e-3) and proportional
to priority ** alpha otherwise: P(i) = (1 - eps) p_i^a / sum_j p_j^a + eps / N_valid. Importance
weights (N_valid * P(i)) ** -beta are normalised by the batch maximum. New transitions enter at
the largest priority seen so far. Invalid slots (not yet written, episode starts, n-step window
not complete, stack history overwritten) have zero weight in both trees and are never drawn;
a zero-priority valid transition is reachable only through the uniform mixture.

Data shards (`flare_jax.mesh`, axis_name given): every shard holds one sum tree over its own
envs' slots, and sampling is *stratified per shard*: each shard draws its B / D rows from its
own tree. A row of shard d is then drawn with probability
P(i) = [(1 - eps) p_i^a / T_d + eps / N_d] / D (T_d, N_d: the shard's priority total and valid
count), the single-device formula when the shards have equal totals; the weights keep the
single-device definition (N P(i)) ** -beta with the global N = sum_d N_d (`psum`), normalised by
the maximum over the whole batch (`pmax`), and new transitions enter at the largest priority
seen on any shard (`pmax`). Within a shard, frequencies follow p^a exactly.

Each `add` refreshes the (2 + stack) slots per env whose validity can change: the slot written,
the slot whose n-step window completes, and the slots at the old end of the ring.
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import struct

from flare_jax import mesh as mesh_lib
from flare_jax.data import replay as rp
from flare_jax.data import sum_tree

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PrioritizedConfig:
    replay: rp.ReplayConfig
    alpha: float = 0.5               # priority exponent
    uniform_mix: float = 1e-3        # probability of a uniform draw
    initial_max_priority: float = 1.0
    normalize_weights: bool = True

    def __post_init__(self):
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in [0, 1], got {self.uniform_mix}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


@struct.dataclass
class PrioritizedState:
    replay: rp.ReplayState
    priorities: sum_tree.SumTree     # leaves [E*S]: priority ** alpha on valid slots
    valid: sum_tree.SumTree          # leaves [E*S]: 1 on valid slots
    max_priority: Array              # [] largest priority seen (before the exponent)


def nbytes(config: PrioritizedConfig) -> int:
    """Device memory of the state: the replay and its two sum trees."""
    n = config.replay.num_envs * config.replay.slots
    return config.replay.nbytes + 2 * sum_tree.nbytes(n) + 4


def init(config: PrioritizedConfig) -> PrioritizedState:
    n = config.replay.num_envs * config.replay.slots
    return PrioritizedState(replay=rp.init(config.replay), priorities=sum_tree.init(n),
                            valid=sum_tree.init(n),
                            max_priority=jnp.asarray(config.initial_max_priority, jnp.float32))


def _flat(config: PrioritizedConfig, env: Array, slot: Array) -> Array:
    return env * config.replay.slots + slot


def add(config: PrioritizedConfig, state: PrioritizedState, frame: Array, action: Array,
        reward: Array, discount: Array, first: Array) -> PrioritizedState:
    """`replay.add` plus the tree refresh of the slots whose validity may have changed."""
    rc = config.replay
    s, e = rc.slots, rc.num_envs
    old = state.replay.cursor
    replay = rp.add(rc, state.replay, frame, action, reward, discount, first)
    new = replay.cursor
    ready = (old - (rc.n_step - 1)) % s                          # n-step window just completed
    slots = jnp.stack([old, ready] + [(new + j) % s for j in range(rc.stack)])   # [2 + stack]
    env = jnp.repeat(jnp.arange(e), slots.shape[0])
    slot = jnp.tile(slots, e)
    idx = _flat(config, env, slot)
    valid = rp._valid(rc, replay, env, slot)                     # pylint: disable=protected-access
    current = state.priorities.nodes[idx + state.priorities.capacity]
    fresh = state.max_priority ** config.alpha
    prio = jnp.where(valid, jnp.where(slot == ready, fresh, current), 0.0)
    return state.replace(replay=replay,
                         priorities=sum_tree.set_leaves(state.priorities, idx, prio),
                         valid=sum_tree.set_leaves(state.valid, idx, valid.astype(jnp.float32)))


def sample(config: PrioritizedConfig, state: PrioritizedState, key: Array, batch_size: int,
           beta: Array, axis_name=None) -> tuple[rp.Batch, Array, Array]:
    """(batch, importance weights [B], probabilities [B]); requires at least one valid slot.

    `axis_name`: this data shard's B rows of a stratified batch (module docstring); `key`
    must differ between shards (`flare_jax.mesh.shard_key`)."""
    k_prop, k_unif, k_mix = jax.random.split(key, 3)
    eps = config.uniform_mix
    prio_total = state.priorities.total()
    num_valid = state.valid.total()
    prop = sum_tree.sample(state.priorities, k_prop, batch_size)
    unif = sum_tree.sample(state.valid, k_unif, batch_size)
    use_unif = (jax.random.uniform(k_mix, (batch_size,)) < eps) | (prio_total <= 0)
    idx = jnp.where(use_unif, unif, prop)
    p_prop = jnp.where(prio_total > 0,
                       state.priorities.nodes[idx + state.priorities.capacity] / prio_total, 0.0)
    mix = jnp.where(prio_total > 0, eps, 1.0)
    prob = (1.0 - mix) * p_prop + mix / num_valid
    if axis_name is not None:
        prob = prob / jax.lax.axis_size(axis_name)
    weights = (mesh_lib.psum(num_valid, axis_name) * prob) ** (-beta)
    if config.normalize_weights:
        weights = weights / mesh_lib.pmax(jnp.max(weights), axis_name)
    s = config.replay.slots
    batch = rp.gather(config.replay, state.replay, idx // s, idx % s)
    return batch, weights, prob


def update_priorities(config: PrioritizedConfig, state: PrioritizedState, env: Array, slot: Array,
                      priorities: Array, axis_name=None) -> PrioritizedState:
    """Sets the priorities (>= 0, before the exponent) of sampled transitions [B] (of this data
    shard; the largest priority is tracked over all shards)."""
    chex.assert_equal_shape([env, slot, priorities])
    idx = _flat(config, env, slot)
    still_valid = state.valid.nodes[idx + state.valid.capacity] > 0
    leaf = jnp.where(still_valid, jnp.maximum(priorities, 0.0) ** config.alpha, 0.0)
    return state.replace(priorities=sum_tree.set_leaves(state.priorities, idx, leaf),
                         max_priority=jnp.maximum(state.max_priority,
                                                  mesh_lib.pmax(jnp.max(priorities), axis_name)))


def beta_schedule(progress: Array, start: float = 0.4, end: float = 1.0) -> Array:
    """Importance exponent annealed linearly from `start` to `end` as progress goes 0 -> 1."""
    return start + (end - start) * jnp.clip(progress, 0.0, 1.0)
