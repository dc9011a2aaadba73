"""StopRequests: SIGTERM and Ctrl-C become a flag the training loops poll, so runs save on exit."""
import os
import signal

import pytest

from flare_jax.runtime import StallWatchdog, StopRequests


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda *_: seen.append("old"))
    try:
        stop = StopRequests()
        with stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested
        assert seen == []  # the loop's handler took it, not the previous one
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["old"]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_keyboard_interrupt_ends_the_block_with_the_flag_set():
    stop = StopRequests()
    steps = 0
    with stop:
        while not stop.requested:
            steps += 1
            if steps == 3:
                raise KeyboardInterrupt
    assert stop.requested and steps == 3


def test_other_exceptions_propagate():
    stop = StopRequests()
    with pytest.raises(ValueError):
        with stop:
            raise ValueError("boom")
    assert not stop.requested


def test_stall_watchdog_ends_a_stalled_process_with_tracebacks():
    import subprocess
    import sys
    code = ("import time\nfrom flare_jax.runtime import StallWatchdog\n"
            "with StallWatchdog(1.0) as w:\n"
            "    for _ in range(3):\n        w.beat(); time.sleep(0.2)\n"   # beating: alive
            "    print('beats ok', flush=True)\n    time.sleep(30)\n")      # stalled: ended
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "beats ok" in out.stdout
    assert out.returncode != 0 and "Timeout" in out.stderr and "line 7" in out.stderr


def test_stall_watchdog_disabled_and_cancelled():
    import time
    with StallWatchdog(0) as w:
        w.beat()
    with StallWatchdog(0.5):
        pass
    time.sleep(0.8)  # cancelled on exit: this process is still alive



def _fresh_python(code: str):
    """`python -c code` without the XLA_FLAGS and MUJOCO_GL the test process set up."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MUJOCO_GL")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_importing_the_library_changes_no_environment_variable_and_no_jax_setting():
    import json
    code = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import jax\n"
        "names = ('jax_enable_x64', 'jax_platforms', 'jax_default_matmul_precision', 'jax_num_cpu_devices')\n"
        "flags_before = {k: getattr(jax.config, k) for k in names}\n"
        "import flare_jax, flare_jax.loop, flare_jax.checkpoint, flare_jax.replay, flare_jax.runtime\n"
        "import flare_jax.envs.dmc, flare_jax.envs.atari, flare_jax.encoders, flare_jax.xla_cpu\n"
        "import agents, agents.sac, agents.sac_train, agents.rainbow, agents.rainbow_train\n"
        "import experiments.presets, experiments.cli, experiments.report\n"
        "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
        "flags_after = {k: getattr(jax.config, k) for k in names}\n"
        "print(json.dumps({'changed': sorted(changed), 'flags': flags_before == flags_after}))\n")
    out = _fresh_python(code)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"changed": [], "flags": True}, out.stderr[-2000:]


def test_setup_process_sets_the_xla_cpu_flag_and_mujoco_gl():
    code = ("import os\nfrom flare_jax.runtime import setup_process\n"
            "state = setup_process()\n"
            "print(state['fast_cpu_conv'], os.environ['MUJOCO_GL'], "
            "'ynn_fusion_type' in os.environ.get('XLA_FLAGS', ''))\n")
    out = _fresh_python(code)
    assert out.stdout.split() == ["True", "egl", "True"], out.stderr[-2000:]


def test_the_watchdog_arms_when_stderr_has_no_file_descriptor(monkeypatch):
    """A Jupyter kernel's sys.stderr has no fileno(): the watchdog writes to fd 2 instead."""
    import io
    import sys
    from flare_jax.runtime import StallWatchdog
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with StallWatchdog(60.0) as watchdog:
        watchdog.beat()
