"""Whole-state checkpoints of a pytree on disk, with orbax-checkpoint.

    ckpt = Checkpointer("<out_dir>/checkpoints", keep=2)
    report = ckpt.save(step, tree, meta)                 # blocks until the step is on disk
    step, tree, meta = ckpt.restore(template)            # the newest readable step
    ckpt.steps(), ckpt.read_meta(step)

One orbax `CheckpointManager` step per save, `<directory>/<step>/`, with two items:
  * `arrays`: every leaf, written by `StreamedArraysHandler` into one raw file, leaf after leaf;
    a leaf larger than `CHUNK_BYTES` (a replay's frames: 3 GB for 100k pixel transitions, 7 GB
    for 1M Atari frames) goes in slabs: each slab is copied off the device, checksummed and
    written before the next is read, so a save needs one slab of host memory beyond the state
    itself (orbax's own array handler can need ~3x an array's size in host RAM);
  * `meta`: JSON (`meta` as given, plus the leaf paths, shapes and dtypes).

Atomic: orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete,
so a process killed during a save leaves the previous steps untouched and the unfinished one is
never listed (it is deleted when the next `Checkpointer` opens the directory). Verified on
restore: every leaf's size and CRC32 are compared with those written; a step that fails (a
damaged or missing file) is reported through `warn`, moved aside to `<step>.corrupt-<time>` and
the previous step is tried. Saves are synchronous (no async save reading arrays that a donating
jitted step deletes next); before writing, the free disk space is checked.

Leaves are matched by their pytree path: restoring into a template of another structure (another
encoder, another replay size) raises `CheckpointMismatch` naming the first differing leaf.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
import zlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHUNK_BYTES = 64 << 20
# Test hook: "N" makes the N-th save of this process SIGKILL itself inside its streamed item,
# after the first slab (a kill during a checkpoint write, at a reproducible point).
KILL_DURING_SAVE_ENV = "FLARE_JAX_TEST_KILL_DURING_SAVE"
_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (one-line message, for the user)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint holds a different structure than the state it should restore into."""


@dataclasses.dataclass(frozen=True)
class SaveReport:
    step: int
    path: str
    nbytes: int
    seconds: float


# ----------------------------------------------------------------------------- streamed item


def _slabs(shape: tuple[int, ...], itemsize: int, chunk_bytes: int):
    """(start, size) index tuples that cover `shape` in C order with slabs of <= chunk_bytes
    (at least one row of the last axis): whole trailing axes, a range of one axis, and single
    indices of the leading axes."""
    if not shape:
        yield (), ()
        return
    k = len(shape) - 1
    while k > 0 and int(np.prod(shape[k:])) * itemsize <= chunk_bytes:
        k -= 1
    row = int(np.prod(shape[k + 1:])) * itemsize
    step = max(1, min(shape[k], chunk_bytes // max(row, 1)))
    for lead in np.ndindex(*shape[:k]):
        for lo in range(0, shape[k], step):
            n = min(step, shape[k] - lo)
            yield (tuple(lead) + (lo,) + (0,) * (len(shape) - k - 1),
                   (1,) * k + (n,) + tuple(shape[k + 1:]))


def _read_slab(x: jax.Array, start, size) -> np.ndarray:
    fn = _READERS.get(size)
    if fn is None:
        fn = _READERS[size] = jax.jit(lambda a, s: jax.lax.dynamic_slice(a, s, size))
    return np.asarray(fn(x, jnp.asarray(start, jnp.int32) if start else ()))


def _write_slab(x: jax.Array, slab: np.ndarray, start) -> jax.Array:
    """x with `slab` written at `start` (x donated: updated in place)."""
    fn = _WRITERS.get(slab.shape)
    if fn is None:
        fn = _WRITERS[slab.shape] = jax.jit(
            lambda a, b, s: jax.lax.dynamic_update_slice(a, b, s), donate_argnums=0)
    return fn(x, slab, jnp.asarray(start, jnp.int32) if start else ())


def _new_with_slab(shape, dtype, slab: np.ndarray, start) -> jax.Array:
    """A new array of zeros with `slab` written at `start`, made by one program (one buffer)."""
    key = (tuple(shape), np.dtype(dtype).name, slab.shape)
    fn = _WRITERS.get(key)
    if fn is None:
        fn = _WRITERS[key] = jax.jit(lambda b, s: jax.lax.dynamic_update_slice(
            jnp.zeros(shape, dtype), b, s))
    return fn(slab, jnp.asarray(start, jnp.int32) if start else ())


_READERS: dict = {}
_WRITERS: dict = {}


def _crc(buf: np.ndarray, crc: int = 0) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(buf)).cast("B"), crc)


