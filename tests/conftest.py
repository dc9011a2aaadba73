"""Shared test setup: import flare_jax first so its XLA CPU settings apply to every test."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import flare_jax  # noqa: E402,F401  (configures XLA before any JAX computation)
