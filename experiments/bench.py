"""Benchmarks: `python -m experiments.bench <name> [--flags]`.

  encoders    Flare and frame-stack encoders, forward and forward+backward, both CPU conv paths.

Timings are medians of --repeats runs after a warm-up (compile) run. Variants that need different
XLA settings (the conv paths) run in subprocesses of this module, one after the other, and the
parent prints them side by side with their ratio.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

import flare_jax  # noqa: F401  (XLA CPU settings before JAX starts)
from flare_jax import xla_cpu

import jax
import jax.numpy as jnp
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "timed runs per measurement (median reported)")
flags.DEFINE_integer("batch", 128, "batch size (samples; each holds --frames frames)")
flags.DEFINE_integer("size", 108, "frame height and width in pixels")
flags.DEFINE_integer("frames", 3, "frames per stack (T)")
flags.DEFINE_list("encoders", ["flare", "frame_stack"], "encoders to benchmark")
flags.DEFINE_enum("conv_path", "both", ["both", "fast", "xla"],
                  "CPU conv path: fast (Eigen, flare_jax default), xla (XLA's default YNNPACK), "
                  "both (one subprocess each)")
flags.DEFINE_bool("json", False, "print one JSON line per measurement (used by subprocesses)")

BENCHMARKS = {}


def benchmark(fn):
    BENCHMARKS[fn.__name__] = fn
    return fn


def time_fn(fn, *args, repeats: int) -> list[float]:
    """Seconds per call of a jitted `fn`, after one warm-up call; blocks on the outputs."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def xla_flops(jitted, *args) -> float:
    """FLOPs of one call by XLA's cost analysis of the compiled computation."""
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def _rerun_self(name: str, env_update: dict, extra_args=()) -> list[dict]:
    """Runs `python -m experiments.bench name --json` with env changes; returns its records."""
    env = dict(os.environ, **env_update)
    env.pop("XLA_FLAGS", None)
    args = [sys.executable, "-m", "experiments.bench", name, "--json",
            f"--repeats={FLAGS.repeats}", f"--batch={FLAGS.batch}", f"--size={FLAGS.size}",
            f"--frames={FLAGS.frames}", f"--encoders={','.join(FLAGS.encoders)}", *extra_args]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _emit(record: dict):
    if FLAGS.json:
        print(json.dumps(record), flush=True)


@benchmark
def encoders():
    """Encoder forward and forward+backward (grads of all parameters) at batch x T frames."""
    if FLAGS.conv_path == "both":
        rows = []
        for path, env in (("xla", {"FLARE_JAX_XLA_CPU": "0"}), ("fast", {"FLARE_JAX_XLA_CPU": "1"})):
            print(f"[bench] running the {path!r} conv path in a subprocess ...", flush=True)
            rows += _rerun_self("encoders", env, [f"--conv_path={path}"])
        _print_encoder_table(rows)
        return
    from flare_jax.encoders import make_encoder  # pylint: disable=g-import-not-at-top
    expect_fast = FLAGS.conv_path == "fast"
    if jax.default_backend() == "cpu" and xla_cpu.conv_uses_ynnpack() == expect_fast:
        raise RuntimeError(f"conv path {FLAGS.conv_path!r} requested but XLA_FLAGS disagree")
    key = jax.random.PRNGKey(0)
    shape = (FLAGS.batch, FLAGS.frames, FLAGS.size, FLAGS.size, 3)
    x = jax.random.randint(key, shape, 0, 256, jnp.int32).astype(jnp.uint8)
    for name in FLAGS.encoders:
        enc = make_encoder(name, num_frames=FLAGS.frames)
        params = jax.jit(enc.init)(key, x)
        cot = jax.random.normal(key, (FLAGS.batch, 64))
        fwd = jax.jit(enc.apply)
        fwd_bwd = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(enc.apply(p, x) * cot)))
        for kind, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
            flops = xla_flops(fn, params, x)
            times = time_fn(fn, params, x, repeats=FLAGS.repeats)
            med = float(np.median(times))
            rec = dict(bench="encoders", encoder=name, pass_=kind, conv_path=FLAGS.conv_path,
                       ms=med * 1e3, gflops=flops / 1e9, gflops_per_s=flops / med / 1e9,
                       times_ms=[t * 1e3 for t in times], batch=FLAGS.batch, size=FLAGS.size,
                       frames=FLAGS.frames, backend=jax.default_backend())
            _emit(rec)
            if not FLAGS.json:
                print(f"{name:12s} {kind:17s} {med * 1e3:9.1f} ms  {flops / med / 1e9:6.1f} GFLOP/s")


def _print_encoder_table(rows):
    print(f"\nencoders: batch {FLAGS.batch} x T={FLAGS.frames} frames of {FLAGS.size}px, "
          f"median of {FLAGS.repeats}, backend {rows[0]['backend'] if rows else '?'}")
    print(f"{'encoder':12s} {'pass':17s} {'GFLOP':>7s} | {'xla ms':>9s} {'GFLOP/s':>8s} | "
          f"{'fast ms':>9s} {'GFLOP/s':>8s} | speed-up")
    by = {(r["encoder"], r["pass_"], r["conv_path"]): r for r in rows}
    for name in FLAGS.encoders:
        for kind in ("forward", "forward+backward"):
            a, b = by.get((name, kind, "xla")), by.get((name, kind, "fast"))
            if not (a and b):
                continue
            print(f"{name:12s} {kind:17s} {b['gflops']:7.1f} | {a['ms']:9.1f} {a['gflops_per_s']:8.1f} | "
                  f"{b['ms']:9.1f} {b['gflops_per_s']:8.1f} | {a['ms'] / b['ms']:6.2f}x")


def main(argv):
    names = argv[1:]
    if len(names) != 1 or names[0] not in BENCHMARKS:
        raise app.UsageError(f"usage: python -m experiments.bench <benchmark> [--flags]; "
                             f"benchmarks: {', '.join(sorted(BENCHMARKS))}")
    BENCHMARKS[names[0]]()


if __name__ == "__main__":
    app.run(main)