class StreamedArraysHandler(ocp.CheckpointHandler):
    """Writes arrays into one raw file `arrays.bin` (C order, leaf after leaf, large leaves slab by
    slab) with each leaf's offset, shape, dtype and CRC32 in `index.json`; restores them, a
    large leaf slab by slab into a device array."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self.kill_after_first_slab = False

    def _host_slabs(self, x):
        """(start, numpy slab) pieces of a device array, in C order."""
        if x.nbytes <= self.chunk_bytes:
            yield (0,) * x.ndim, np.asarray(x)
            return
        # a CPU array is host memory already: numpy views of it, no copy; else device slices
        view = np.asarray(x) if all(d.platform == "cpu" for d in x.devices()) else None
        for start, size in _slabs(x.shape, x.dtype.itemsize, self.chunk_bytes):
            yield start, (view[tuple(slice(s, s + n) for s, n in zip(start, size))]
                          if view is not None else _read_slab(x, start, size))

    def save(self, directory, args: "StreamedSave"):
        index, offset = {}, 0
        with open(os.path.join(directory, "arrays.bin"), "wb") as f:
            for name, x in args.arrays.items():
                x = jnp.asarray(x)
                crc = 0
                for _, slab in self._host_slabs(x):
                    buf = memoryview(np.ascontiguousarray(slab)).cast("B")
                    crc = zlib.crc32(buf, crc)
                    f.write(buf)
                    if self.kill_after_first_slab:
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                index[name] = dict(offset=offset, shape=list(x.shape), dtype=x.dtype.name, crc32=crc)
                offset += x.nbytes
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(directory, "index.json"), "w") as f:
            json.dump(index, f)

    def restore(self, directory, args: "StreamedRestore"):
        with open(os.path.join(directory, "index.json")) as f:
            index = json.load(f)
        path = os.path.join(directory, "arrays.bin")
        size = os.path.getsize(path)
        data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        out = {}
        for name, spec in args.specs.items():
            entry = index.get(name)
            shape, dtype = tuple(spec.shape), np.dtype(spec.dtype)
            if entry is None or tuple(entry["shape"]) != shape or entry["dtype"] != dtype.name:
                raise CheckpointError(f"leaf {name}: the index has {entry}, expected {shape} {dtype.name}")
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if entry["offset"] + nbytes > size:
                raise CheckpointError(f"{path} is cut short ({size} bytes)")
            leaf = data[entry["offset"]:entry["offset"] + nbytes].view(dtype).reshape(shape)
            if nbytes <= self.chunk_bytes:
                host = np.array(leaf)
                crc, arr = _crc(host), jnp.asarray(host)
            else:
                arr, crc = None, 0
                for start, sz in _slabs(shape, dtype.itemsize, self.chunk_bytes):
                    slab = np.array(leaf[tuple(slice(s, s + n) for s, n in zip(start, sz))])
                    crc = _crc(slab, crc)
                    arr = (_new_with_slab(shape, dtype, slab, start) if arr is None
                           else _write_slab(arr, slab, start))
            if crc != entry["crc32"]:
                raise CheckpointError(f"{path}: leaf {name}: checksum mismatch")
            out[name] = arr
        del data
        return out

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(StreamedArraysHandler, for_save=True)
@dataclasses.dataclass
class StreamedSave(ocp.args.CheckpointArgs):
    arrays: dict


@ocp.args.register_with_handler(StreamedArraysHandler, for_restore=True)
@dataclasses.dataclass
class StreamedRestore(ocp.args.CheckpointArgs):
    specs: dict


# ----------------------------------------------------------------------------- checkpointer


def tree_nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                   for x in jax.tree.leaves(tree)))


def _leaf_table(tree):
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(p) for p, _ in paths_leaves]
    return names, [x for _, x in paths_leaves], treedef


def _spec(x) -> dict:
    return dict(shape=list(x.shape), dtype=np.dtype(x.dtype).name)


def latest_meta(directory: str) -> Optional[dict]:
    """The `meta` of the newest complete step under `directory`, read without opening a manager
    (which would tidy the directory of a live run); None if there is none."""
    if not os.path.isdir(directory):
        return None
    for step in sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True):
        try:
            with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None


class Checkpointer:
    """Saves and restores whole pytrees under `directory`, keeping the newest `keep` steps."""

    def __init__(self, directory: str, keep: int = 2, warn: Callable[[str], None] = print,
                 chunk_bytes: int = CHUNK_BYTES, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        self.warn = warn
        self._stream = StreamedArraysHandler(chunk_bytes)
        self._saves = 0
        self.read_only = read_only
        if not read_only and os.path.isdir(self.directory):
            self._remove_unfinished()           # of a killed process
        if not read_only:
            os.makedirs(self.directory, exist_ok=True)
        # on several hosts each process's manager works alone (process 0 writes): no barriers
        alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                   active_processes={jax.process_index()})
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=False,
            enable_async_checkpointing=False, cleanup_tmp_directories=not read_only,
            read_only=read_only, **({"save_interval_steps": 0} if read_only else {}),
            **({"multiprocessing_options": alone} if jax.process_count() > 1 else {}))
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:      # orbax warns that a read-only manager is read-only
            absl_log.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"arrays": self._stream, "meta": ocp.JsonCheckpointHandler()})
        finally:
            absl_log.setLevel(level)

    def _remove_unfinished(self, prefix: str = ""):
        """Deletes the temporary directories of saves that did not complete."""
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def steps(self) -> list[int]:
        """The complete steps on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def check_disk(self, nbytes: int, copies: int = 1):
        """Raises CheckpointError unless `copies` checkpoints of `nbytes` fit on the disk."""
        free = shutil.disk_usage(self.directory).free
        need = copies * nbytes + (16 << 20)
        if need > free:
            raise CheckpointError(
                f"not enough disk for checkpoints in {self.directory}: {copies} x "
                f"{nbytes / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free (free space, use "
                f"another --out_dir, or --checkpoint_replay=false to save the agent only)")

    def save(self, step: int, tree, meta: Optional[dict] = None) -> SaveReport:
        t0 = time.time()
        names, leaves, _ = _leaf_table(tree)
        nbytes = tree_nbytes(tree)
        self.check_disk(nbytes)
        jax.block_until_ready(leaves)
        self._saves += 1
        self._stream.kill_after_first_slab = os.environ.get(KILL_DURING_SAVE_ENV) == str(self._saves)
        full_meta = dict(meta or {}, _format=_FORMAT, _names=names, _specs=[_spec(x) for x in leaves])
        self._remove_unfinished(f"{step}.")     # of this step: a save cut by Ctrl-C
        arrays = {f"{i:05d}": x for i, x in enumerate(leaves)}
        self._manager.save(step, args=ocp.args.Composite(
            arrays=StreamedSave(arrays), meta=ocp.args.JsonSave(full_meta)), force=True)
        self._manager.wait_until_finished()
        return SaveReport(step=step, path=self.path(step), nbytes=nbytes, seconds=time.time() - t0)

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _restore_step(self, step: int, template):
        meta = self.read_meta(step)
        if callable(template):
            template = template(meta)
        names, leaves, treedef = _leaf_table(template)
        specs = [_spec(x) for x in leaves]
        if meta.get("_names") != names or meta.get("_specs") != specs:
            saved = dict(zip(meta.get("_names", []), meta.get("_specs", [])))
            for name, spec in zip(names, specs):
                if saved.get(name) != spec:
                    raise CheckpointMismatch(
                        f"checkpoint {self.path(step)} does not match this run's state: leaf "
                        f"{name} is {saved.get(name, 'absent')} there and {spec} here")
            raise CheckpointMismatch(f"checkpoint {self.path(step)} holds leaves this run's state "
                                     f"has not: {sorted(set(saved) - set(names))[:3]}")
        specs = {f"{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype) for i, x in enumerate(leaves)}
        arrays = self._manager.restore(step, args=ocp.args.Composite(
            arrays=StreamedRestore(specs)))["arrays"]
        tree = jax.tree_util.tree_unflatten(treedef, [arrays[f"{i:05d}"] for i in range(len(leaves))])
        return tree, meta

    def restore(self, template, step: Optional[int] = None):
        """(step, tree, meta) of the newest readable step (or `step`), or None if there is none.

            `template`: a pytree of arrays or ShapeDtypeStructs with the structure to restore into,
        or a function of a step's meta that returns one.
        A step that cannot be read is moved aside (read_only: skipped) with a warning and the
        previous one is tried;
        raises CheckpointError when steps exist but none can be read.
        """
        steps = self.steps() if step is None else [step]
        for s in reversed(steps):
            try:
                tree, meta = self._restore_step(s, template)
                return s, tree, meta
            except CheckpointMismatch:
                raise
            except Exception as err:  # pylint: disable=broad-except  (any damage: try the previous)
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                if self.read_only:
                    self.warn(f"warning: checkpoint {self.path(s)} is unreadable ({reason}); "
                              "trying the previous one")
                    continue
                aside = f"{self.path(s)}.corrupt-{int(time.time())}"
                os.replace(self.path(s), aside)
                self._manager.reload()
                self.warn(f"warning: checkpoint {self.path(s)} is unreadable ({reason}); moved to "
                          f"{aside}; trying the previous one")
        if steps:
            raise CheckpointError(f"none of the {len(steps)} checkpoint(s) in {self.directory} "
                                  "can be read (see the warnings above)")
        return None

    def close(self):
        self._manager.close()
