"""Process-level runtime settings for the command-line entry points.

tcmalloc. XLA's CPU runtime allocates fresh buffers for the large activations of every call
(100+ MB for a pixel SAC batch). With glibc malloc those are mmap'ed and unmapped each time, and
the page faults and zeroing of new pages made an elementwise pass over a 128 MB activation take
~75 ms on the 2-core dev machine; with tcmalloc (which keeps freed pages) it takes ~9 ms, and a
Flare SAC update drops from ~5.0 s to ~3.8 s. tcmalloc must be loaded at process start
(LD_PRELOAD), so the Makefile exports it and `reexec_with_tcmalloc` restarts an entry point
under it when it was started without. Debian package: libtcmalloc-minimal4.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")
_ENV_GUARD = "FLARE_JAX_REEXECED"


def tcmalloc_path() -> str | None:
    for path in TCMALLOC_PATHS:
        if os.path.exists(path):
            return path
    return None


def tcmalloc_loaded() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            return "tcmalloc" in f.read()
    except OSError:
        return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def reexec_with_tcmalloc(module: str) -> None:
    """Re-runs `python -m module args...` with tcmalloc preloaded, if available and not loaded.

    Call first thing in an entry point's `if __name__ == "__main__":` block. No-op when
    FLARE_JAX_TCMALLOC=0, when tcmalloc is missing (a note is printed), or after one re-exec.
    """
    if os.environ.get("FLARE_JAX_TCMALLOC", "1") == "0" or os.environ.get(_ENV_GUARD):
        return
    if tcmalloc_loaded():
        return
    path = tcmalloc_path()
    if path is None:
        print("[flare_jax] tcmalloc not found (Debian: libtcmalloc-minimal4); large CPU batches "
              "will run slower", file=sys.stderr)
        return
    env = dict(os.environ, LD_PRELOAD=(path + " " + os.environ.get("LD_PRELOAD", "")).strip())
    env[_ENV_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module] + sys.argv[1:], env)


class StopRequests:
    """SIGTERM and Ctrl-C turned into a flag that a training loop polls between steps.

      stop = StopRequests()
      with stop:
          while step < total and not stop.requested:
              ...
      if stop.requested:
          ...  # save parameters and logs, report the interruption

    Inside the block SIGTERM sets `requested` (the previous handler is restored on exit) and a
    KeyboardInterrupt ends the block with `requested` set instead of propagating, so the caller
    saves what it has. Off the main thread no signal handler is installed.
    """

    def __init__(self):
        self.requested = False
        self._old_handler = None

    def _on_signal(self, *_):
        self.requested = True

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None
        if exc_type is KeyboardInterrupt:
            self.requested = True
            return True
        return False


class StallWatchdog:
    """Ends the process, with every thread's Python traceback on stderr, when a loop stalls.

    A training loop calls `beat()` after each step; if no beat comes for `seconds`, Python's
    faulthandler prints the tracebacks and exits the process (status 1). This turns a wedged XLA
    CPU thread pool (see `flare_jax.xla_cpu.single_thread_eigen`) into a failure that a
    resumable launcher can rerun, instead of a process that waits forever. `seconds <= 0`
    disables it.
    """

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self._armed_at = 0.0

    def _arm(self):
        faulthandler.dump_traceback_later(self.seconds, exit=True)
        self._armed_at = time.monotonic()

    def beat(self):
        # re-arming is cheap, but once a second is plenty
        if self.seconds > 0 and time.monotonic() - self._armed_at > 1.0:
            self._arm()

    def __enter__(self) -> "StallWatchdog":
        if self.seconds > 0:
            self._arm()
        return self

    def __exit__(self, *exc) -> bool:
        if self.seconds > 0:
            faulthandler.cancel_dump_traceback_later()
        return False


def host_to_device(*arrays):
    """`jax.device_put` of host (numpy) arrays, returned only once the copies are done.

    Used for the one-off start-of-run inputs (keys, first frames), so the first programs never
    start with inputs in flight. It was added while chasing a start-of-run hang that turned out
    to be a batched LAPACK QR on XLA's CPU pool (see agents.sac.init_seeds). Per-step env output
    goes to the jitted calls as numpy arrays instead: the extra synchronisation cost ~0.6 ms per
    step (8 Atari frames + scalars: 0.90 vs 0.30 ms per call on the loaded 2-core VM). Returns
    one array for one input, else a tuple.
    """
    import jax  # pylint: disable=g-import-not-at-top
    out = jax.block_until_ready(jax.device_put(arrays))
    return out[0] if len(arrays) == 1 else tuple(out)
