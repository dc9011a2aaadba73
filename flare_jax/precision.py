"""Compute dtypes of the networks (`--compute_dtype`): parameters stay float32, matmuls and convs
may run in bfloat16.

With `compute_dtype="bfloat16"` every encoder/torso layer (convs, Dense, LSTM) and every head MLP
casts its inputs and its float32 weights to bfloat16 for the matmul/conv and returns bfloat16
activations; LayerNorm statistics are float32 (flax's `_compute_stats` promotes to float32), and
the agents cast the heads' outputs (Q values, policy mean/log-std, Rainbow logits) to float32 before
any loss arithmetic. Gradients, optimiser states and target parameters are float32 (the
parameters' dtype). `compute_dtype="float32"` is the plain float32 computation, bit for bit.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """A compute dtype given by name or type ("float32", jnp.bfloat16, ...) -> its jnp.dtype;
    ValueError for anything but COMPUTE_DTYPES."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    return jnp.dtype(name)


def cast(x: jax.Array, dtype: Any) -> jax.Array:
    """x as `dtype`; x itself (no op in the program) when it already has that dtype."""
    dtype = jnp.dtype(dtype)
    return x if x.dtype == dtype else x.astype(dtype)


def check_config(compute_dtype: str, kwargs, owner: str) -> None:
    """A config's `compute_dtype` is one of COMPUTE_DTYPES and its `<owner>_kwargs` do not set
    the network's dtype too; ValueError (one line) otherwise. owner: "encoder" or "torso"."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                         f"got {compute_dtype!r}")
    if "dtype" in dict(kwargs):
        raise ValueError(f"the {owner}'s dtype is set by compute_dtype (one of "
                         f"{', '.join(COMPUTE_DTYPES)}), not by {owner}_kwargs")
