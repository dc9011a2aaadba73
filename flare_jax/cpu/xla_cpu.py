"""XLA CPU backend settings for the conv stacks: Eigen or YNNPACK convolutions, chosen per machine
by measurement.

XLA's CPU compiler (jaxlib 0.10.2) hands every VALID/small-padding convolution and its filter
gradient to its YNNPACK "library fusion" by default. With
`--xla_cpu_experimental_ynn_fusion_type=<fusions>` in XLA_FLAGS only `<fusions>` stay on YNNPACK
(here `LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`: the MLPs' matmuls) and convolutions are lowered to
XLA's multi-threaded Eigen kernels instead. Both compute `lax.conv_general_dilated` (only the CPU
kernel changes). Which one is faster depends on the CPU (vector/matrix extensions, cores): on the
2-core AMD EPYC (AVX2) and Intel Xeon (AVX-512, AMX) VMs measured so far YNNPACK ran the Flare/RAD
conv stack single-threaded and Eigen was several times faster (`python -m experiments.bench
encoders` prints both), but that is a measurement, not a rule, so `choose_backend()` measures:

* it times one cache-sized chunk of the DMC pixel trunk (16 frames of 108x108x3 uint8, four 3x3
  convs of 32 channels) and one of the Atari Flare trunk (128 frames of 84x84, 8x8/4x4/3x3),
  forward and backward through `flare_jax.cpu.conv.conv_stack` (the path the agents run), under each
  backend in its own subprocess (the flag must be set before JAX starts), and takes the faster;
* the result is cached per machine (CPU model, its extensions, usable threads, jaxlib version) in
  `$FLARE_JAX_CACHE_DIR` (default `$XDG_CACHE_HOME/flare_jax` or `~/.cache/flare_jax`), file
  `conv_backend.json`, so it is measured once (~10-20 s, a note on stderr) and then read;
  concurrent processes (pytest workers, hosts of one run) wait on a file lock for the first one's
  measurement instead of measuring side by side;
* the same subprocess of the faster backend also times the forward-only pass (an
  undifferentiated conv stack: SAC's target trunk and frozen frames, Rainbow's targets, acting)
  as the chunks and as one full-batch pass (`forward_mode`, `flare_jax.cpu.conv`), and the faster goes
  into FLARE_JAX_CONV_FORWARD (unless the user set it);
* `FLARE_JAX_CONV_BACKEND=eigen|ynnpack` skips the measurement (tests pin `eigen`); `measure`
  (the default) measures or reads the cache; a user's own `--xla_cpu_experimental_ynn_fusion_type`
  in XLA_FLAGS is respected as it is.

`configure()` is called by `flare_jax.runtime.setup_process()`, never on import; GPU/TPU compilers
ignore the CPU flag, and the measurement is skipped where JAX_PLATFORMS excludes the CPU.
`FLARE_JAX_YNN_FUSION` chooses the fusions kept on YNNPACK under `eigen`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import time
import warnings

_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# Library fusions kept on YNNPACK under "eigen"; convolutions are deliberately absent.
DEFAULT_YNN_FUSION = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
BACKENDS = ("eigen", "ynnpack")
ENV_BACKEND = "FLARE_JAX_CONV_BACKEND"
CHOICES = BACKENDS + ("measure",)
_CACHE_FILE = "conv_backend.json"
FORWARDS = ("chunked", "full")       # how an undifferentiated conv stack runs (flare_jax.cpu.conv)
ENV_FORWARD = "FLARE_JAX_CONV_FORWARD"
_CPU_EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile",
                   "asimd", "sve")


@dataclasses.dataclass(frozen=True)
class Choice:
    """The CPU conv set-up in effect and why.

    backend: "eigen" or "ynnpack"; forward: how undifferentiated conv stacks run ("chunked" or
    "full", `forward_mode`). source: "env" (FLARE_JAX_CONV_BACKEND), "xla_flags"
    (the user's own flag), "measured" (just now), "cache" (an earlier measurement on this
    machine), "fallback" (the measurement failed: eigen, chunked) or "not_cpu" (JAX_PLATFORMS has
    no cpu). ms: milliseconds per backend (one chunk of each trunk, forward+backward);
    forward_ms: milliseconds per forward mode (under the chosen backend)."""
    backend: str
    source: str
    ms: dict | None = None
    forward: str = "chunked"
    forward_ms: dict | None = None

    def describe(self) -> str:
        name = {"eigen": "Eigen", "ynnpack": "YNNPACK"}.get(self.backend, self.backend)
        how = {"env": f"set by {ENV_BACKEND}", "xla_flags": "set by XLA_FLAGS",
               "fallback": "measurement failed, default", "not_cpu": "JAX_PLATFORMS has no cpu"}
        if self.ms:
            times = ", ".join(f"{b} {self.ms[b]:.0f} ms" for b in BACKENDS if b in self.ms)
            why = f"measured on this machine: {times} per trunk chunk fwd+bwd"
            if self.forward_ms:
                why += "; forward only " + ", ".join(
                    f"{m} {v:.0f} ms" for m, v in sorted(self.forward_ms.items()))
            if self.source == "cache":
                why += "; cached"
        else:
            why = how.get(self.source, self.source)
        return f"{name} convs, {self.forward} forward-only passes ({why})"


def forward_mode() -> str:
    """How an undifferentiated chunked conv stack runs in this process: FLARE_JAX_CONV_FORWARD,
    "chunked" (default) or "full" (`configure()` sets it from the per-machine measurement)."""
    mode = os.environ.get(ENV_FORWARD, "chunked")
    if mode not in FORWARDS:
        raise ValueError(f"{ENV_FORWARD}={mode!r}: valid values are {', '.join(FORWARDS)}")
    return mode


def fast_conv_flag(ynn_fusion: str | None = None) -> str:
    """The XLA flag that routes CPU convolutions to Eigen (keeps `ynn_fusion` on YNNPACK)."""
    if ynn_fusion is None:
        ynn_fusion = os.environ.get("FLARE_JAX_YNN_FUSION", DEFAULT_YNN_FUSION)
    return f"{_FLAG}={ynn_fusion}"


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - other jax versions
        return False


def is_configured() -> bool:
    """True when XLA_FLAGS already chooses the YNNPACK fusions (ours or the user's)."""
    return _FLAG in os.environ.get("XLA_FLAGS", "")


# ---------------------------------------------------------------------------- the machine's key

def cpu_info() -> tuple[str, list[str]]:
    """(CPU model, the vector/matrix extensions among _CPU_EXTENSIONS it has), from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "Model") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [e for e in _CPU_EXTENSIONS if e in flags]


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_key() -> str:
    """What the best conv backend depends on: CPU model, extensions, usable threads, jaxlib."""
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    try:
        jaxlib = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:  # pragma: no cover
        jaxlib = "?"
    model, ext = cpu_info()
    return f"{model} | {','.join(ext) or '-'} | {_threads()} threads | jaxlib {jaxlib}"


def cache_path() -> str:
    root = os.environ.get("FLARE_JAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "flare_jax")
    return os.path.join(root, _CACHE_FILE)


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_choice() -> Choice | None:
    """This machine's cached measurement, if any."""
    entry = _read_cache(cache_path()).get(machine_key())
    if (not isinstance(entry, dict) or entry.get("backend") not in BACKENDS
            or entry.get("forward") not in FORWARDS):
        return None
    return Choice(entry["backend"], "cache", entry.get("ms"), entry["forward"],
                  entry.get("forward_ms"))


# ------------------------------------------------------------------------------ the measurement

def _env_for(backend: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_FLAG))
    if backend == "eigen":
        flags = (flags + " " + fast_conv_flag()).strip()
    env["XLA_FLAGS"] = flags
    env.pop("JAX_COMPILATION_CACHE_DIR", None)   # time the kernels, not a cache read
    return env


