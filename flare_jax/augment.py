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

Array = jax.Array


def center_crop(frames: Array, size: int) -> Array:
    """[..., H, W, C] -> [..., size, size, C], the centre (offset (H - size) // 2)."""
    h, w = frames.shape[-3:-1]
    if size > min(h, w):
        raise ValueError(f"center_crop: crop size {size} exceeds the {h}x{w} frame")
    top, left = (h - size) // 2, (w - size) // 2
    return frames[..., top:top + size, left:left + size, :]


def _paste(frames: Array, canvas_size: int, top: Array, left: Array) -> Array:
    """Paste [..., h, w, C] at (top, left) into zeros [..., canvas, canvas, C] (same offset for all)."""
    lead = frames.shape[:-3]
    h, w, c = frames.shape[-3:]
    canvas = jnp.zeros(lead + (canvas_size, canvas_size, c), frames.dtype)
    zero = jnp.zeros((), jnp.int32)
    start = (zero,) * len(lead) + (top.astype(jnp.int32), left.astype(jnp.int32), zero)
    return jax.lax.dynamic_update_slice(canvas, frames, start)


def center_paste(frames: Array, canvas_size: int = 108) -> Array:
    """[..., h, w, C] -> [..., canvas, canvas, C]: frames pasted in the middle of a zero canvas."""
    h, w = frames.shape[-3:-1]
    pad = canvas_size - h
    if pad < 0 or canvas_size - w != pad:
        raise ValueError(f"center_paste: {h}x{w} frames do not fit a {canvas_size} canvas")
    top = jnp.asarray(pad // 2)
    return _paste(frames, canvas_size, top, top)


def translate(key: Array, obs: Array, next_obs: Array, canvas_size: int = 108) -> tuple[Array, Array]:
    """Random translate: obs, next_obs [B, ..., h, w, C] -> [B, ..., canvas, canvas, C].

    Each sample b gets offsets (top, left) ~ U{0..canvas-h} x U{0..canvas-w}, shared by obs[b]
    and next_obs[b] (all their frames).
    """
    chex.assert_equal_shape([obs, next_obs])
    b, (h, w) = obs.shape[0], obs.shape[-3:-1]
    if canvas_size < max(h, w):
        raise ValueError(f"translate: {h}x{w} frames do not fit a {canvas_size} canvas")
    k1, k2 = jax.random.split(key)
    top = jax.random.randint(k1, (b,), 0, canvas_size - h + 1)
    left = jax.random.randint(k2, (b,), 0, canvas_size - w + 1)
    paste = jax.vmap(lambda x, t, l: _paste(x, canvas_size, t, l))
    return paste(obs, top, left), paste(next_obs, top, left)


def random_crop(key: Array, obs: Array, next_obs: Array, size: int) -> tuple[Array, Array]:
    """Random crop (RAD's `crop`): [B, ..., H, W, C] -> [B, ..., size, size, C], one crop per sample
    shared by obs and next_obs."""
    chex.assert_equal_shape([obs, next_obs])
    b, (h, w) = obs.shape[0], obs.shape[-3:-1]
    if size > min(h, w):
        raise ValueError(f"random_crop: crop size {size} exceeds the {h}x{w} frame")
    k1, k2 = jax.random.split(key)
    top = jax.random.randint(k1, (b,), 0, h - size + 1)
    left = jax.random.randint(k2, (b,), 0, w - size + 1)

    def crop(x, t, l):
        lead = x.shape[:-3]
        zero = jnp.zeros((), jnp.int32)
        start = (zero,) * len(lead) + (t, l, zero)
        return jax.lax.dynamic_slice(x, start, lead + (size, size, x.shape[-1]))

    crop_b = jax.vmap(crop)
    return crop_b(obs, top, left), crop_b(next_obs, top, left)


AUGMENTATIONS = ("translate", "crop", "none")
