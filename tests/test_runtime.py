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

