"""Image augmentations for pixel RL (RAD), jit-able, on [..., H, W, C] frames of any dtype.

`translate` is the one Flare/RAD use on DMC: the replay stores the 100x100 centre of each
108x108 render; a sample's frames are pasted at a uniformly random offset (0..8 per axis) into a
zero 108x108 canvas, with one offset per sample shared by its obs and next_obs stacks. Acting and
evaluation use `center_paste` (offset 4): the same view the networks train on (the reference's
FIX: the authors' data collection fed the raw 108 frame to the policy).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from flare_jax.mesh import batch_draw

Array = jax.Array


def center_crop(frames: Array, size: int) -> Array:
    """[..., H, W, C] -> [..., size, size, C], the centre (offset (H - size) // 2)."""
    h, w = frames.shape[-3:-1]
    if size > min(h, w):
        raise ValueError(f"center_crop: crop size {size} exceeds the {h}x{w} frame")
    top, left = (h - size) // 2, (w - size) // 2
    return frames[..., top:top + size, left:left + size, :]


def center_paste(frames: Array, canvas_size: int = 108) -> Array:
    """[..., h, w, C] -> [..., canvas, canvas, C]: frames pasted in the middle of a zero canvas."""
    h, w = frames.shape[-3:-1]
    pad = canvas_size - h
    if pad < 0 or canvas_size - w != pad:
        raise ValueError(f"center_paste: {h}x{w} frames do not fit a {canvas_size} canvas")
    lead = [(0, 0)] * (frames.ndim - 3)
    return jnp.pad(frames, lead + [(pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2), (0, 0)])


def _offsets(key: Array, b: int, high_top: int, high_left: int, axis_name):
    """Offsets [b] ~ U{0..high_top - 1}, U{0..high_left - 1} (this shard's rows of the batch's
    draw when the batch is split over `axis_name`, `flare_jax.mesh.batch_draw`)."""
    k1, k2 = jax.random.split(key)
    top = batch_draw(lambda k, s: jax.random.randint(k, s, 0, high_top), k1, (b,), axis_name)
    left = batch_draw(lambda k, s: jax.random.randint(k, s, 0, high_left), k2, (b,), axis_name)
    return top, left


def translate(key: Array, obs: Array, next_obs: Array, canvas_size: int = 108,
              axis_name=None) -> tuple[Array, Array]:
    """Random translate: obs, next_obs [B, ..., h, w, C] -> [B, ..., canvas, canvas, C].

    Each sample b gets offsets (top, left) ~ U{0..canvas-h} x U{0..canvas-w}, shared by obs[b]
    and next_obs[b] (all their frames). `axis_name`: the batch is this shard's part of a batch
    split over that mesh axis (the offsets are the whole batch's, sliced).
    """
    chex.assert_equal_shape([obs, next_obs])
    b, (h, w) = obs.shape[0], obs.shape[-3:-1]
    if canvas_size < max(h, w):
        raise ValueError(f"translate: {h}x{w} frames do not fit a {canvas_size} canvas")
    top, left = _offsets(key, b, canvas_size - h + 1, canvas_size - w + 1, axis_name)
    ph, pw = canvas_size - h, canvas_size - w

    def paste(x, t, l):
        # A slice of the zero-padded frames, (ph - t, pw - l) from the corner of the padding: one
        # gather over the batch (XLA's CPU scatter of dynamic_update_slice into a zero canvas was
        # 10x slower: 63 vs 6 ms for a batch of 128 [3, 100, 100, 3] pairs).
        lead = x.shape[:-3]
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(ph, ph), (pw, pw), (0, 0)])
        zero = jnp.zeros((), jnp.int32)
        start = (zero,) * len(lead) + (ph - t, pw - l, zero)
        return jax.lax.dynamic_slice(x, start, lead + (canvas_size, canvas_size, x.shape[-1]))

    paste_b = jax.vmap(paste)
    return paste_b(obs, top, left), paste_b(next_obs, top, left)


def random_crop(key: Array, obs: Array, next_obs: Array, size: int,
                axis_name=None) -> tuple[Array, Array]:
    """Random crop (RAD's `crop`): [B, ..., H, W, C] -> [B, ..., size, size, C], one crop per sample
    shared by obs and next_obs (`axis_name` as in `translate`)."""
    chex.assert_equal_shape([obs, next_obs])
    b, (h, w) = obs.shape[0], obs.shape[-3:-1]
    if size > min(h, w):
        raise ValueError(f"random_crop: crop size {size} exceeds the {h}x{w} frame")
    top, left = _offsets(key, b, h - size + 1, w - size + 1, axis_name)

    def crop(x, t, l):
        lead = x.shape[:-3]
        zero = jnp.zeros((), jnp.int32)
        start = (zero,) * len(lead) + (t, l, zero)
        return jax.lax.dynamic_slice(x, start, lead + (size, size, x.shape[-1]))

    crop_b = jax.vmap(crop)
    return crop_b(obs, top, left), crop_b(next_obs, top, left)


AUGMENTATIONS = ("translate", "crop", "none")
