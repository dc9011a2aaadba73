"""Benchmarks: `python -m experiments.bench <name> [--flags]`.

  encoders    Flare and frame-stack encoders, forward and forward+backward, both CPU conv paths.
  seeds       full-state SAC updates (256x256, batch 256, replay sampling included) for S = 1, 4,
              8, 16 seeds vmapped into one compiled update: seed-updates/s and cost vs 1 seed.
  rainbow     Rainbow update (Flare and baseline torsos, batch 32), PER sample + priority update
              at 1M capacity, and end-to-end training frames/s on Pong in the steady state (the
              loop steps after the run's last compile) with the time shares of env stepping,
              acting, replay and updates.
  peak        this machine's float32 matmul throughput (the best of a few large square matmuls): the
              compute ceiling that `seeds` and `rainbow` hold their targets against.
  checkpoint  whole-state checkpoints of the two large replays (100k pixel SAC transitions, 3 GB;
              1M Atari Rainbow frames with PER, 7 GB): size on disk, save and restore seconds, and
              the extra host memory (anonymous RSS) a save and a restore take.
  scaling     the device mesh (--mesh seed:S,data:D): update time and end-to-end env steps/s of
              state SAC, pixel SAC and Rainbow (Pong) on seed:1..N (N seeds) and data:1..N (one
              seed, the batch and the envs split), each mesh in its own process with N devices
              (JAX_NUM_CPU_DEVICES=N on CPU), as ratios to this run's compute floor.
  sac_update  one pixel SAC update (replay sampling + augmentation + update) at the reference
              settings (--encoder=flare|frame_stack|both) for each of --dtypes, with its FLOPs (XLA
              count), GFLOP/s and share of this run's matmul peak, and full-state SAC updates per
              second (256x256 and 1024x1024 MLPs), fused (lax.scan) and unfused.
  profile     where the updates' time goes per class of XLA operation (convolution, dot,
              elementwise, reduction, layout, ...; experiments.op_profile), with the bytes each
              class moves: the Rainbow update, the run loop's Rainbow step, pixel SAC updates.
  sac_stages  where a pixel SAC update's time goes: sampling + translate, the trunk's convs
              forward and forward+backward, the head, the Q MLPs, the losses, Adam, each with its
              FLOPs, GFLOP/s and share of this run's peak.

Every benchmark prints the machine it ran on (CPU model and extensions, conv path) and only what
it measured in that run; figures measured elsewhere (the authors' code, GPUs) are in the README.

Timings are medians of --repeats runs after a warm-up (compile) run. Variants that need different
XLA settings (the conv paths) run in subprocesses of this module, one after the other, and the
parent prints them side by side with their ratio.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from flare_jax.cpu import xla_cpu

import jax
import jax.numpy as jnp
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "timed runs per measurement (median reported)")
flags.DEFINE_integer("batch", 128, "batch size (samples; each holds --frames frames)")
flags.DEFINE_integer("size", 108, "frame height and width in pixels")
flags.DEFINE_integer("frames", 3, "frames per stack (T)")
flags.DEFINE_list("encoders", ["flare", "frame_stack"], "encoders to benchmark")
flags.DEFINE_enum("conv_path", "all", ["all", "stock", "xla", "eigen", "fast"],
                  "CPU conv path: stock (plain jax as installed: XLA's defaults, glibc malloc), "
                  "xla (XLA's defaults: YNNPACK convs, full batch, tcmalloc), eigen (XLA "
                  "convs routed to Eigen, full batch), fast (Eigen + cache-sized batch chunks with "
                  "the custom VJP: flare_jax's default on CPU), all (one subprocess each)")
flags.DEFINE_enum("encoder", "both", ["flare", "frame_stack", "stack", "both", "none"],
                  "sac_update: flare, frame_stack (alias stack), both, or none (only the full-state "
                  "updates)")
flags.DEFINE_integer("fused", 50, "sac_update: updates per compiled call in the fused mode")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "sac_update, rainbow: compute dtypes "
                  "(--compute_dtype of the agents) to measure")
flags.DEFINE_bool("json", False, "print one JSON line per measurement (used by subprocesses)")

BENCHMARKS = {}
_SETUP = {}      # what setup_process() put in effect for this process (the entry point fills it)


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


PEAK_SIZES = (1024, 2048, 3072)


def matmul_peak_gflops(sizes=PEAK_SIZES, repeats: int = 5) -> tuple[float, int]:
    """(GFLOP/s, n) of the fastest float32 n x n matmul among `sizes` (median of `repeats` calls
    each, after a warm-up): the practical compute ceiling of the default backend."""
    mm = jax.jit(lambda x, y: x @ y)
    best = (0.0, 0)
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(n), (n, n), jnp.float32)
        med = float(np.median(time_fn(mm, a, a, repeats=repeats)))
        best = max(best, (2 * n ** 3 / med / 1e9, n))
    return best


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
def peak():
    """The float32 matmul ceiling of this machine (see matmul_peak_gflops)."""
    gflops, n = matmul_peak_gflops(repeats=FLAGS.repeats)
    _emit(dict(bench="peak", gflops=gflops, n=n))
    print(f"peak: backend {jax.default_backend()}, float32 matmul {gflops:.0f} GFLOP/s "
          f"(best of n x n, n = {'/'.join(map(str, PEAK_SIZES))}: n = {n}; median of {FLAGS.repeats})")


@benchmark
def encoders():
    """Encoder forward and forward+backward (grads of all parameters) at batch x T frames."""
    if FLAGS.conv_path == "all":
        rows = []
        for path in CONV_PATHS:
            print(f"[bench] running the {path!r} conv path in a subprocess ...", flush=True)
            env = {"FLARE_JAX_CONV_BACKEND": "ynnpack" if path in ("stock", "xla") else "eigen"}
            if path == "stock":  # what plain jax gets: no tcmalloc either (flare_jax/runtime.py)
                env.update(FLARE_JAX_TCMALLOC="0", LD_PRELOAD="")
            rows += _rerun_self("encoders", env, [f"--conv_path={path}"])
        _print_encoder_table(rows)
        return
    from flare_jax.encoders import make_encoder  # pylint: disable=g-import-not-at-top
    expect_eigen = FLAGS.conv_path not in ("stock", "xla")
    if jax.default_backend() == "cpu" and xla_cpu.conv_uses_ynnpack() == expect_eigen:
        raise RuntimeError(f"conv path {FLAGS.conv_path!r} requested but XLA_FLAGS disagree")
    conv_impl = "chunked" if FLAGS.conv_path == "fast" else "plain"
    key = jax.random.PRNGKey(0)
    shape = (FLAGS.batch, FLAGS.frames, FLAGS.size, FLAGS.size, 3)
    x = jax.random.randint(key, shape, 0, 256, jnp.int32).astype(jnp.uint8)
    for name in FLAGS.encoders:
        enc = make_encoder(name, num_frames=FLAGS.frames, conv_impl=conv_impl)
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


CONV_PATHS = ("stock", "xla", "eigen", "fast")


def _print_encoder_table(rows):
    print(f"\nencoders: batch {FLAGS.batch} x T={FLAGS.frames} frames of {FLAGS.size}px, "
          f"median of {FLAGS.repeats}, backend {rows[0]['backend'] if rows else '?'}; GFLOP by "
          f"XLA's cost analysis of the plain path; speed-ups = stock ms / fast ms and xla ms / fast "
          f"ms (stock = plain jax: XLA defaults without tcmalloc; xla = XLA defaults + tcmalloc)")
    print(f"{'encoder':12s} {'pass':17s} {'GFLOP':>6s} |" +
          "".join(f" {p + ' ms':>9s} {'GFLOP/s':>7s} |" for p in CONV_PATHS) + " vs stock  vs xla")
    by = {(r["encoder"], r["pass_"], r["conv_path"]): r for r in rows}
    for name in FLAGS.encoders:
        for kind in ("forward", "forward+backward"):
            rs = [by.get((name, kind, p)) for p in CONV_PATHS]
            if not all(rs):
                continue
            flops = rs[1]["gflops"]
            cells = "".join(f" {r['ms']:9.1f} {flops / r['ms'] * 1e3:7.1f} |" for r in rs)
            fast = rs[-1]["ms"]
            print(f"{name:12s} {kind:17s} {flops:6.1f} |{cells} {rs[0]['ms'] / fast:7.2f}x "
                  f"{rs[1]['ms'] / fast:6.2f}x")


def _filled_replay(config, key, episode_len=125):
    """A full replay state of random frames with an episode start every `episode_len` slots."""
    from flare_jax.data import replay as rp  # pylint: disable=g-import-not-at-top
    e, s = config.num_envs, config.slots
    k1, k2, k3 = jax.random.split(key, 3)
    if jnp.issubdtype(config.frame_dtype, jnp.integer):
        frames = jax.random.randint(k1, (e, s) + config.frame_shape, 0, 256).astype(config.frame_dtype)
    else:
        frames = jax.random.normal(k1, (e, s) + config.frame_shape, config.frame_dtype)
    return rp.ReplayState(
        frames=frames,
        actions=jax.random.uniform(k2, (e, s) + config.action_shape, minval=-1, maxval=1),
        rewards=jax.random.uniform(k3, (e, s)), discounts=jnp.ones((e, s)),
        first=(jnp.arange(s) % episode_len == 0)[None].repeat(e, 0),
        cursor=jnp.zeros((), jnp.int32), count=jnp.array(s, jnp.int32))


def _sac_update_fn(replay_config, batch_size, n_fused, donate: bool = True):
    """jit(n x (sample + update)) with the agent state donated: the run loop's `learn`."""
    from agents import sac_train  # pylint: disable=g-import-not-at-top

    def fn(agent, replay_state, key):
        agent, _, metrics = sac_train.learn(replay_config, batch_size, agent, replay_state, key,
                                            n_fused, agent.updates)
        return agent, metrics

    return jax.jit(fn, donate_argnums=0 if donate else ())