def measure(repeats: int = 5, timeout_s: float = 300.0) -> dict[str, dict]:
    """{backend: {"ms": fwd+bwd of the two trunk chunks, "forward_ms": {forward mode: ms}}}
    (each the fastest of `repeats` calls after a compile-and-warm-up call: the least disturbed
    by other load), each backend in a fresh subprocess."""
    out = {}
    for backend in BACKENDS:
        proc = subprocess.run(
            [sys.executable, "-m", "flare_jax.cpu.xla_cpu", "--measure", str(repeats), backend],
            env=_env_for(backend), capture_output=True, text=True, timeout=timeout_s, check=True)
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        out[backend] = {"ms": float(record["ms"]),
                        "forward_ms": {m: float(v) for m, v in record["forward_ms"].items()}}
    return out


def _fastest_ms(fn, args, repeats: int) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _measure_in_this_process(repeats: int) -> dict:
    """{"ms": the two trunk chunks' fwd+bwd, "forward_ms": {mode: the DMC trunk's forward of
    128 frames and the Atari trunk's of 128, undifferentiated, per FORWARDS mode}}."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flare_jax.cpu import conv  # pylint: disable=g-import-not-at-top

    cases = (((16, 108, 108, 3), (3, 3, 3, 3), (3, 32, 32, 32), (2, 1, 1, 1)),   # DMC pixels
             ((128, 84, 84, 1), (8, 4, 3), (1, 16, 32), (4, 2, 1)))             # Atari Flare
    total, forward_ms = 0.0, {mode: 0.0 for mode in FORWARDS}
    for x_shape, ksizes, cins, strides in cases:
        key = jax.random.PRNGKey(0)
        couts = cins[1:] + (32,)
        kernels = [jax.random.normal(jax.random.fold_in(key, i), (k, k, ci, co)) * 0.1
                   for i, (k, ci, co) in enumerate(zip(ksizes, cins, couts))]
        biases = [jnp.zeros(co) for co in couts]
        x = jax.random.randint(key, x_shape, 0, 256, jnp.int32).astype(jnp.uint8)

        def loss(ks, bs, x, strides=strides):
            return jnp.sum(conv.conv_stack(ks, bs, x, strides, scale=1 / 255, impl="chunked") ** 2)

        total += _fastest_ms(jax.jit(jax.grad(loss, (0, 1))), (kernels, biases, x), repeats)
        batch = jnp.concatenate([x] * (128 // x.shape[0]))       # 128 frames
        for mode in FORWARDS:
            fn = jax.jit(lambda ks, bs, x, mode=mode, strides=strides: conv.conv_stack(
                ks, bs, x, strides, scale=1 / 255, impl="chunked", forward=mode))
            forward_ms[mode] += _fastest_ms(fn, (kernels, biases, batch), repeats)
    return {"ms": total, "forward_ms": forward_ms}


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def choose_backend() -> Choice:
    """The conv backend for this process: FLARE_JAX_CONV_BACKEND, else the user's XLA flag, else
    this machine's cached measurement, else a measurement now (cached for the next processes)."""
    wanted = os.environ.get(ENV_BACKEND, "measure").strip().lower()
    if wanted not in CHOICES:
        raise ValueError(f"{ENV_BACKEND}={wanted!r}: valid values are {', '.join(CHOICES)}")
    if wanted in BACKENDS:
        return Choice(wanted, "env")
    if is_configured():
        return Choice("eigen" if "CONVOLUTION" not in os.environ["XLA_FLAGS"] else "ynnpack",
                      "xla_flags")
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return Choice("eigen", "not_cpu")
    choice = cached_choice()
    if choice is not None:
        return choice
    path = cache_path()
    try:
        with _locked(path):
            choice = cached_choice()              # measured by another process meanwhile
            if choice is not None:
                return choice
            print(f"[flare_jax] measuring Eigen vs YNNPACK CPU convolutions on this machine (once; "
                  f"cached in {path}) ...", file=sys.stderr, flush=True)
            measured = measure()
            ms = {b: r["ms"] for b, r in measured.items()}
            best = min(ms, key=ms.get)
            forward_ms = measured[best]["forward_ms"]
            forward = min(forward_ms, key=forward_ms.get)
            data = _read_cache(path)
            data[machine_key()] = {"backend": best, "ms": ms, "forward": forward,
                                   "forward_ms": forward_ms,
                                   "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
            choice = Choice(best, "measured", ms, forward, forward_ms)
            print(f"[flare_jax] CPU conv backend: {choice.describe()}", file=sys.stderr, flush=True)
            return choice
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        warnings.warn(f"could not measure the CPU conv backends ({type(e).__name__}: "
                      f"{str(e)[-300:]}); using Eigen", stacklevel=2)
        return Choice("eigen", "fallback")


def configure() -> Choice:
    """Chooses the conv backend (`choose_backend`) and, for Eigen, adds the flag to XLA_FLAGS if
    JAX's backends have not started yet (else warns and leaves XLA's defaults). Returns the
    choice in effect for this process."""
    choice = choose_backend()
    if ENV_FORWARD in os.environ:               # the user's own setting wins
        choice = dataclasses.replace(choice, forward=forward_mode())
    else:
        os.environ[ENV_FORWARD] = choice.forward
    if choice.backend == "eigen" and not is_configured():
        if _backends_initialized():
            warnings.warn(
                "flare_jax.runtime.setup_process() ran after JAX started its backends, so XLA's "
                "CPU convolutions stay on YNNPACK. Call it before running JAX code, or export "
                f"XLA_FLAGS='{fast_conv_flag()}'.", stacklevel=3)
            return dataclasses.replace(choice, backend="ynnpack", source="too_late")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast_conv_flag()).strip()
    return choice


def conv_uses_ynnpack() -> bool:
    """Compiles a small VALID conv on the CPU backend and says whether YNNPACK got it."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jax import lax  # pylint: disable=g-import-not-at-top

    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.zeros((2, 16, 16, 32), jnp.float32), cpu)
    w = jax.device_put(jnp.zeros((3, 3, 32, 32), jnp.float32), cpu)
    fn = jax.jit(lambda a, b: lax.conv_general_dilated(
        a, b, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return "__ynn_fusion" in fn.lower(x, w).compile().as_text()


if __name__ == "__main__":
    # python -m flare_jax.cpu.xla_cpu --measure REPEATS BACKEND: one backend's time (run by `measure`)
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        if (sys.argv[3] == "eigen") != is_configured():
            sys.exit(f"XLA_FLAGS do not select {sys.argv[3]}")
        print(json.dumps(_measure_in_this_process(int(sys.argv[2]))))
    else:
        # python -m flare_jax.cpu.xla_cpu: this machine's choice (measures if not cached)
        print(choose_backend().describe())
