"""flare_jax.checkpoint: exact round trips, streamed large leaves, atomic saves, damaged steps."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax import checkpoint as ck


def _tree(seed=0):
    k = jax.random.PRNGKey(seed)
    return {"agent": {"w": jax.random.normal(k, (7, 5)), "count": jnp.int32(3 + seed)},
            "replay": {"frames": jax.random.randint(k, (2, 33, 4, 4, 3), 0, 256).astype(jnp.uint8),
                       "first": jnp.arange(33) % 5 == 0},
            "key": jax.random.split(k, 3)}


def _assert_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 96])   # one piece per leaf / frames in slabs
def test_save_restore_is_exact_and_keeps_the_newest(tmp_path, chunk_bytes):
    c = ck.Checkpointer(str(tmp_path), keep=2, chunk_bytes=chunk_bytes)
    for step in (10, 20, 30):
        rep = c.save(step, _tree(step), {"counters": {"step": step}})
        assert rep.nbytes == ck.tree_nbytes(_tree(step)) and os.path.isdir(rep.path)
    assert c.steps() == [20, 30]
    step, tree, meta = c.restore(jax.eval_shape(_tree))
    assert step == 30 and meta["counters"] == {"step": 30}
    _assert_equal(tree, _tree(30))
    assert os.path.getsize(os.path.join(rep.path, "arrays", "arrays.bin")) == rep.nbytes


def test_slabs_cover_every_element_once_in_c_order():
    for shape, chunk in [((3, 5, 7), 24), ((4, 1000), 100), ((9,), 4), ((2, 3), 10**6), ((), 8)]:
        seen = np.zeros(shape, int)
        flat_order = []
        for start, size in ck._slabs(shape, 4, chunk):
            idx = tuple(slice(s, s + n) for s, n in zip(start, size))
            seen[idx] += 1
            flat_order.append(np.ravel_multi_index(start, shape) if shape else 0)
            assert int(np.prod(size)) * 4 <= max(chunk, 4 * (shape[-1] if shape else 1))
        assert (seen == 1).all() and flat_order == sorted(flat_order)


def _flip_a_byte(path, at=-50):
    with open(path, "r+b") as f:
        f.seek(at, os.SEEK_END if at < 0 else os.SEEK_SET)
        pos = f.tell()
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def _cut_short(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_damaged_newest_steps_fall_back_to_the_previous_with_a_warning(tmp_path):
    warnings = []
    c = ck.Checkpointer(str(tmp_path), keep=3, chunk_bytes=64, warn=warnings.append)
    for step in (1, 2, 3):
        c.save(step, _tree(step))
    _flip_a_byte(os.path.join(c.path(3), "arrays", "arrays.bin"))   # the frames, in slabs
    _cut_short(os.path.join(c.path(2), "arrays", "arrays.bin"))
    step, tree, _ = c.restore(jax.eval_shape(_tree))
    assert step == 1 and len(warnings) == 2
    assert "checkpoint" in warnings[0] and c.path(3) in warnings[0] and "checksum" in warnings[0]
    assert c.path(2) in warnings[1] and "cut short" in warnings[1]
    _assert_equal(tree, _tree(1))
    assert c.steps() == [1] and sum(".corrupt-" in d for d in os.listdir(tmp_path)) == 2


def test_no_readable_step_is_an_error(tmp_path):
    c = ck.Checkpointer(str(tmp_path), warn=lambda _: None)
    c.save(1, _tree(1))
    _flip_a_byte(os.path.join(c.path(1), "arrays", "arrays.bin"), at=10)
    with pytest.raises(ck.CheckpointError, match="none of the 1 checkpoint"):
        c.restore(jax.eval_shape(_tree))


def test_another_structure_is_refused_naming_the_leaf(tmp_path):
    c = ck.Checkpointer(str(tmp_path))
    c.save(1, _tree())
    other = jax.eval_shape(lambda: dict(_tree(), agent={"w": jnp.zeros((7, 6)), "count": jnp.int32(0)}))
    with pytest.raises(ck.CheckpointMismatch, match=r"\['agent'\]\['w'\]"):
        c.restore(other)


def test_disk_check_names_the_sizes(tmp_path):
    c = ck.Checkpointer(str(tmp_path))
    with pytest.raises(ck.CheckpointError, match=r"GiB needed, .* GiB free"):
        c.check_disk(1 << 60)


_KILLED_SAVE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from tests.test_checkpoint import _tree
    from flare_jax import checkpoint as ck
    c = ck.Checkpointer(sys.argv[1], keep=2, chunk_bytes=64)
    c.save(1, _tree(1))
    os.environ[ck.KILL_DURING_SAVE_ENV] = "2"
    c.save(2, _tree(2))          # SIGKILLs itself after the first slab of its streamed item
    print("not killed")
""")


def test_a_process_killed_during_a_save_leaves_the_previous_step(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE.format(root=root), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(d.startswith("2.orbax-checkpoint-tmp") for d in os.listdir(tmp_path))
    c = ck.Checkpointer(str(tmp_path))
    assert c.steps() == [1]                                        # the unfinished step is not listed
    assert not any("tmp" in d for d in os.listdir(tmp_path))       # and it is tidied away
    step, tree, _ = c.restore(jax.eval_shape(_tree))
    assert step == 1
    _assert_equal(tree, _tree(1))
    c.save(2, _tree(2))                                            # the step can be written again
    assert c.steps() == [1, 2]