def cpu_features() -> str:
    """The CPU model and its vector/matrix extensions that decide the fast paths (Linux)."""
    model, ext = xla_cpu.cpu_info()
    return f"{model} ({', '.join(ext) or 'no AVX2'}; {os.cpu_count()} threads)"


def machine_line(peak_gflops: float) -> str:
    """One line naming what ran: backend, CPU, conv path and the same run's matmul peak."""
    where = jax.default_backend()
    if where == "cpu":
        ran = "YNNPACK" if xla_cpu.conv_uses_ynnpack() else "Eigen"
        chosen = _SETUP.get("cpu_conv")
        why = chosen.describe() if chosen is not None else f"{ran} convs"
        if chosen is not None and not why.lower().startswith(ran.lower()):
            why = f"{ran} convs (XLA_FLAGS), chosen: {why}"
        where += f", {cpu_features()}, conv path: {why}, cache-chunked custom VJP"
    return f"machine: {where}; float32 matmul peak of this run {peak_gflops:.0f} GFLOP/s"


def _plain_flops(fn_of_agent, make_agent, *args) -> float:
    """XLA's FLOP count of fn_of_agent(agent, *args) with the agent's convs on the plain
    lowering (the chunked path's custom VJP is the same arithmetic; its count is per chunk)."""
    return xla_flops(fn_of_agent, jax.eval_shape(make_agent), *args)


def _pixel_sac_case(key, encoder: str, dtype: str, action_dim: int, donate: bool = True):
    """A pixel SAC update at the reference settings (--batch, --size, --frames; 100 px stored,
    a full 10k replay of random frames): (config, agent, replay, jitted sample + update
    (`_sac_update_fn`), its GFLOP by XLA's count on the plain conv lowering)."""
    from agents import sac  # pylint: disable=g-import-not-at-top
    from flare_jax.data import replay as rp  # pylint: disable=g-import-not-at-top
    cfg = sac.SACConfig(encoder=encoder, num_frames=FLAGS.frames, image_size=FLAGS.size,
                        compute_dtype=dtype)
    rcfg = rp.ReplayConfig(capacity=10_000, frame_shape=(100, 100, 3), action_shape=(action_dim,),
                           stack=FLAGS.frames)
    replay_state = _filled_replay(rcfg, key)
    obs_spec = jax.ShapeDtypeStruct((FLAGS.frames, 100, 100, 3), jnp.uint8)
    act_spec = jax.ShapeDtypeStruct((action_dim,), jnp.float32)
    fn = _sac_update_fn(rcfg, FLAGS.batch, 1, donate=donate)
    plain = dataclasses.replace(cfg, encoder_kwargs=(("conv_impl", "plain"),))
    gflop = _plain_flops(fn, lambda: sac.init(key, obs_spec, act_spec, plain), replay_state,
                         key) / 1e9
    return cfg, sac.init(key, obs_spec, act_spec, cfg), replay_state, fn, gflop


