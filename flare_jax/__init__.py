"""flare_jax: Flare (latent flow) encoders and the shared RL library (replay, envs, logging).

Importing this package configures XLA's CPU backend for fast convolutions (see
`flare_jax.xla_cpu`); import it before running any JAX computation.
"""
from flare_jax import xla_cpu as _xla_cpu

FAST_CPU_CONV = _xla_cpu.configure()

__version__ = "0.1.0"
