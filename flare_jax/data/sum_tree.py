"""A sum tree on the device: proportional sampling in O(B log N), updates in O(B log N).

The tree is a flat array of 2P nodes (P = the next power of two >= N leaves): node 1 is the
root, node i has children 2i and 2i+1, leaves are nodes P..P+N-1. Each update sets leaves and
recomputes their ancestors from their children (not by adding deltas), so float32 round-off
never accumulates, whatever the number of updates.

Why a tree rather than a cumulative sum per batch: at 1M items an O(N) pass (cumsum or mask) costs
milliseconds on a CPU per sampled batch; a tree costs ~20 gathers of B values. Sampling descends
from the root and never enters a subtree whose sum is zero, so a zero-weight leaf is never
returned, float round-off included.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class SumTree:
    nodes: Array                                   # [2P] float32
    num_leaves: int = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:                     # P
        return self.nodes.shape[-1] // 2

    @property
    def depth(self) -> int:
        return self.capacity.bit_length() - 1

    def total(self) -> Array:
        return self.nodes[..., 1]

    def leaves(self) -> Array:
        return self.nodes[..., self.capacity:self.capacity + self.num_leaves]


def _capacity(num_leaves: int) -> int:
    return 1 << max(num_leaves - 1, 0).bit_length()


def nbytes(num_leaves: int) -> int:
    """Device memory of a tree over `num_leaves` leaves."""
    return 2 * _capacity(num_leaves) * 4


def init(num_leaves: int) -> SumTree:
    if num_leaves < 1:
        raise ValueError(f"a sum tree needs >= 1 leaf, got {num_leaves}")
    return SumTree(nodes=jnp.zeros((2 * _capacity(num_leaves),), jnp.float32), num_leaves=num_leaves)


def set_leaves(tree: SumTree, index: Array, value: Array) -> SumTree:
    """Sets leaves `index` [B] to `value` [B] (>= 0) and refreshes their ancestors.

    Duplicate indices take one of their values; ancestors stay consistent either way.
    """
    p = tree.capacity
    node = index.astype(jnp.int32) + p
    nodes = tree.nodes.at[node].set(value.astype(jnp.float32))
    for _ in range(tree.depth):
        node = node // 2
        nodes = nodes.at[node].set(nodes[2 * node] + nodes[2 * node + 1])
    return tree.replace(nodes=nodes)


def sample(tree: SumTree, key: Array, batch_size: int) -> Array:
    """`batch_size` leaf indices drawn with probability proportional to the leaf values.

    Requires total() > 0 (callers check). Never returns a zero-valued leaf.
    """
    u = jax.random.uniform(key, (batch_size,), jnp.float32) * tree.total()
    node = jnp.ones((batch_size,), jnp.int32)
    for _ in range(tree.depth):
        left, right = 2 * node, 2 * node + 1
        left_sum, right_sum = tree.nodes[left], tree.nodes[right]
        go_left = (u < left_sum) & (left_sum > 0) | (right_sum <= 0)
        u = jnp.where(go_left, u, u - left_sum)
        # u may exceed the right sum by round-off; it only needs to stay inside its subtree
        u = jnp.clip(u, 0.0, jnp.where(go_left, left_sum, right_sum))
        node = jnp.where(go_left, left, right)
    return node - tree.capacity


def probability(tree: SumTree, index: Array) -> Array:
    """P(index) under `sample`: leaf value / total."""
    return tree.nodes[index + tree.capacity] / tree.total()