@benchmark
def sac_update():
    """Seconds per SAC update, sampling + augmentation + update, at the reference settings, with
    its FLOP count (XLA cost analysis), GFLOP/s and share of this run's matmul peak."""
    key = jax.random.PRNGKey(0)
    action_dim = 6
    encoders = {"both": ["flare", "frame_stack"], "none": [], "stack": ["frame_stack"]}.get(
        FLAGS.encoder, [FLAGS.encoder])
    peak_gflops, _ = matmul_peak_gflops(repeats=FLAGS.repeats)
    _emit(dict(bench="peak", gflops=peak_gflops))
    print(f"sac_update: batch {FLAGS.batch}, {FLAGS.size}px (stored 100px, translate), "
          f"T={FLAGS.frames}, hidden 1024, feature 64, {action_dim}-dim actions, replay of 10k "
          f"transitions; median of {FLAGS.repeats}\n  {machine_line(peak_gflops)}")
    for name, dtype in ((n, d) for n in encoders for d in FLAGS.dtypes):
        cfg, agent, replay_state, fn, gflop = _pixel_sac_case(key, name, dtype, action_dim)
        for i in range(4):                                # compile + warm the allocator
            agent, _ = fn(agent, replay_state, jax.random.fold_in(key, 100 + i))
        jax.block_until_ready(agent)
        times = {True: [], False: []}       # with the actor step (every 2nd update) / without
        for i in range(2 * FLAGS.repeats):
            with_actor = int(agent.updates) % cfg.actor_update_period == 0
            t = time.perf_counter()
            agent, m = fn(agent, replay_state, jax.random.fold_in(key, i))
            jax.block_until_ready(agent)
            times[with_actor].append(time.perf_counter() - t)
        t_actor, t_critic = (float(np.median(times[k])) for k in (True, False))
        med = (t_actor + t_critic) / 2
        rate = gflop / t_actor
        rec = dict(bench="sac_update", encoder=name, dtype=dtype, s_per_update=med, s_with_actor=t_actor,
                   s_critic_only=t_critic, gflop=gflop, gflops_per_s=rate,
                   share_of_peak=rate / peak_gflops, backend=jax.default_backend())
        _emit(rec)
        print(f"  {name:12s} {dtype:8s} {med * 1e3:8.1f} ms/update (mean of the pair: with the actor step "
              f"{t_actor * 1e3:.0f} ms, critic only {t_critic * 1e3:.0f} ms); the update with the "
              f"actor step: {gflop:6.1f} GFLOP = {rate:5.0f} GFLOP/s = {100 * rate / peak_gflops:3.0f}% "
              f"of this run's peak", flush=True)
    _state_sac_updates(key)


@benchmark
def sac_stages():
    """Where a pixel SAC update's time goes: its stages as separate jitted calls, each with XLA's
    FLOP count, GFLOP/s and share of this run's matmul peak (the update fuses them; the stages'
    sum is close to, not equal to, the update's time)."""
    from agents import sac  # pylint: disable=g-import-not-at-top
    from flare_jax.data import replay as rp  # pylint: disable=g-import-not-at-top
    key = jax.random.PRNGKey(0)
    action_dim, b = 6, FLAGS.batch
    peak_gflops, _ = matmul_peak_gflops(repeats=FLAGS.repeats)
    print(f"sac_stages: batch {b}, {FLAGS.size}px, T={FLAGS.frames}, hidden 1024; median of "
          f"{FLAGS.repeats}\n  {machine_line(peak_gflops)}")
    obs_spec = jax.ShapeDtypeStruct((FLAGS.frames, 100, 100, 3), jnp.uint8)
    act_spec = jax.ShapeDtypeStruct((action_dim,), jnp.float32)
    encoders = {"both": ["flare", "frame_stack"], "none": [], "stack": ["frame_stack"]}.get(
        FLAGS.encoder, [FLAGS.encoder])
    for name in encoders:
        cfg = sac.SACConfig(encoder=name, num_frames=FLAGS.frames, image_size=FLAGS.size)
        rcfg = rp.ReplayConfig(capacity=10_000, frame_shape=(100, 100, 3), action_shape=(action_dim,),
                               stack=FLAGS.frames)
        replay_state = _filled_replay(rcfg, key)
        agent = sac.init(key, obs_spec, act_spec, cfg)
        enc = cfg.make_encoder()
        batch = jax.jit(lambda r, k: rp.sample(rcfg, r, k, b))(replay_state, key)
        obs, next_obs = sac.augment_batch(cfg, key, batch, enc)
        trunk = agent.critic.params["trunk"]
        h = enc.apply({"params": trunk}, obs, method="trunk")
        cot = jax.random.normal(key, h.shape)
        head = agent.critic.params["head"]
        feat = enc.apply({"params": head}, h, method="head")
        # every array is an argument (none is captured as a compile-time constant XLA could fold)
        stages = {
            "sample + translate": (jax.jit(lambda r, k: sac.augment_batch(
                cfg, k, rp.sample(rcfg, r, k, b), enc)), (replay_state, key)),
            "trunk forward (convs, T frames)": (jax.jit(
                lambda p, x: enc.apply({"params": p}, x, method="trunk")), (trunk, obs)),
            "trunk forward+backward": (jax.jit(jax.grad(lambda p, x, c: jnp.vdot(
                enc.apply({"params": p}, x, method="trunk"), c))), (trunk, obs, cot)),
            "head Dense+LayerNorm fwd+bwd": (jax.jit(jax.grad(lambda p, hh: jnp.sum(
                enc.apply({"params": p}, hh, method="head") ** 2), argnums=(0, 1))), (head, h)),
            "critic loss fwd+bwd (all)": (jax.jit(jax.grad(lambda p, ag, o, no, bt, k: sac.critic_loss(
                p, ag, o, no, bt, k)[0])), (agent.critic.params, agent, obs, next_obs, batch, key)),
            "actor loss fwd+bwd": (jax.jit(jax.grad(lambda p, cp, ag, o, k: sac.actor_loss(
                p, cp, ag, o, k)[0])), (agent.actor.params, agent.critic.params, agent, obs, key)),
            "Adam step of the critic": (jax.jit(lambda st, g: st.apply_gradients(grads=g)),
                                        (agent.critic, jax.tree.map(jnp.ones_like, agent.critic.params))),
            "Q MLPs fwd+bwd": (jax.jit(jax.grad(lambda p, f, a: jnp.sum(sac.TwinQ(1024).apply(
                {"params": p}, f, a)))), (agent.critic.params["q"], feat, batch.action)),
        }
        print(f"  {name}:")
        for label, (fn, args) in stages.items():
            t = float(np.median(time_fn(fn, *args, repeats=FLAGS.repeats)))
            try:
                gflop = xla_flops(fn, *args) / 1e9
            except Exception:  # pylint: disable=broad-except
                gflop = float("nan")
            _emit(dict(bench="sac_stages", encoder=name, stage=label, s=t, gflop=gflop))
            print(f"    {label:34s} {t * 1e3:8.1f} ms  {gflop:7.2f} GFLOP  {gflop / t:6.0f} GFLOP/s "
                  f"= {100 * gflop / t / peak_gflops:3.0f}% of peak", flush=True)


