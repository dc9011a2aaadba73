"""State-space variants of the paper's section 4 (reference.md section 3).

Inputs are histories [..., T, D] of state vectors, oldest first: full states (positions and
velocities) for `FullStateEncoder`, position vectors for the others (see
`flare_jax.envs.dmc_tasks` for each domain's position/velocity split).

trunk/head split as for the pixel encoders: the trunk is shared between SAC's critic and actor and
trained by the critic loss (only the LSTM variant has parameters there); the head is the identity.
The states stay float32 (the agents' first Dense casts them to the compute dtype); `dtype`
(`flare_jax.precision`) is the LSTM's compute dtype (its cell and hidden state stay float32).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flare_jax.encoders.layers import check_frames
from flare_jax.precision import canonical_dtype

Array = jax.Array


class _StateEncoder(nn.Module):
    num_frames: int = 1
    dtype: Any = jnp.float32   # compute dtype of the LSTM variant (flare_jax.precision)

    frame_rank = 1
    observation = "position"
    min_frames = 1
    max_frames = None

    def _history(self, x: Array) -> Array:
        name = type(self).__name__
        if self.num_frames < self.min_frames or (self.max_frames and self.num_frames > self.max_frames):
            raise ValueError(f"{name} needs num_frames in [{self.min_frames}, "
                             f"{self.max_frames or 'inf'}], got {self.num_frames}")
        check_frames(x, self.num_frames, name, self.frame_rank)
        return x.astype(jnp.float32)

    def trunk(self, x: Array) -> Array:
        raise NotImplementedError

    def head(self, h: Array) -> Array:
        return h

    def __call__(self, x: Array) -> Array:
        return self.head(self.trunk(x))


class FullStateEncoder(_StateEncoder):
    """Full-state SAC: the current state (positions and velocities) as it is. [..., 1, D] -> [..., D]."""
    observation = "full"
    max_frames = 1

    def trunk(self, x: Array) -> Array:
        return self._history(x)[..., -1, :]


class PositionOnlyEncoder(_StateEncoder):
    """Position-only SAC: the current position vector, velocities removed. [..., 1, P] -> [..., P]."""
    max_frames = 1

    def trunk(self, x: Array) -> Array:
        return self._history(x)[..., -1, :]


def position_offsets(s: Array) -> Array:
    """[..., T, P] oldest first -> [s_t - s_{t-1}, s_{t-1} - s_{t-2}, ...] as [..., T-1, P], newest first."""
    diffs = s[..., 1:, :] - s[..., :-1, :]   # diffs[i] = s_{i+1} - s_i, oldest first
    return diffs[..., ::-1, :]


class StateFlareEncoder(_StateEncoder):
    """State-Flare: (s_t, s_t - s_{t-1}, s_{t-1} - s_{t-2}, s_{t-2} - s_{t-3}). [..., T, P] -> [..., T*P]."""
    num_frames: int = 4
    min_frames = 2

    def trunk(self, x: Array) -> Array:
        s = self._history(x)
        feats = jnp.concatenate([s[..., -1:, :], position_offsets(s)], axis=-2)
        return feats.reshape(feats.shape[:-2] + (-1,))


class StateStackEncoder(_StateEncoder):
    """Stack SAC: (s_t, s_{t-1}, s_{t-2}, s_{t-3}). [..., T, P] -> [..., T*P]."""
    num_frames: int = 4

    def trunk(self, x: Array) -> Array:
        s = self._history(x)[..., ::-1, :]
        return s.reshape(s.shape[:-2] + (-1,))


class StateRecurrentEncoder(_StateEncoder):
    """Recurrent SAC: an LSTM over s_{t-T+1..t} (oldest first) with hidden size (T-1)*P, the
    size of state-Flare's offsets. Output (s_t, h_t) [..., T*P], the same size as state-Flare's,
    so the two differ only in how the history is summarised. Trained by the critic loss."""
    num_frames: int = 4
    min_frames = 2

    @nn.compact
    def trunk(self, x: Array) -> Array:
        s = self._history(x)
        lead, (t, p) = s.shape[:-2], s.shape[-2:]
        seq = s.reshape((-1, t, p))
        cell = nn.OptimizedLSTMCell((t - 1) * p, dtype=canonical_dtype(self.dtype),
                                    param_dtype=jnp.float32)
        hidden = nn.RNN(cell, name="lstm")(seq)[:, -1]
        return jnp.concatenate([s[..., -1, :], hidden.reshape(lead + (-1,))], axis=-1)
