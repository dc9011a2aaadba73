"""Headless MuJoCo rendering for envpool's pixel DMC tasks on machines without a display.

envpool renders through EGL. On a CPU-only machine it finds Mesa's software EGL only when the
system libEGL (Debian libegl1 + libegl-mesa0) is loaded with RTLD_GLOBAL *before* envpool is
imported, and MUJOCO_GL=egl is set (reference.md section 5).
"""
from __future__ import annotations

import ctypes
import os
import sys

_LOADED = False
DEBIAN_PACKAGES = ("libegl1", "libegl-mesa0", "libgl1")


def preload_egl() -> None:
    """Sets MUJOCO_GL=egl (unless set) and loads libEGL globally. Idempotent.

    Raises RuntimeError naming the Debian packages when libEGL cannot be loaded.
    """
    global _LOADED
    if _LOADED:
        return
    os.environ.setdefault("MUJOCO_GL", "egl")
    if "envpool" in sys.modules and not _LOADED:
        # Loading now may still work for the renderer, but say why it may fail.
        import warnings  # pylint: disable=g-import-not-at-top
        warnings.warn("envpool was imported before libEGL was preloaded; pixel rendering may fail",
                      stacklevel=2)
    try:
        ctypes.CDLL("libEGL.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise RuntimeError(
            "pixel observations need the system libEGL (headless rendering): install the Debian "
            f"packages {' '.join(DEBIAN_PACKAGES)} (`make test` does this when run as root)"
        ) from err
    _LOADED = True