def _state_sac_updates(key):
    from agents import sac  # pylint: disable=g-import-not-at-top
    from flare_jax.data import replay as rp  # pylint: disable=g-import-not-at-top
    obs_dim, action_dim, batch = 24, 6, 256
    print(f"full-state SAC updates/s (obs {obs_dim}, {action_dim}-dim actions, batch {batch}, "
          f"replay sampling included; fused = {FLAGS.fused} updates per compiled call)")
    for hidden in (256, 1024):
        cfg = sac.SACConfig(encoder="state_full", hidden_dim=hidden, augmentation="none")
        rcfg = rp.ReplayConfig(capacity=100_000, frame_shape=(obs_dim,), action_shape=(action_dim,),
                               stack=1, frame_dtype=jnp.float32)
        replay_state = _filled_replay(rcfg, key, episode_len=1000)
        row = {}
        for n in (1, FLAGS.fused):
            agent = sac.init(key, jax.ShapeDtypeStruct((1, obs_dim), jnp.float32),
                             jax.ShapeDtypeStruct((action_dim,), jnp.float32), cfg)
            fn = _sac_update_fn(rcfg, batch, n)
            agent, _ = fn(agent, replay_state, key)
            calls = max(3, 400 // n)
            times = []
            for r in range(FLAGS.repeats):
                t = time.perf_counter()
                for i in range(calls):
                    agent, _ = fn(agent, replay_state, jax.random.fold_in(key, i))
                jax.block_until_ready(agent)
                times.append((time.perf_counter() - t) / (calls * n))
            row[n] = float(np.median(times))
            _emit(dict(bench="state_sac_update", hidden=hidden, fused=n, s_per_update=row[n]))
        print(f"  hidden {hidden:4d}x{hidden:<4d}: unfused {1 / row[1]:7.0f} updates/s "
              f"({row[1] * 1e3:.2f} ms), fused x{FLAGS.fused} {1 / row[FLAGS.fused]:7.0f} updates/s "
              f"({row[FLAGS.fused] * 1e3:.2f} ms)", flush=True)


flags.DEFINE_list("num_seeds", ["1", "4", "8", "16"], "seeds: the S values")
flags.DEFINE_integer("hidden", 256, "seeds: MLP width")


@benchmark
def seeds():
    """Vmapped multi-seed full-state SAC updates (the training loop's per-step device work)."""
    from agents import sac  # pylint: disable=g-import-not-at-top
    from flare_jax.data import replay as rp  # pylint: disable=g-import-not-at-top
    obs_dim, action_dim, batch = 24, 6, 256
    cfg = sac.SACConfig(encoder="state_full", hidden_dim=FLAGS.hidden, augmentation="none")
    rcfg = rp.ReplayConfig(capacity=100_000, frame_shape=(obs_dim,), action_shape=(action_dim,),
                           stack=1, frame_dtype=jnp.float32)

    from agents import sac_train  # pylint: disable=g-import-not-at-top

    def one(agent, replay_state, key, count):     # the run loop's learn, for one update
        return sac_train.learn(rcfg, batch, agent, replay_state, key, 1, count)[0]

    fn = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)), donate_argnums=0)
    print(f"seeds: full-state SAC update (obs {obs_dim}, {action_dim}-dim actions, {FLAGS.hidden}x"
          f"{FLAGS.hidden}, batch {batch}, replay of 100k sampled inside), S seeds vmapped in one "
          f"call; median of {FLAGS.repeats} x 100 calls (pairs with and without the actor step)")
    base, rows = None, []
    for s in (int(v) for v in FLAGS.num_seeds):
        keys = jax.random.split(jax.random.PRNGKey(0), s)
        agent = sac.init_seeds(keys, jax.ShapeDtypeStruct((1, obs_dim), jnp.float32),
                               jax.ShapeDtypeStruct((action_dim,), jnp.float32), cfg)
        replay_state = jax.vmap(lambda k: _filled_replay(rcfg, k, episode_len=1000))(keys)
        for i in range(4):
            agent = fn(agent, replay_state, keys, jnp.int32(i))
        jax.block_until_ready(agent)
        times = []
        for r in range(FLAGS.repeats):
            t = time.perf_counter()
            for i in range(100):
                agent = fn(agent, replay_state, jax.random.split(jax.random.PRNGKey(i), s), jnp.int32(i))
            jax.block_until_ready(agent)
            times.append((time.perf_counter() - t) / 100)
        med = float(np.median(times))
        base = base or med
        # work of one call by XLA's cost analysis; it includes the every-2 actor step's branch
        gflop = xla_flops(fn, agent, replay_state, keys, jnp.int32(0)) / 1e9
        _emit(dict(bench="seeds", seeds=s, s_per_call=med, seed_updates_per_s=s / med, gflop=gflop))
        print(f"  S={s:3d}: {med * 1e3:7.2f} ms per vmapped update, {s / med:8.0f} seed-updates/s, "
              f"{med / base:5.2f}x the wall time of 1 seed; {gflop:.2f} GFLOP per call = "
              f"{gflop / med:.0f} GFLOP/s", flush=True)
        rows.append((s, gflop, med))
    # the compute floor: no implementation of these updates beats the machine's matmul peak
    peak_gflops, _ = matmul_peak_gflops(repeats=FLAGS.repeats)
    _emit(dict(bench="seeds_floor", peak_gflops=peak_gflops))
    print(f"  floor at this run's float32 matmul peak ({peak_gflops:.0f} GFLOP/s, "
          "`bench peak`): " + ", ".join(
              f"S={s} >= {g / peak_gflops * 1e3:.1f} ms (measured {t / (g / peak_gflops):.2f}x it)"
              for s, g, t in rows), flush=True)


flags.DEFINE_integer("e2e_frames", 40_000, "rainbow: frames of the end-to-end Pong run")
flags.DEFINE_integer("rainbow_envs", 4, "rainbow: parallel envs of the end-to-end run")
flags.DEFINE_integer("per_capacity", 1_000_000, "rainbow: PER capacity (transitions)")


def _median_call_s(fn, *args, calls: int, repeats: int):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / calls)
    return float(np.median(times))


def _rainbow_update_case(key, batch: int, torso: str = "atari_flare", dtype: str = "float32",
                         outputs: str = "all"):
    """A Rainbow update on Pong-shaped random uint8 stacks (6 actions): (state, batch, jitted
    update(state, batch, key), gflop()). outputs "state" keeps only the new state (the timed
    update), "all" also its metrics and priorities (nothing left for XLA to drop). gflop(): XLA's
    FLOP count of that function on the plain conv lowering (cost analysis counts a chunked
    loop's body once)."""
    from agents import rainbow as rb  # pylint: disable=g-import-not-at-top
    from flare_jax.data import replay as rp  # pylint: disable=g-import-not-at-top
    spec = jax.ShapeDtypeStruct((4, 84, 84, 1), jnp.uint8)
    state = rb.init(key, spec, 6, rb.RainbowConfig(torso=torso, compute_dtype=dtype))
    obs = jax.random.randint(key, (batch,) + spec.shape, 0, 256).astype(jnp.uint8)
    b = rp.Batch(obs=obs, action=jnp.zeros(batch, jnp.int32), reward=jnp.ones(batch),
                 discount=jnp.full(batch, 0.97), next_obs=obs[::-1], env=jnp.zeros(batch, jnp.int32),
                 slot=jnp.zeros(batch, jnp.int32))
    keep = (lambda out: out[0]) if outputs == "state" else (lambda out: out)  # noqa: E731
    fn = jax.jit(lambda s, b, k: keep(rb.update(s, b, jnp.ones(batch), k)))

    def gflop():
        plain_cfg = rb.RainbowConfig(torso=torso, torso_kwargs=(("conv_impl", "plain"),),
                                     compute_dtype=dtype)
        plain = jax.eval_shape(lambda k: rb.init(k, spec, 6, plain_cfg), key)
        return xla_flops(fn, plain, b, key) / 1e9
    return state, b, fn, gflop


