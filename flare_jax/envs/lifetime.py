"""The lifetime of an envpool-backed vector env, shared by the DMC and Atari wrappers."""
from __future__ import annotations


class EnvLifetime:
    """`close()`, context-manager use and the closed check over `self._env` (an envpool env).

    Subclasses set `self._env` and call `_mark_open()` in their constructor; `reset`/`step` call
    `_check_open()` first.
    """

    _env = None
    _closed = False

    def _mark_open(self):
        self._closed = False

    def _check_open(self):
        if self._closed:
            raise RuntimeError("the environment is closed")

    def close(self):
        """Releases envpool's environments; further reset/step calls raise."""
        if not self._closed:
            self._closed = True
            close = getattr(self._env, "close", None)
            if close is not None:
                close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
