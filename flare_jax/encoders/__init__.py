"""Encoders: pixel (DMC), Atari torsos, state-space variants; built by name with `make_encoder`."""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from flare_jax.encoders.atari import AtariBaselineTorso, AtariFlareTorso, MLPTorso
from flare_jax.encoders.layers import delta_orthogonal, latent_flow
from flare_jax.encoders.pixel import (FlareEncoder, FrameStackEncoder, LatentStackEncoder,
                                      PixelEncoder, PixelFlowEncoder, RecurrentEncoder)
from flare_jax.encoders.state import (FullStateEncoder, PositionOnlyEncoder, StateFlareEncoder,
                                      StateRecurrentEncoder, StateStackEncoder, position_offsets)
from flare_jax.precision import canonical_dtype

ENCODERS: dict[str, type[nn.Module]] = {
    # DMC pixels (reference section 1)
    "flare": FlareEncoder,
    "frame_stack": FrameStackEncoder,
    "pixel_flow": PixelFlowEncoder,
    "latent_stack": LatentStackEncoder,
    "recurrent": RecurrentEncoder,
    # Atari (reference section 4)
    "atari_flare": AtariFlareTorso,
    "atari_baseline": AtariBaselineTorso,
    "mlp": MLPTorso,
    # DMC states (reference section 3)
    "state_full": FullStateEncoder,
    "state_position": PositionOnlyEncoder,
    "state_flare": StateFlareEncoder,
    "state_stack": StateStackEncoder,
    "state_recurrent": StateRecurrentEncoder,
}


def encoder_fields(name: str) -> list[str]:
    """The configuration fields `make_encoder(name, ...)` accepts."""
    cls = _lookup(name)
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def _lookup(name: str) -> type[nn.Module]:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; valid encoders: "
                         f"{', '.join(sorted(ENCODERS))}") from None


def make_encoder(name: str, **config) -> nn.Module:
    """Builds an encoder by name, e.g. `make_encoder("flare", num_frames=3, feature_dim=64)`.

    Every encoder takes [..., T, *frame] (T = `encoder.num_frames`, oldest first) and returns
    [..., features]; `encoder.observation` says what it needs from the environment
    ("pixels", "vector", "full" state or "position" vectors). Every encoder takes `dtype`, its
    compute dtype ("float32", the default, or "bfloat16"; `flare_jax.precision`): parameters are
    float32, convs/Dense/LSTM compute in `dtype`, and the features come out in `dtype` (the
    parameter-free state encoders pass their float32 states through).
    """
    cls = _lookup(name)
    valid = encoder_fields(name)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(f"encoder {name!r} has no option(s) {', '.join(unknown)}; "
                         f"valid options: {', '.join(valid)}")
    if "dtype" in config:
        config = dict(config, dtype=canonical_dtype(config["dtype"]).name)
    return cls(**config)


__all__ = [
    "ENCODERS", "make_encoder", "encoder_fields", "delta_orthogonal", "latent_flow",
    "position_offsets", "PixelEncoder", "FlareEncoder", "FrameStackEncoder", "PixelFlowEncoder",
    "LatentStackEncoder", "RecurrentEncoder", "AtariFlareTorso", "AtariBaselineTorso", "MLPTorso",
    "FullStateEncoder", "PositionOnlyEncoder", "StateFlareEncoder", "StateStackEncoder",
    "StateRecurrentEncoder",
]