@benchmark
def rainbow():
    """Rainbow: update, PER at 1M, and the end-to-end loop on Pong."""
    from agents import rainbow as rb  # pylint: disable=g-import-not-at-top
    from agents import rainbow_train  # pylint: disable=g-import-not-at-top
    from flare_jax.data import prioritized as per  # pylint: disable=g-import-not-at-top
    from flare_jax.data import replay as rp  # pylint: disable=g-import-not-at-top
    from flare_jax.data import sum_tree  # pylint: disable=g-import-not-at-top
    key = jax.random.PRNGKey(0)
    batch = 32
    peak_gflops, _ = matmul_peak_gflops(repeats=FLAGS.repeats)
    _emit(dict(bench="peak", gflops=peak_gflops))
    print(f"rainbow: median of {FLAGS.repeats}\n  {machine_line(peak_gflops)}")
    update_ms, flare_gflop = {}, None
    for torso, dtype in ((t, d) for t in ("atari_flare", "atari_baseline") for d in FLAGS.dtypes):
        state, b, fn, plain_gflop = _rainbow_update_case(key, batch, torso, dtype, outputs="state")
        update_ms[torso, dtype] = ms = 1e3 * _median_call_s(fn, state, b, key, calls=20,
                                                             repeats=FLAGS.repeats)
        work = ""
        if jax.default_backend() == "cpu":   # GPU cost analysis leaves out cuDNN's convolutions
            gflop = plain_gflop()
            if torso == "atari_flare" and (dtype == "float32" or flare_gflop is None):
                flare_gflop = gflop
            rate = gflop / ms * 1e3
            work = (f", {gflop:.2f} GFLOP = {rate:.0f} GFLOP/s = {100 * rate / peak_gflops:.0f}% of "
                    f"this run's peak; at 1,000 frames/s (62.5 updates/s) the updates alone need "
                    f"{gflop * 62.5:.0f} GFLOP/s")
        _emit(dict(bench="rainbow_update", torso=torso, dtype=dtype, ms=ms))
        print(f"  update, {torso:15s} {dtype:8s} batch {batch}: {ms:7.1f} ms{work}", flush=True)

    # PER at 1M: sample a batch (sum-tree descent + stack/n-step gather) and write priorities back
    rc = rp.ReplayConfig(capacity=FLAGS.per_capacity, frame_shape=(84, 84, 1), action_shape=(),
                         num_envs=1, stack=4, frame_dtype=jnp.uint8, action_dtype=jnp.int32,
                         pad="zeros", n_step=3)
    pc = per.PrioritizedConfig(replay=rc)
    state = per.init(pc)
    n = rc.slots
    state = state.replace(
        replay=state.replay.replace(count=jnp.array(n, jnp.int32), first=(jnp.arange(n) % 2000 == 0)[None]),
        priorities=sum_tree.set_leaves(state.priorities, jnp.arange(n),
                                       jax.random.uniform(key, (n,)) * (jnp.arange(n) % 2000 != 0)),
        valid=sum_tree.set_leaves(state.valid, jnp.arange(n), (jnp.arange(n) % 2000 != 0).astype(jnp.float32)))
    sample = jax.jit(lambda s, k: per.sample(pc, s, k, batch, 0.5))
    t_sample = _median_call_s(sample, state, key, calls=50, repeats=FLAGS.repeats)
    sampled, _, _ = sample(state, key)
    leaves = sampled.env * rc.slots + sampled.slot
    prio_fn = jax.jit(lambda tree, pr: sum_tree.set_leaves(tree, leaves, pr))
    t_prio = _median_call_s(prio_fn, state.priorities, jnp.ones(batch), calls=50, repeats=FLAGS.repeats)
    print(f"  PER at {FLAGS.per_capacity:,d} transitions (sum tree, depth "
          f"{state.priorities.depth}): sample {batch} + gather stacks {t_sample * 1e3:.2f} ms, "
          f"priority update {t_prio * 1e3:.2f} ms", flush=True)
    _emit(dict(bench="per", capacity=FLAGS.per_capacity, sample_ms=t_sample * 1e3, update_ms=t_prio * 1e3))
    del state, b

    # end to end on Pong with the reference learn period (16 frames per update), the run loop
    from flare_jax import loop  # pylint: disable=g-import-not-at-top
    from flare_jax.loop import RunConfig  # pylint: disable=g-import-not-at-top
    env_cfg = rainbow_train.RainbowTrainConfig(
        game="pong", num_envs=FLAGS.rainbow_envs, frames=FLAGS.e2e_frames,
        eval_every_frames=10**9, eval_frames=4 * FLAGS.rainbow_envs, eval_envs=1,
        replay_capacity=100_000, min_replay=1_000, run=RunConfig(tensorboard=False))
    fps_by_overlap, fps_whole = {}, {}
    for overlap in (False, True):         # RunConfig.overlap: env stepping beside the updates
        cfg = dataclasses.replace(env_cfg, run=RunConfig(tensorboard=False, overlap=overlap))
        res = loop.run(rainbow_train.RainbowTrainer, cfg, log=None)
        frames_done = res.counters.iteration * 4 * FLAGS.rainbow_envs
        # the steady state: the loop steps after the run's last compile (RunResult.steady)
        iterations, seconds = res.steady
        fps_by_overlap[overlap] = iterations * 4 * FLAGS.rainbow_envs / seconds
        fps_whole[overlap] = frames_done / res.seconds
    fps_e2e = fps_by_overlap[False]
    # component costs per iteration of the loop (num_envs agent steps)
    from flare_jax.envs.atari import AtariEnv  # pylint: disable=g-import-not-at-top
    env = AtariEnv("pong", num_envs=FLAGS.rainbow_envs, seed=0)
    env.reset()
    acts = np.zeros(FLAGS.rainbow_envs, np.int32)
    t = time.perf_counter()
    for _ in range(200):
        env.step(acts)
    t_env = (time.perf_counter() - t) / 200
    agent = rb.init(key, jax.ShapeDtypeStruct((4, 84, 84, 1), jnp.uint8), env.num_actions,
                    rb.RainbowConfig())
    stack = jnp.zeros((FLAGS.rainbow_envs, 4, 84, 84, 1), jnp.uint8)
    act = jax.jit(lambda a, st, k: rb.act(a, st, k, 0.0))
    t_act = _median_call_s(act, agent, stack, key, calls=50, repeats=FLAGS.repeats)
    env.close()
    frames_per_iter = 4 * FLAGS.rainbow_envs
    # the end-to-end run is float32 (the default): its update time and FLOPs
    f32 = ("atari_flare", "float32")
    t_update = update_ms.get(f32, next(iter(update_ms.values()))) / 1e3 * frames_per_iter / 16
    t_replay = (t_sample + t_prio) * frames_per_iter / 16
    parts = {"env stepping": t_env, "acting": t_act, "replay (sample+priorities)": t_replay,
             "updates": t_update}
    total = sum(parts.values())
    print(f"  end to end, Pong, Flare torso, {FLAGS.rainbow_envs} envs, 1 update per 16 frames: "
          f"{fps_e2e:,.0f} training frames/s in the steady state (the loop steps after the last "
          f"compile; the whole run of {frames_done:,d} frames and {res.counters.updates:,d} "
          f"updates, compiles included: {fps_whole[False]:,.0f}); with --overlap (envs step "
          f"while the updates run): {fps_by_overlap[True]:,.0f} frames/s "
          f"({fps_by_overlap[True] / fps_e2e:.2f}x; whole run {fps_whole[True]:,.0f})")
    print("  time shares per loop iteration (" + f"{frames_per_iter} frames; components timed "
          "separately): " + ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts.items()))
    print(f"  -> components alone would allow {frames_per_iter / total:,.0f} frames/s")
    if flare_gflop is not None:
        # the compute floor: updates at the machine's matmul peak, everything else as measured
        update_floor = flare_gflop / peak_gflops                         # seconds per update
        bound = frames_per_iter / (total - t_update + update_floor * frames_per_iter / 16)
        print(f"  floor: at this run's float32 matmul peak ({peak_gflops:.0f} GFLOP/s, `bench peak`) "
              f"a Flare update ({flare_gflop:.2f} GFLOP) takes >= {update_floor * 1e3:.1f} ms, "
              f"so this loop stays <= {bound:,.0f} frames/s; end to end ran at "
              f"{100 * fps_e2e / bound:.0f}% of that floor ({100 * fps_by_overlap[True] / bound:.0f}% "
              "with --overlap)")
        _emit(dict(bench="rainbow_floor", peak_gflops=peak_gflops, max_frames_per_s=bound))
    _emit(dict(bench="rainbow_e2e", frames_per_s=fps_e2e, frames_per_s_overlap=fps_by_overlap[True],
               **{k: v for k, v in parts.items()}))


