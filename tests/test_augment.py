"""Augmentations: shapes, offset ranges, obs/next_obs sharing one offset, centre view."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.data import augment


def _frames(b=64, t=3, h=100, c=3):
    # every pixel different, > 0, so positions are recoverable
    x = np.arange(b * t * h * h * c).reshape(b, t, h, h, c) % 250 + 1
    return jnp.asarray(x, jnp.uint8)


def _offsets(out, h):
    """(top, left) of the non-zero block in each sample's first frame."""
    nz = np.asarray(out[:, 0, :, :, 0]) > 0
    tops = nz.any(2).argmax(1)
    lefts = nz.any(1).argmax(1)
    return tops, lefts


def test_translate_shapes_offsets_and_sharing():
    obs = _frames()
    nxt = _frames() // 2 + 1
    out, out_next = jax.jit(augment.translate)(jax.random.PRNGKey(0), obs, nxt)
    assert out.shape == (64, 3, 108, 108, 3) and out.dtype == jnp.uint8
    tops, lefts = _offsets(out, 100)
    tops_n, lefts_n = _offsets(out_next, 100)
    np.testing.assert_array_equal(tops, tops_n)
    np.testing.assert_array_equal(lefts, lefts_n)
    assert tops.min() >= 0 and tops.max() <= 8 and lefts.min() >= 0 and lefts.max() <= 8
    assert len(set(tops.tolist())) > 4 and len(set(lefts.tolist())) > 4  # offsets vary per sample
    for b in range(4):   # the pasted block is the frame itself, the rest zeros
        t, l = tops[b], lefts[b]
        np.testing.assert_array_equal(out[b, :, t:t + 100, l:l + 100], obs[b])
        assert int(out[b].sum()) == int(obs[b].astype(jnp.int32).sum())


def test_translate_offsets_cover_zero_to_eight_uniformly():
    obs = _frames(b=4096, t=1, h=100, c=1)
    out, _ = jax.jit(augment.translate)(jax.random.PRNGKey(1), obs, obs)
    tops, lefts = _offsets(out, 100)
    counts = np.bincount(tops, minlength=9)
    assert counts.size == 9 and counts.min() > 4096 / 9 * 0.8


def test_center_paste_equals_offset_four_and_crop_roundtrip():
    full = jnp.asarray(np.random.default_rng(0).integers(1, 255, (2, 3, 108, 108, 3)), jnp.uint8)
    crop = augment.center_crop(full, 100)
    assert crop.shape == (2, 3, 100, 100, 3)
    pasted = augment.center_paste(crop)
    np.testing.assert_array_equal(pasted[..., 4:104, 4:104, :], full[..., 4:104, 4:104, :])
    assert int(pasted[..., :4, :, :].sum()) == 0 and int(pasted[..., 104:, :, :].sum()) == 0


def test_random_crop_shapes_and_sharing():
    obs = _frames(b=16, h=108)
    out, out_next = augment.random_crop(jax.random.PRNGKey(2), obs, obs, 100)
    assert out.shape == (16, 3, 100, 100, 3)
    np.testing.assert_array_equal(out, out_next)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="exceeds"):
        augment.center_crop(jnp.zeros((1, 50, 50, 3)), 100)
    with pytest.raises(ValueError, match="do not fit"):
        augment.translate(jax.random.PRNGKey(0), jnp.zeros((1, 1, 120, 120, 3)),
                          jnp.zeros((1, 1, 120, 120, 3)))
