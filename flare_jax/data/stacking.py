"""Frame stacks for acting: the newest T frames of each env, oldest first, kept on the device.

The same episode-boundary rule as the replay (`flare_jax.data.replay`): when a frame starts an
episode, the stack is reset so that frames before it are copies of it (`pad="repeat_first"`,
DMC/RAD) or zeros (`pad="zeros"`, Atari/DQN Zoo).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def push(stack: Array, frame: Array, first: Array, pad: str = "repeat_first") -> Array:
    """stack [N, T, *frame], frame [N, *frame], first [N] bool -> the new stack [N, T, *frame]."""
    if pad not in ("repeat_first", "zeros"):
        raise ValueError(f"pad must be 'repeat_first' or 'zeros', got {pad!r}")
    t = stack.shape[1]
    frame = frame.astype(stack.dtype)
    shifted = jnp.concatenate([stack[:, 1:], frame[:, None]], axis=1)
    if pad == "repeat_first":
        fresh = jnp.repeat(frame[:, None], t, axis=1)
    else:
        fresh = jnp.concatenate([jnp.zeros_like(stack[:, 1:]), frame[:, None]], axis=1)
    mask = first.astype(bool).reshape((-1,) + (1,) * (stack.ndim - 1))
    return jnp.where(mask, fresh, shifted)


def init(frame: Array, num_frames: int, pad: str = "repeat_first") -> Array:
    """The stacks for the first frames [N, *frame] of new episodes: [N, T, *frame]."""
    empty = jnp.zeros((frame.shape[0], num_frames) + frame.shape[1:], frame.dtype)
    return push(empty, frame, jnp.ones(frame.shape[0], bool), pad)