PROFILE_TARGETS = ("rainbow_update", "rainbow_step", "sac_flare", "sac_frame_stack")
flags.DEFINE_list("profile_targets", list(PROFILE_TARGETS),
                  "profile: the programs to profile (rainbow_update: a Rainbow update, Flare torso, "
                  "batch 32; rainbow_step: the run loop's step with one update on Pong shapes; "
                  "sac_flare / sac_frame_stack: a pixel SAC update with its actor step)")


def _rainbow_step_profile(key):
    """The run loop's step program (`loop.Stepper`, one seed, 4 Pong-shaped envs, PER at 100k,
    one update), driven with its donated carry fed back: (profile, ms per step)."""
    from agents import rainbow_train  # pylint: disable=g-import-not-at-top
    from experiments import op_profile  # pylint: disable=g-import-not-at-top
    from flare_jax import loop  # pylint: disable=g-import-not-at-top
    cfg = rainbow_train.RainbowTrainConfig(game="pong", num_envs=4, replay_capacity=100_000)
    spec = loop.EnvSpec(frame_shape=(84, 84), frame_dtype="uint8", action_shape=(),
                        action_dtype="int32", num_actions=6)
    trainer = rainbow_train.RainbowTrainer(cfg, spec)
    stepper = loop.Stepper(trainer, num_seeds=1)
    state = {"carry": loop.init_carry(trainer, loop.seed_keys((0,)), stepper.layout)}
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (4, 84, 84), dtype=np.uint8)
    env = (frame, np.zeros(4, np.float32), np.ones(4, np.float32), np.zeros(4, bool))

    def run(k, n=1, random=False):
        for i in range(k):
            state["carry"], _, _ = stepper.step(state["carry"], *env, n=n, random=random,
                                                update_count=i, progress=0.5)
            stepper.actions(state["carry"])
        jax.block_until_ready(state["carry"])
    run(260, n=0, random=True)     # past the sampler's minimum: the replay holds ~1,000 frames
    run(2)                         # compile the step with an update
    hlo = stepper.lower(state["carry"], *env, n=1, random=False).compile().as_text()
    t = time.perf_counter()
    run(FLAGS.repeats * 4)
    step_ms = (time.perf_counter() - t) / (FLAGS.repeats * 4) * 1e3
    return op_profile.profile(run, hlo, calls=10), step_ms


@benchmark
def profile():
    """Where the time of the updates goes, per class of XLA operation (experiments.op_profile):
    the Rainbow update, the run loop's Rainbow step and the pixel SAC updates, each with its
    FLOPs (XLA count on the plain conv lowering) and share of this run's matmul peak."""
    from experiments import op_profile  # pylint: disable=g-import-not-at-top
    unknown = sorted(set(FLAGS.profile_targets) - set(PROFILE_TARGETS))
    if unknown:
        raise app.UsageError(f"--profile_targets: unknown {', '.join(unknown)}; valid: "
                             f"{', '.join(PROFILE_TARGETS)}")
    if jax.default_backend() != "cpu":
        raise app.UsageError("profile reads XLA CPU traces: run it with JAX_PLATFORMS=cpu")
    key = jax.random.PRNGKey(0)
    peak_gflops, _ = matmul_peak_gflops(repeats=FLAGS.repeats)
    print(f"profile: per call of each program, the time of its HLO instructions by class "
          f"(10 traced calls)\n  {machine_line(peak_gflops)}")
    for target in FLAGS.profile_targets:
        if target.startswith("rainbow"):
            state, b, fn, plain_gflop = _rainbow_update_case(key, 32)
            gflop = plain_gflop()          # the step's FLOPs are its update's (acting: < 1%)
            if target == "rainbow_update":
                prof = op_profile.profile_jitted(fn, state, b, key)
                label = "Rainbow update, Flare torso, batch 32"
            else:
                prof, step_ms = _rainbow_step_profile(key)
                label = (f"the run loop's Rainbow step with one update (Pong shapes, 4 envs, PER "
                         f"at 100k; {step_ms:.1f} ms per step untraced, actions read back)")
        else:
            name = target[len("sac_"):]
            _, agent, replay_state, fn, gflop = _pixel_sac_case(key, name, "float32", 6,
                                                                donate=False)
            prof = op_profile.profile_jitted(fn, agent, replay_state, key, calls=3)
            label = (f"pixel SAC update with the actor step, {name}, batch {FLAGS.batch}, "
                     f"{FLAGS.size}px, T={FLAGS.frames}")
        rate = gflop / prof.wall_ms * 1e3
        _emit(dict(bench="profile", target=target, wall_ms=prof.wall_ms, gflop=gflop,
                   classes=prof.classes, moved_mb=prof.moved_mb))
        print(f"\n  {target}: {label}\n  traced: {prof.wall_ms:.1f} ms per call, {gflop:.2f} GFLOP = "
              f"{rate:.0f} GFLOP/s = {100 * rate / peak_gflops:.0f}% of this run's peak")
        print("    " + prof.table().replace("\n", "\n    "), flush=True)


