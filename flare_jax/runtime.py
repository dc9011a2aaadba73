"""Process set-up and process-level helpers for the entry points (launchers, tests, notebooks).

`setup_process()` is the one explicit process set-up; importing `flare_jax` changes nothing:
  * XLA CPU flags (`flare_jax.cpu.xla_cpu.configure`): convolutions on Eigen or YNNPACK, whichever
    measured faster on this machine (measured once, cached); must run before JAX starts its
    backends;
  * MUJOCO_GL=egl (headless rendering), unless set;
  * with `reexec=<module>` (launchers only): restarts `python -m <module>` under tcmalloc when it
    is installed and not loaded. XLA's CPU runtime allocates fresh buffers for the large
    activations of every call; tcmalloc keeps freed pages, glibc malloc maps and zeroes them
    again (figures in results/bench). It must be loaded at process start (LD_PRELOAD), hence the
    re-exec. Debian package: libtcmalloc-minimal4.

Also here: `StopRequests` (SIGTERM/Ctrl-C as a polled flag), `StallWatchdog`, `RunDirLock` (one
live run per output directory) and `die_with_parent` (a child process that ends with its parent).
"""
from __future__ import annotations

import ctypes
import errno
import faulthandler
import fcntl
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


def setup_process(reexec: str | None = None) -> dict:
    """The process set-up of launchers, tests and notebooks; call before any JAX computation.

    Returns what is in effect: {"cpu_conv": xla_cpu.Choice, "tcmalloc": bool}. With `reexec` (the
    launcher's module name) the process may first be restarted under tcmalloc (see above), and a bad
    FLARE_JAX_CONV_BACKEND exits with status 2 and one line (else it raises ValueError).
    """
    from flare_jax.cpu import xla_cpu  # pylint: disable=g-import-not-at-top
    if reexec:
        reexec_with_tcmalloc(reexec)
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        cpu_conv = xla_cpu.configure()
    except ValueError as e:          # a bad FLARE_JAX_CONV_BACKEND
        if reexec:                   # an entry point: one line, no traceback, before any work
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    return {"cpu_conv": cpu_conv, "tcmalloc": tcmalloc_loaded()}


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
        self.signum: int | None = None      # SIGTERM or SIGINT once requested
        self._old_handler = None

    def _on_signal(self, signum, _frame):
        self.requested = True
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by the signal: 128 + signal number."""
        return 128 + (self.signum or signal.SIGINT)

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
            self.signum = self.signum or signal.SIGINT
            return True
        return False


def _stderr_fd() -> int:
    """The file descriptor of stderr; 2 where sys.stderr has none (a Jupyter kernel's stream)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):     # io.UnsupportedOperation is an OSError
        return 2


class StallWatchdog:
    """Ends the process, with every thread's Python traceback on stderr, when a loop stalls.

    A training loop calls `beat()` after each step; if no beat comes for `seconds`, Python's
    faulthandler prints the tracebacks and exits the process (status 1). This turns a wedged XLA
    CPU thread pool (the batched-QR deadlock of `agents.sac.init_seeds`) into a failure that a
    resumable launcher can rerun, instead of a process that waits forever. `seconds <= 0`
    disables it.
    """

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self._armed_at = 0.0

    def _arm(self):
        faulthandler.dump_traceback_later(self.seconds, exit=True, file=_stderr_fd())
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

    For one-off start-of-run inputs, so the first programs never start with inputs in flight
    (per-step env output goes to the jitted calls as numpy, without this extra sync). Returns one
    array for one input, else a tuple.
    """
    import jax  # pylint: disable=g-import-not-at-top
    out = jax.block_until_ready(jax.device_put(arrays))
    return out[0] if len(arrays) == 1 else tuple(out)


class RunDirLock:
    """An exclusive lock on an output directory, held by one live process at a time.

    `flock` on `<directory>/.lock`, which holds the owner's PID. The kernel drops the lock when
    the owner exits, however it exits (kill -9 included), so a stale lock file never blocks.
    Raises RunDirBusy naming the PID when another process holds it.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(f"{self.directory} is in use by a running process (PID {owner}); "
                                 "wait for it to end, stop it, or use another --out_dir") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False


class RunDirBusy(RuntimeError):
    """Another live process holds the output directory (RunDirLock)."""


_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Asks the kernel to send `signum` to this process when its parent dies (Linux prctl).

    For `subprocess.Popen(..., preexec_fn=die_with_parent)`: a child killed this way gets SIGTERM
    however the parent ended (kill -9 included), so it stops, and saves, instead of training on
    alone. A no-op where prctl is unavailable.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:   # the parent died before prctl took effect
        os.kill(os.getpid(), signum)
