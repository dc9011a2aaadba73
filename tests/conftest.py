"""Shared test setup: import flare_jax first so its XLA CPU settings apply to every test."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import flare_jax  # noqa: E402,F401  (configures XLA before any JAX computation)

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