flags.DEFINE_integer("devices", 4, "scaling: N, the devices of each mesh's process (CPU: virtual)")
flags.DEFINE_list("scaling_cases", ["state_sac", "pixel_sac", "rainbow"], "scaling: agents")
flags.DEFINE_string("scaling_case", None, "scaling: (internal) one case in this process")
flags.DEFINE_string("mesh", "", "scaling: (internal) the mesh of --scaling_case")
flags.DEFINE_integer("scaling_seeds", 1, "scaling: (internal) the seeds of --scaling_case")
flags.DEFINE_list("scaling_meshes", [], "scaling: only these meshes (e.g. seed:4,data:1; default: "
                  "seed:k and data:k for every k dividing --devices)")
flags.DEFINE_integer("scaling_steps", 40, "scaling: loop steps of the timed end-to-end run")


def _scaling_config(case: str, seeds: tuple, mesh: str, steps: int):
    """The run of one scaling case: 4 envs per seed, learning from the first loop steps, no
    evaluation, `steps` loop steps."""
    from agents import rainbow_train, sac, sac_train  # pylint: disable=g-import-not-at-top
    from flare_jax.loop import RunConfig  # pylint: disable=g-import-not-at-top
    run = RunConfig(seeds=seeds, mesh=mesh, tensorboard=False, stall_seconds=0)
    if case == "rainbow":   # Pong, the Flare torso, batch 32, 4 envs: 1 update per loop step
        return rainbow_train.RainbowTrainConfig(
            game="pong", num_envs=4, frames=16 * steps, eval_every_frames=10**9, eval_frames=16,
            eval_envs=1, replay_capacity=20_000, min_replay=32, run=run)
    pixels = case == "pixel_sac"
    return sac_train.TrainConfig(
        task="cartpole_swingup", pixels=pixels, num_envs=4, env_steps=8 * 4 * steps,
        batch_size=128 if pixels else 256, replay_capacity=4_000 if pixels else 20_000,
        init_steps=8, eval_every=10**9, eval_episodes=1, updates_per_step=1,
        sac=sac.SACConfig(encoder="flare" if pixels else "state_full", hidden_dim=1024 if pixels else 256,
                          augmentation="translate" if pixels else "none"), run=run)


def _scaling_case():
    """One mesh of one case (this process): the loop end to end, then the device step alone."""
    from agents import rainbow_train, sac_train  # pylint: disable=g-import-not-at-top
    from flare_jax import config_flags, loop  # pylint: disable=g-import-not-at-top
    from flare_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    case, mesh = FLAGS.scaling_case, FLAGS.mesh
    jax.config.update("jax_enable_compilation_cache", False)     # see below
    shape = mesh_lib.parse_spec(mesh)
    seeds = tuple(range(FLAGS.scaling_seeds))
    cls = rainbow_train.RainbowTrainer if case == "rainbow" else sac_train.SACTrainer
    cfg = _scaling_config(case, seeds, mesh, FLAGS.scaling_steps)
    res = loop.run(cls, cfg, log=None)
    iterations, seconds = res.steady               # the loop steps after its last compile
    per_it = 16 if case == "rainbow" else 32       # frames or env steps per loop step and seed
    e2e = iterations * per_it * len(seeds) / seconds   # per second, all seeds
    # the device step alone: n updates per call on the run's final carry (replay filled)
    lay = mesh_lib.Layout(mesh_lib.make(shape), len(seeds), 4)
    env = cls.make_env(cfg, "train", members=lay.train_members())
    trainer = cls(cfg, loop.EnvSpec.of(env), data_shards=shape.data)
    ts = env.reset()
    env.close()
    stepper = loop.Stepper(trainer, lay)
    n = 4
    args = (ts.frame, ts.reward, ts.discount, ts.first)
    carry = res.carry
    carry, _, _ = stepper.step(carry, *args, n=n, random=False, update_count=0, progress=0.5)
    jax.block_until_ready(carry)
    times = []
    for r in range(FLAGS.repeats):
        t = time.perf_counter()
        for i in range(3):
            carry, _, flags_ = stepper.step(carry, *args, n=n, random=False, update_count=i, progress=0.5)
        jax.block_until_ready(flags_)
        times.append((time.perf_counter() - t) / 3)
    step_s = float(np.median(times))
    # the work of that step, counted on the plain XLA conv lowering (cost analysis counts a
    # chunked conv loop's body once), over all devices
    plain = cfg
    if case == "pixel_sac":
        plain = config_flags.replace(cfg, encoder_kwargs=(("conv_impl", "plain"),))
    elif case == "rainbow":
        plain = config_flags.replace(cfg, torso_kwargs=(("conv_impl", "plain"),))
    p_trainer = cls(plain, trainer.spec, data_shards=shape.data)
    p_step = loop.Stepper(p_trainer, lay)._compile(n, False)
    p_carry = loop.init_carry(p_trainer, loop.seed_keys(seeds), lay)
    stop = lay.put_per_device(np.zeros(len(lay.blocks), np.int32))
    lowered = p_step.lower(p_carry, *(lay.put_envs(a) for a in args), stop, np.int32(0), np.float32(0.5))
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflop = float(cost.get("flops", float("nan"))) * shape.size / 1e9
    peak_gflops, _ = matmul_peak_gflops(repeats=FLAGS.repeats)
    _emit(dict(bench="scaling", case=case, mesh=str(shape), seeds=len(seeds), e2e=e2e,
               step_s=step_s, updates=n, gflop=gflop, peak_gflops=peak_gflops,
               floor_s=gflop / peak_gflops, unit="frames" if case == "rainbow" else "env steps"))


@benchmark
def scaling():
    """Update time and end-to-end throughput against the mesh, each mesh in its own process."""
    if FLAGS.scaling_case:
        return _scaling_case()
    n = FLAGS.devices
    sizes = [k for k in range(1, n + 1) if n % k == 0]
    meshes = [(f"seed:{k}", n) for k in sizes] + [(f"data:{k}", 1) for k in sizes]   # (mesh, seeds)
    if FLAGS.scaling_meshes:
        meshes = [m for m in meshes if m[0] in FLAGS.scaling_meshes]
    platform = jax.default_backend()
    virtual = " (virtual, sharing this CPU)" if platform == "cpu" else ""
    print(f"scaling: {n} {platform} devices per process{virtual}; seed:k runs {n} seeds on k "
          f"devices, data:k one seed on k devices (its 4 envs, its replay and each batch split); "
          f"end to end = the steps of a {FLAGS.scaling_steps}-step run after its last compile; "
          f"step = one device step with 4 updates per seed "
          f"(median of {FLAGS.repeats} x 3); floor = that step's FLOPs (XLA cost analysis, all "
          "devices) at this process's float32 matmul peak (`bench peak`)")
    env_update = {}
    if platform == "cpu":
        env_update["JAX_NUM_CPU_DEVICES"] = str(n)
    for case in FLAGS.scaling_cases:
        for mesh, num_seeds in meshes:
            recs = _rerun_self("scaling", env_update, (
                f"--scaling_case={case}", f"--mesh={mesh}", f"--scaling_seeds={num_seeds}",
                f"--devices={n}", f"--scaling_steps={FLAGS.scaling_steps}"))
            r = [x for x in recs if x.get("bench") == "scaling"][0]
            _emit(r)
            print(f"  {case:9s} {r['mesh']:14s} {r['seeds']} seed(s): end to end {r['e2e']:7.0f} "
                  f"{r['unit']}/s; step {r['step_s'] * 1e3:7.1f} ms = {r['step_s'] / r['floor_s']:5.2f}x "
                  f"its floor ({r['gflop']:.2f} GFLOP at {r['peak_gflops']:.0f} GFLOP/s)", flush=True)


