"""The device mesh of a run: a `seed` axis and a `data` axis, over one host or several.

    shape = mesh.resolve("seed:2,data:2", num_seeds=4, num_envs=2, batch_size=128)
    layout = mesh.Layout(mesh.make(shape), num_seeds=4, envs_per_seed=2)

* seed axis (S_dev devices): the run's S seeds are split over it, S / S_dev per device, vmapped
  within a device; no communication between seeds.
* data axis (D devices): one agent learns on D devices. Each data shard owns E / D of a seed's E
  environments, its own replay shard (capacity / D transitions, frames stored once, on its
  device), samples B / D of each batch from it, and the gradients and metrics are averaged over
  `data` (`pmean`); the parameters stay replicated and identical.

Carry leaves get leading axes by role (`flare_jax.loop.Carry`): the agent and the loop key
[S, ...] with spec P("seed") (replicated over `data`); replay, acting stacks and actions
[S, D, E / D, ...] with spec P("seed", "data"). The device step is `jax.shard_map` over the mesh
of a function vmapped over the seeds of a device; one device is the mesh (1, 1).

Random numbers of a batch that is split over `data` (augmentation offsets, SAC's policy noise) are
drawn for the whole batch from the replicated key and each shard takes its rows (`batch_draw`):
a data-parallel update computes what a one-device update computes on the concatenated batch, up
to the order of float sums.

Multi-host (`init_distributed`): every process holds some devices of the mesh; it runs the
environments of its devices' shards (`Layout.train_members`), builds its part of the global
arrays from them (`Layout.put_envs`) and reads back only its own shards (`Layout.get_envs`).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("seed", "data")
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MeshShape:
    seed: int = 1
    data: int = 1

    @property
    def size(self) -> int:
        return self.seed * self.data

    def __str__(self) -> str:
        return f"seed:{self.seed},data:{self.data}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in _divisors(n) if d <= max(at_most, 1))


def parse_spec(spec: str) -> Optional[MeshShape]:
    """`--mesh` syntax -> MeshShape (None for "auto"); raises ValueError naming the valid forms.
    "" or "1": one device; "seed:S,data:D" (an axis left out has size 1)."""
    spec = (spec or "").strip()
    if spec in ("", "1"):
        return MeshShape()
    if spec == "auto":
        return None
    sizes = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in AXES or name in sizes or not value.strip().isdigit():
            raise ValueError(f"--mesh={spec!r}: expected seed:S,data:D (e.g. seed:2,data:2), "
                             "auto, or empty for one device")
        sizes[name] = int(value)
    if min(sizes.values()) < 1:
        raise ValueError(f"--mesh={spec!r}: axis sizes must be >= 1")
    return MeshShape(**sizes)


def resolve(spec: str, num_seeds: int, num_envs: int, batch_size: int,
            num_devices: Optional[int] = None) -> MeshShape:
    """`--mesh` -> the run's MeshShape, checked (`check`). "auto": all devices on the seed axis
    when several seeds are given (the largest count that divides them), else on the data axis
    (the largest count that divides num_envs and batch_size)."""
    n_dev = jax.device_count() if num_devices is None else num_devices
    shape = parse_spec(spec)
    if shape is None:
        if num_seeds > 1:
            shape = MeshShape(seed=_largest_divisor(num_seeds, n_dev))
        else:
            shape = MeshShape(data=_largest_divisor(int(np.gcd(num_envs, batch_size)), n_dev))
    check(shape, num_seeds, num_envs, batch_size, n_dev)
    return shape


def check(shape: MeshShape, num_seeds: int, num_envs: int, batch_size: int, num_devices: int):
    """Raises ValueError (one line, with the valid choices) when `shape` does not fit the run."""
    if num_seeds % shape.seed:
        raise ValueError(f"--mesh={shape}: the seed axis ({shape.seed} devices) must divide the "
                         f"{num_seeds} seeds; valid seed-axis sizes for {num_seeds} seeds: "
                         f"{', '.join(map(str, _divisors(num_seeds)))}")
    if num_envs % shape.data:
        raise ValueError(f"--mesh={shape}: --num_envs={num_envs} (per seed) must be divisible by "
                         f"the data axis ({shape.data} devices): use a multiple of {shape.data}")
    if batch_size % shape.data:
        raise ValueError(f"--mesh={shape}: --batch_size={batch_size} must be divisible by the data "
                         f"axis ({shape.data} devices): use a multiple of {shape.data}")
    if shape.size > num_devices:
        platform = jax.devices()[0].platform if num_devices else "?"
        hint = " (on CPU, JAX_NUM_CPU_DEVICES=N makes N virtual devices)" if platform == "cpu" else ""
        raise ValueError(f"--mesh={shape} needs {shape.size} devices, {num_devices} {platform} "
                         f"device(s) are visible{hint}")


def make(shape: MeshShape, devices: Optional[Sequence] = None) -> jax.sharding.Mesh:
    """The mesh on the first `shape.size` devices (all processes' devices, in jax's order)."""
    devices = list(jax.devices() if devices is None else devices)[:shape.size]
    return jax.make_mesh((shape.seed, shape.data), AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def shape_of(mesh: jax.sharding.Mesh) -> MeshShape:
    return MeshShape(seed=mesh.shape["seed"], data=mesh.shape["data"])


# ----------------------------------------------------------------------------- inside the step


def shard_key(key: Array, axis_name: Optional[str]) -> Array:
    """This data shard's own key (for sampling and acting): `key` folded with the shard index;
    `key` itself without a data axis (so a one-device run is unchanged)."""
    if axis_name is None:
        return key
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def batch_draw(draw, key: Array, shape: tuple[int, ...], axis_name: Optional[str]) -> Array:
    """`draw(key, shape)` for this shard's rows of a batch split over `axis_name`.

    shape[0] is the local batch B; the shard takes rows [i B, (i + 1) B) of `draw(key, (D B,
    ...))`: the numbers a one-device run draws for the whole batch with the same key.
    """
    if axis_name is None:
        return draw(key, shape)
    d, i = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    full = draw(key, (d * shape[0],) + tuple(shape[1:]))
    return jax.lax.dynamic_slice_in_dim(full, i * shape[0], shape[0])


def pmean(tree, axis_name: Optional[str]):
    """The mean over the data axis (identity without one)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def psum(tree, axis_name: Optional[str]):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def pmax(tree, axis_name: Optional[str]):
    return tree if axis_name is None else jax.lax.pmax(tree, axis_name)


