"""XLA CPU backend settings that make the conv stacks fast on CPUs.

XLA's CPU compiler hands every VALID/small-padding convolution, and its filter gradient, to its
YNNPACK "library fusion"; for the Flare/RAD conv stack that path runs single-threaded, while the
same convolution lowered to XLA's multi-threaded Eigen kernels is several times faster
(`python -m experiments.bench encoders` measures both; figures in results/bench). `configure()`
adds `--xla_cpu_experimental_ynn_fusion_type=<fusions>` to XLA_FLAGS so that convolutions go to
Eigen and only `<fusions>` stay on YNNPACK (default `LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`: the
matmuls of the MLPs). It computes the same function as `lax.conv_general_dilated` (it is that
op; only the CPU kernel changes).

The flag is process-wide and must be in XLA_FLAGS before JAX starts its CPU backend, so
`configure()` is called by `flare_jax.runtime.setup_process()`, never on import. GPU/TPU
compilers ignore CPU flags. `FLARE_JAX_YNN_FUSION` chooses the fusions kept on YNNPACK;
`FLARE_JAX_XLA_CPU=0` leaves XLA's defaults.
"""
from __future__ import annotations

import os
import warnings

_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# Library fusions kept on YNNPACK; convolutions are deliberately absent (they go to Eigen).
DEFAULT_YNN_FUSION = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def fast_conv_flag(ynn_fusion: str | None = None) -> str:
    """The XLA flag that routes CPU convolutions to Eigen (keeps `ynn_fusion` on YNNPACK)."""
    if ynn_fusion is None:
        ynn_fusion = os.environ.get("FLARE_JAX_YNN_FUSION", DEFAULT_YNN_FUSION)
    return f"{_FLAG}={ynn_fusion}"


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - other jax versions
        return False


def is_configured() -> bool:
    """True when XLA_FLAGS already chooses the YNNPACK fusions (ours or the user's)."""
    return _FLAG in os.environ.get("XLA_FLAGS", "")


def configure(enable: bool | None = None) -> bool:
    """Adds the fast-conv flag to XLA_FLAGS if JAX's backends have not started yet.

    Returns True when the flag is in effect for this process. Respects a user's own
    `--xla_cpu_experimental_ynn_fusion_type` and `FLARE_JAX_XLA_CPU=0`.
    """
    if enable is None:
        enable = os.environ.get("FLARE_JAX_XLA_CPU", "1") != "0"
    if not enable:
        return False
    if is_configured():
        return True
    if _backends_initialized():
        warnings.warn(
            "flare_jax.runtime.setup_process() ran after JAX started its backends, so XLA's CPU "
            "convolutions stay on the slow YNNPACK path. Call it before running JAX code, or "
            f"export XLA_FLAGS='{fast_conv_flag()}'.",
            stacklevel=3)
        return False
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast_conv_flag()).strip()
    return True


def conv_uses_ynnpack() -> bool:
    """Compiles a small VALID conv on the CPU backend and says whether YNNPACK got it."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jax import lax  # pylint: disable=g-import-not-at-top

    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.zeros((2, 16, 16, 32), jnp.float32), cpu)
    w = jax.device_put(jnp.zeros((3, 3, 32, 32), jnp.float32), cpu)
    fn = jax.jit(lambda a, b: lax.conv_general_dilated(
        a, b, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return "__ynn_fusion" in fn.lower(x, w).compile().as_text()

