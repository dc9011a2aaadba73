"""Shared test setup: the process set-up of flare_jax (XLA CPU flags, MUJOCO_GL) before any JAX
computation, as the launchers do."""
import os

from flare_jax.runtime import setup_process

# Compiled programs are cached on disk and shared by the tests' own subprocesses: many tests
# compile the same small agents (XLA CPU takes ~5-25 s for one Rainbow or SAC step).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The tests pin the CPU conv backend (no once-per-machine measurement inside the suite; their own
# subprocesses inherit it); tests/test_runtime.py tests the measurement and its cache.
os.environ.setdefault("FLARE_JAX_CONV_BACKEND", "eigen")
setup_process()

import faulthandler  # noqa: E402

import pytest  # noqa: E402

# A test that runs longer than this ends the session with every thread's traceback instead of
# hanging CI (see flare_jax/runtime.py StallWatchdog for the XLA CPU stall it guards against).
TEST_TIMEOUT_S = float(os.environ.get("FLARE_JAX_TEST_TIMEOUT_S", "1200"))


@pytest.fixture(autouse=True)
def _stall_guard(request):
    timeout = TEST_TIMEOUT_S * (12 if request.node.get_closest_marker("slow") else 1)
    if timeout > 0:
        faulthandler.dump_traceback_later(timeout, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