flags.DEFINE_list("checkpoint_cases", ["sac_pixels_100k", "rainbow_atari_1m"],
                  "checkpoint: which replays (sac_pixels_100k, rainbow_atari_1m)")
flags.DEFINE_string("checkpoint_dir", None, "checkpoint: where to write (default: a temporary "
                    "directory next to runs/)")


def _anon_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _PeakMemory:
    """The peak anonymous RSS (host RAM of this process, page cache excluded) while in the block."""

    def __enter__(self):
        import threading  # pylint: disable=g-import-not-at-top
        self.base = self.peak = _anon_rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _anon_rss())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _checkpoint_case(name):
    """(trainer class, config, env spec) of a benchmark replay, one seed."""
    from agents import rainbow_train, sac_train  # pylint: disable=g-import-not-at-top
    from flare_jax.loop import EnvSpec  # pylint: disable=g-import-not-at-top
    if name == "sac_pixels_100k":
        return (sac_train.SACTrainer, sac_train.TrainConfig(task="walker_run", replay_capacity=100_000),
                EnvSpec((108, 108, 3), "uint8", (6,), "float32"))
    if name == "rainbow_atari_1m":
        return (rainbow_train.RainbowTrainer, rainbow_train.RainbowTrainConfig(game="pong"),
                EnvSpec((84, 84), "uint8", (), "int32", 6))
    raise app.UsageError(f"unknown checkpoint case {name!r}; valid: sac_pixels_100k, rainbow_atari_1m")


@benchmark
def checkpoint():
    """Save and restore the whole state of a run with a full replay (frames not all zero); each
    case in a process of its own, so that one case's freed memory does not count in the next."""
    if not FLAGS.json:
        from flare_jax.checkpoint import CHUNK_BYTES  # pylint: disable=g-import-not-at-top
        print(f"checkpoint: backend {jax.default_backend()}, one seed, slabs of {CHUNK_BYTES >> 20} "
              "MiB; host RAM = anonymous RSS of the process (page cache excluded)", flush=True)
    if len(FLAGS.checkpoint_cases) > 1:
        for name in FLAGS.checkpoint_cases:
            rows = _rerun_self("checkpoint", {}, [f"--checkpoint_cases={name}"] + (
                [f"--checkpoint_dir={FLAGS.checkpoint_dir}"] if FLAGS.checkpoint_dir else []))
            for r in rows:
                _print_checkpoint(r)
        return
    import shutil  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    from flare_jax import checkpoint as ck  # pylint: disable=g-import-not-at-top
    from flare_jax import loop  # pylint: disable=g-import-not-at-top
    from flare_jax.data import replay as rp  # pylint: disable=g-import-not-at-top
    name = FLAGS.checkpoint_cases[0]
    cls, cfg, spec = _checkpoint_case(name)
    trainer = cls(cfg, spec)
    keys = loop.seed_keys((0,))
    need = ck.tree_nbytes(loop.checkpoint_tree(loop.carry_template(trainer, keys), True))
    rp.check_memory(need, f"{name}: the state")
    before_state = _anon_rss()
    carry = loop.init_carry(trainer, keys)
    # a full replay: every slot written, frames a byte pattern (not lazily zeroed pages)
    fill = jax.jit(lambda f: f + (jax.lax.broadcasted_iota(jnp.uint8, f.shape, f.ndim - 2) * jnp.uint8(7)
                                  + jax.lax.broadcasted_iota(jnp.uint8, f.shape, 1)), donate_argnums=0)
    per_tree = hasattr(carry.replay, "replay")
    inner = carry.replay.replay if per_tree else carry.replay
    inner = inner.replace(frames=fill(inner.frames),
                          count=jnp.full_like(inner.count, inner.frames.shape[2]))
    carry = carry.replace(replay=carry.replay.replace(replay=inner) if per_tree else inner)
    tree = loop.checkpoint_tree(jax.block_until_ready(carry), True)
    del inner, carry
    root = FLAGS.checkpoint_dir or tempfile.mkdtemp(prefix="flare_jax_bench_ckpt_", dir=".")
    try:
        checkpointer = ck.Checkpointer(os.path.join(root, name), keep=1)
        with _PeakMemory() as save_mem:
            rep = checkpointer.save(1, tree, {"bench": name})
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(rep.path) for f in fs)
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        del tree
        t0 = time.perf_counter()
        with _PeakMemory() as restore_mem:
            _, restored, _ = checkpointer.restore(template)
            jax.block_until_ready(restored)
        t_restore = time.perf_counter() - t0
        del restored
    finally:
        if FLAGS.checkpoint_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    record = dict(bench="checkpoint", case=name, state_bytes=rep.nbytes, disk_bytes=disk,
                  save_s=rep.seconds, restore_s=t_restore, save_extra_rss=save_mem.extra,
                  restore_peak_rss=restore_mem.peak - before_state, backend=jax.default_backend())
    _emit(record)
    if not FLAGS.json:
        _print_checkpoint(record)


def _print_checkpoint(r):
    gib = 2 ** 30
    print(f"  {r['case']}: state {r['state_bytes'] / gib:.2f} GiB, on disk {r['disk_bytes'] / gib:.2f} "
          f"GiB; save {r['save_s']:.1f} s ({r['state_bytes'] / gib / r['save_s']:.2f} GiB/s, "
          f"checksums included) with {r['save_extra_rss'] / 2**20:,.0f} MiB of host RAM beyond the "
          f"state; restore {r['restore_s']:.1f} s, holding {r['restore_peak_rss'] / gib:.2f} GiB of "
          f"host RAM at its peak (the restored state: {r['state_bytes'] / gib:.2f} GiB)", flush=True)


def main(argv):
    names = argv[1:]
    if len(names) != 1 or names[0] not in BENCHMARKS:
        raise app.UsageError(f"usage: python -m experiments.bench <benchmark> [--flags]; "
                             f"benchmarks: {', '.join(sorted(BENCHMARKS))}")
    BENCHMARKS[names[0]]()


if __name__ == "__main__":
    from flare_jax.runtime import setup_process
    _SETUP.update(setup_process(reexec="experiments.bench"))
    app.run(main)
