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

import os
import sys

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
