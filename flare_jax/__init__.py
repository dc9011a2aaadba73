"""flare_jax: Flare (latent flow) encoders and the shared RL library (replay, envs, loop, logging).

Importing it changes no environment variable and no JAX setting. Entry points (launchers, tests,
notebooks) call `flare_jax.runtime.setup_process()` once, before any JAX computation, for the
fast CPU convolutions and headless rendering.
"""
__version__ = "0.1.0"