# ----------------------------------------------------------------------------- host side


class Layout:
    """Where a run's seeds and envs live on a mesh, and the host <-> device transfers.

    A *block* is one device's share: seeds [r S_r, (r + 1) S_r) (S_r = S / S_dev seeds per
    device row r) and envs [d E_d, (d + 1) E_d) of each (E_d = E / D per data shard d). This
    process's blocks are those of its devices, ordered by (r, d); its envs are the blocks' envs in
    that order (`train_members`). Seed rows are evaluated by the process holding the row's
    data-shard-0 device (`eval_seeds`).
    """

    def __init__(self, mesh: jax.sharding.Mesh, num_seeds: int, envs_per_seed: int):
        self.mesh, self.shape = mesh, shape_of(mesh)
        self.num_seeds, self.envs_per_seed = num_seeds, envs_per_seed
        self.seeds_per_row = num_seeds // self.shape.seed
        self.envs_per_shard = envs_per_seed // self.shape.data
        self.seed_sharding = NamedSharding(mesh, P("seed"))
        self.shard_sharding = NamedSharding(mesh, P("seed", "data"))
        self.replicated = NamedSharding(mesh, P())
        pid = jax.process_index()
        devs = mesh.devices
        self.blocks = [(r, d) for r in range(self.shape.seed) for d in range(self.shape.data)
                       if devs[r, d].process_index == pid]
        self.eval_rows = [r for r in range(self.shape.seed) if devs[r, 0].process_index == pid]
        self.multi_process = jax.process_count() > 1

    def row_seeds(self, r: int) -> range:
        return range(r * self.seeds_per_row, (r + 1) * self.seeds_per_row)

    def train_members(self) -> list[tuple[int, int]]:
        """(seed index, env index within the seed) of this process's training envs, in order."""
        return [(s, d * self.envs_per_shard + j) for r, d in self.blocks for s in self.row_seeds(r)
                for j in range(self.envs_per_shard)]

    def eval_seeds(self) -> list[int]:
        """The seed indices this process evaluates (all of them on one host)."""
        return [s for r in self.eval_rows for s in self.row_seeds(r)]

    def eval_device(self):
        return self.mesh.devices[self.eval_rows[0], 0] if self.eval_rows else None

    # -- env data: host [L, ...] (this process's envs) <-> global [S, D, E_d, ...]

    def put_envs(self, x: np.ndarray) -> Array:
        x = np.asarray(x)
        n = self.seeds_per_row * self.envs_per_shard
        rest = x.shape[1:]
        arrays = [jax.device_put(x[b * n:(b + 1) * n].reshape(
                      (self.seeds_per_row, 1, self.envs_per_shard) + rest), self.mesh.devices[r, d])
                  for b, (r, d) in enumerate(self.blocks)]
        shape = (self.num_seeds, self.shape.data, self.envs_per_shard) + rest
        return jax.make_array_from_single_device_arrays(shape, self.shard_sharding, arrays)

    def get_envs(self, x: Array) -> np.ndarray:
        by_device = {sh.device: sh.data for sh in x.addressable_shards}
        parts = [np.asarray(by_device[self.mesh.devices[r, d]]) for r, d in self.blocks]
        return np.concatenate([p.reshape((-1,) + p.shape[3:]) for p in parts])

    def put_per_device(self, values: np.ndarray) -> Array:
        """One value per local device (block order) -> a global [S_dev, D] array."""
        arrays = [jax.device_put(np.asarray(v).reshape(1, 1), self.mesh.devices[r, d])
                  for v, (r, d) in zip(values, self.blocks)]
        return jax.make_array_from_single_device_arrays(
            (self.shape.seed, self.shape.data), NamedSharding(self.mesh, P("seed", "data")), arrays)

    # -- whole trees

    def put(self, tree, shardings):
        """Host or single-device arrays -> global arrays with `shardings` (a matching tree). Every
        process passes the same values (each keeps its devices' parts)."""
        if not self.multi_process:
            return jax.device_put(tree, shardings)

        def one(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        return jax.tree.map(one, tree, shardings)

    def fetch(self, tree):
        """Global arrays -> numpy on this host (all processes take part on several hosts)."""
        if not self.multi_process:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        return multihost_utils.process_allgather(tree, tiled=True)

    def local_rows(self, tree):
        """The seeds of `eval_seeds()` of a P("seed") tree, as arrays on `eval_device()`."""
        dev = self.eval_device()

        def one(x):
            by_device = {sh.device: sh.data for sh in x.addressable_shards}
            parts = [jax.device_put(by_device[self.mesh.devices[r, 0]], dev) for r in self.eval_rows]
            return parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        return jax.tree.map(one, tree)


def gather_hosts(x: np.ndarray) -> np.ndarray:
    """[P, ...]: `x` of every process (P = 1 on one host)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # through jax arrays: 64-bit values travel as 32-bit (x64 off) and come back in x's dtype
    return np.asarray(multihost_utils.process_allgather(x)).astype(x.dtype)


BARRIER_TIMEOUT_S = 600
_barriers = itertools.count()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S):
    """Waits until every process reaches this barrier (several hosts; a no-op on one).

    Through the coordination service of `jax.distributed` with a long timeout, not through a
    device collective: the first collective between processes sets up gloo's context, which
    gives up when the processes arrive more than 30 s apart (a loaded host, a slow file system).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
    if client is None:      # initialised some other way: a device collective
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"{name}/{next(_barriers)}", int(timeout_s * 1000))


def init_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                     process_id: Optional[int]) -> bool:
    """`jax.distributed.initialize` for a multi-host run (before any JAX computation).

    coordinator_address "host:port" with num_processes and process_id; "auto": the cluster's
    auto-detection (SLURM, TPU pods, ...); None: a single process (nothing to do). On CPU the
    collectives go through gloo. Returns whether it initialised.
    """
    if not coordinator_address:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address == "auto":
        jax.distributed.initialize()
    else:   # RunConfig checked that num_processes and process_id are given
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    return True
