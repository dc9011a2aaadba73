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
        "import flare_jax, flare_jax.loop, flare_jax.checkpoint, flare_jax.data.replay, flare_jax.runtime\n"
        "import flare_jax.envs.dmc, flare_jax.envs.atari, flare_jax.encoders, flare_jax.cpu.xla_cpu\n"
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
            "print(state['cpu_conv'].backend, os.environ['MUJOCO_GL'], "
            "'ynn_fusion_type' in os.environ.get('XLA_FLAGS', ''))\n")
    out = _fresh_python(code)     # FLARE_JAX_CONV_BACKEND=eigen (conftest)
    assert out.stdout.split() == ["eigen", "egl", "True"], out.stderr[-2000:]


# ------------------------------------------------ the CPU conv backend, measured once per machine

_CHOICE = ("import json, os\nfrom flare_jax.runtime import setup_process\n"
           "c = setup_process()['cpu_conv']\nfrom flare_jax.cpu import xla_cpu\n"
           "print(json.dumps({'backend': c.backend, 'source': c.source, 'forward': c.forward, "
           "'forward_env': os.environ.get('FLARE_JAX_CONV_FORWARD'), "
           "'ynn': xla_cpu.conv_uses_ynnpack(), 'line': c.describe()}))\n")


def _choice_in_fresh_process(cache_dir, **env):
    import json
    import subprocess
    import sys
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "MUJOCO_GL", "FLARE_JAX_CONV_BACKEND", "FLARE_JAX_CONV_FORWARD")}
    out = subprocess.run([sys.executable, "-c", _CHOICE], capture_output=True, text=True,
                         timeout=600, env=dict(base, FLARE_JAX_CACHE_DIR=str(cache_dir), **env))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_the_conv_backend_is_measured_once_then_read_from_the_cache_and_takes_effect(tmp_path):
    """A machine without a cached choice measures both backends in subprocesses (real timings),
    caches the faster under this machine's key, and a second process reads it without measuring;
    a cached YNNPACK choice leaves XLA's default (convs compile to YNNPACK), Eigen routes them
    to Eigen."""
    import json
    from flare_jax.cpu import xla_cpu
    first, err = _choice_in_fresh_process(tmp_path)
    assert first["source"] == "measured" and "measuring Eigen vs YNNPACK" in err
    cache = json.loads((tmp_path / "conv_backend.json").read_text())
    entry = cache[xla_cpu.machine_key()]
    assert set(entry["ms"]) == {"eigen", "ynnpack"} and all(v > 0 for v in entry["ms"].values())
    assert entry["backend"] == min(entry["ms"], key=entry["ms"].get) == first["backend"]
    assert first["ynn"] == (first["backend"] == "ynnpack")
    # the forward-only mode: the faster of the two under the chosen backend, put in effect
    assert set(entry["forward_ms"]) == {"chunked", "full"}
    assert entry["forward"] == min(entry["forward_ms"], key=entry["forward_ms"].get)
    assert first["forward"] == first["forward_env"] == entry["forward"]
    second, err = _choice_in_fresh_process(tmp_path)
    assert second["source"] == "cache" and second["backend"] == first["backend"]
    assert "measuring" not in err and "cached" in second["line"]
    for backend in xla_cpu.BACKENDS:          # the cached choice is what compiles
        entry = dict(entry, backend=backend)
        (tmp_path / "conv_backend.json").write_text(json.dumps({xla_cpu.machine_key(): entry}))
        got, _ = _choice_in_fresh_process(tmp_path)
        assert (got["backend"], got["source"], got["ynn"]) == (backend, "cache",
                                                               backend == "ynnpack")
    for forward in ("chunked", "full"):       # the cached forward mode is what runs
        entry = dict(entry, forward=forward)
        (tmp_path / "conv_backend.json").write_text(json.dumps({xla_cpu.machine_key(): entry}))
        got, _ = _choice_in_fresh_process(tmp_path)
        assert (got["forward"], got["forward_env"]) == (forward, forward)
    got, _ = _choice_in_fresh_process(tmp_path, FLARE_JAX_CONV_FORWARD="chunked")   # user's wins
    assert (got["forward"], got["forward_env"], got["source"]) == ("chunked", "chunked", "cache")


def test_the_conv_backend_can_be_set_and_a_bad_value_is_one_line(tmp_path):
    import subprocess
    import sys
    got, _ = _choice_in_fresh_process(tmp_path, FLARE_JAX_CONV_BACKEND="ynnpack")
    assert (got["backend"], got["source"], got["ynn"]) == ("ynnpack", "env", True)
    assert not (tmp_path / "conv_backend.json").exists()          # nothing measured
    env = dict(os.environ, FLARE_JAX_CONV_BACKEND="fastest", FLARE_JAX_TCMALLOC="0")
    out = subprocess.run([sys.executable, "-m", "experiments.train_sac", "--env_steps=10"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: FLARE_JAX_CONV_BACKEND='fastest': valid values are eigen, ynnpack, measure"]


def test_processes_that_start_together_wait_for_one_measurement(tmp_path, monkeypatch):
    """Under the cache's lock, a process that finds an entry written meanwhile uses it (no
    second measurement); a failed measurement falls back to Eigen without caching."""
    import fcntl
    import json
    import threading
    from flare_jax.cpu import xla_cpu
    monkeypatch.setenv("FLARE_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLARE_JAX_CONV_BACKEND", "measure")
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    calls = []
    measured = {"eigen": {"ms": 2.0, "forward_ms": {"chunked": 1.0, "full": 3.0}},
                "ynnpack": {"ms": 1.0, "forward_ms": {"chunked": 5.0, "full": 4.0}}}
    monkeypatch.setattr(xla_cpu, "measure", lambda: calls.append(1) or measured)
    path = tmp_path / "conv_backend.json"
    with open(str(path) + ".lock", "a") as lock:             # another process is measuring
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = {}
        t = threading.Thread(target=lambda: result.update(c=xla_cpu.choose_backend()))
        t.start()
        t.join(0.5)
        assert t.is_alive()                                    # waits on the lock
        path.write_text(json.dumps({xla_cpu.machine_key(): {
            "backend": "eigen", "ms": {"eigen": 1, "ynnpack": 9}, "forward": "full"}}))
        fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(30)
    assert result["c"] == xla_cpu.Choice("eigen", "cache", {"eigen": 1, "ynnpack": 9}, "full")
    assert calls == []
    path.unlink()
    assert xla_cpu.choose_backend() == xla_cpu.Choice(
        "ynnpack", "measured", {"eigen": 2.0, "ynnpack": 1.0}, "full", {"chunked": 5.0, "full": 4.0})
    assert json.loads(path.read_text())[xla_cpu.machine_key()]["forward"] == "full"
    assert calls == [1]
    path.unlink()

    def broken():
        raise OSError("no subprocess")
    monkeypatch.setattr(xla_cpu, "measure", broken)
    with pytest.warns(UserWarning, match="could not measure"):
        assert xla_cpu.choose_backend() == xla_cpu.Choice("eigen", "fallback")
    assert not path.exists()


def test_the_watchdog_arms_when_stderr_has_no_file_descriptor(monkeypatch):
    """A Jupyter kernel's sys.stderr has no fileno(): the watchdog writes to fd 2 instead."""
    import io
    import sys
    from flare_jax.runtime import StallWatchdog
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with StallWatchdog(60.0) as watchdog:
        watchdog.beat()
