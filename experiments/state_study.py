"""The paper's state-space study (section 4, Figs. 2-3): SAC from DMC states with velocities
removed, and what recovers them.

  python -m experiments.state_study --tasks=cartpole_swingup,walker_walk \
      --variants=state_full,state_position,state_flare,state_stack,state_recurrent \
      --seeds=0,1,2 --env_steps=100000 --out_dir=results/state_study/large

Variants (flare_jax.encoders.state; reference.md section 3):
  state_full       positions and velocities (the upper line)
  state_position   positions only (velocities removed: flare_jax.envs.dmc_tasks)
  state_flare      (s_t, s_t - s_{t-1}, s_{t-1} - s_{t-2}, s_{t-2} - s_{t-3}) of positions
  state_stack      (s_t, s_{t-1}, s_{t-2}, s_{t-3})
  state_recurrent  LSTM over s_{t-3..t} (hidden = size of the offsets), trained by the critic

All seeds of a (task, variant) run in one child process, vmapped (agents/sac_train.py, through
the run loop). Writes <out_dir>/<task>/<variant>/seed_<s>/eval.csv (and each run's checkpoints),
<out_dir>/curves.png (one panel per task, mean +- standard error over seeds, env steps on x),
<out_dir>/final_returns.md and summary.csv. A finished (task, variant) is not run again and an
unfinished one resumes from its newest checkpoint, so an interrupted study continues where it
stopped. The flags are checked (every run's config built) before any run starts; the children
end with the study (SIGTERM when it dies, however it dies), and `out_dir` is locked while a
study runs in it.
"""
from __future__ import annotations

import csv
import glob
import os
import signal
import subprocess
import sys
import time

from absl import flags

import numpy as np

from agents import sac_train
from experiments import cli, presets
from experiments import report
from experiments import scores as sc
from flare_jax import config_flags, loop, runtime
from flare_jax.envs import dmc_tasks
from flare_jax.logging import write_command

VARIANTS = ("state_full", "state_position", "state_flare", "state_stack", "state_recurrent")

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["cartpole_swingup", "pendulum_swingup", "walker_walk"],
                  f"DMC tasks, from {sorted(dmc_tasks.TASKS)}")
flags.DEFINE_list("variants", list(VARIANTS), f"state encoders, from {list(VARIANTS)}")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (vmapped in one process per task/variant)")
flags.DEFINE_integer("env_steps", 100_000, "environment steps per run (agent steps x action repeat)")
flags.DEFINE_integer("evals", 10, "evaluations per run (evenly spaced)")
flags.DEFINE_integer("eval_episodes", 10, "episodes per evaluation")
flags.DEFINE_string("out_dir", "results/state_study/run", "output directory")
flags.DEFINE_string("title", "", "figure title")
flags.DEFINE_bool("in_process", False, "train in this process (default: one child process per "
                  "(task, variant), started again if it stalls or dies)")
flags.DEFINE_bool("summarise_only", False, "only write the plot and tables of what out_dir holds "
                  "for --tasks/--variants (e.g. after studies run in parallel into one out_dir)")


def study_config(task: str, variant: str, seeds, env_steps: int, evals: int, eval_episodes: int,
                 out_dir: str) -> sac_train.TrainConfig:
    """The state preset of experiments.presets for one (task, variant); raises ValueError (one
    line) for a bad task, variant or size."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if env_steps < 1:
        raise ValueError(f"env_steps must be >= 1, got {env_steps}")
    repeat = dmc_tasks.get_task(task).action_repeat
    agent_steps = -(-env_steps // repeat)
    if evals < 1 or agent_steps < evals:
        raise ValueError(f"evals must lie in [1, {agent_steps}] (agent steps of a run), got {evals}")
    p = presets.SAC_PRESETS["state"]
    return config_flags.replace(
        p, task=task, encoder=variant, seeds=tuple(int(s) for s in seeds), env_steps=env_steps,
        init_steps=min(p.init_steps, agent_steps // 10), eval_every=max(1, agent_steps // evals),
        eval_episodes=eval_episodes, out_dir=out_dir, tensorboard=False, stall_seconds=90.0)


def finished(config: sac_train.TrainConfig) -> bool:
    """The run of `config` reached its budget (its newest checkpoint says so)."""
    status = loop.run_status(config.run.out_dir)
    return bool(status and status.get("finished")) and all(
        os.path.exists(os.path.join(config.run.out_dir, f"seed_{s}", "eval.csv")) for s in config.run.seeds)


_CHILD_ENV = "FLARE_JAX_STUDY_CHILD"


def _raise_keyboard_interrupt(*_):
    raise KeyboardInterrupt


def _run_child(task, variant, seeds, env_steps, evals, eval_episodes, out_dir, log,
               attempts: int = 3):
    """Runs one (task, variant) in a child process, again if it dies.

    The child gets SIGTERM when this process dies (`runtime.die_with_parent`), so it saves and
    stops. A child that stalls is ended by its StallWatchdog (90 s without a step) and started
    again: it resumes from its newest checkpoint.
    """
    args = [sys.executable, "-m", "experiments.state_study", "--in_process",
            f"--tasks={task}", f"--variants={variant}", f"--seeds={','.join(map(str, seeds))}",
            f"--env_steps={env_steps}", f"--evals={evals}", f"--eval_episodes={eval_episodes}",
            f"--out_dir={out_dir}"]
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen(args, env=dict(os.environ, **{_CHILD_ENV: "1"}),
                                preexec_fn=runtime.die_with_parent)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM of this process: stop the child too
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if code == 0:
            return
        if code == 2:      # refused its input: running it again cannot help
            raise loop.RunError(f"{task} {variant}: the run refused its settings (see above)")
        if (code < 0 and -code in (signal.SIGINT, signal.SIGTERM)) or code in (130, 143):
            raise KeyboardInterrupt
        if code == loop.EXIT_DIVERGED:
            raise RuntimeError(f"{task} {variant} diverged (see above)")
        log(f"[study] {task} {variant}: the run process exited with status {code} "
            f"(attempt {attempt} of {attempts})")
    raise RuntimeError(f"{task} {variant} failed {attempts} times; see the output above")


def run_study(configs, log=print, in_process: bool = True, sizes=None):
    """Runs every config not finished yet, in this process or in child processes."""
    total = len(configs)
    t0 = time.time()
    for n, cfg in enumerate(configs, 1):
        task, variant = cfg.task, cfg.sac.encoder
        if finished(cfg):
            log(f"[study] {n}/{total} {task} {variant}: already done, skipped")
            continue
        log(f"[study] {n}/{total} {task} {variant} ({len(cfg.run.seeds)} seeds vmapped), "
            f"{(time.time() - t0) / 60:.1f} min so far")
        if in_process:
            result = sac_train.train(cfg, log=log)      # it logs how it ended
            if result.status != loop.FINISHED:
                sys.exit(result.exit_code)
        else:
            _run_child(task, variant, cfg.run.seeds, *sizes, log)
    log(f"[study] all runs done in {(time.time() - t0) / 60:.1f} min")


def summarise(tasks, variants, out_dir, title="") -> tuple[str, str]:
    """Writes curves.png (`experiments.report` curves), final_returns.md and summary.csv;
    returns (markdown table, png path). (task, variant) pairs without runs yet are left out."""
    present = [(t, v) for t in tasks for v in variants
               if glob.glob(os.path.join(out_dir, t, v, "seed_*", "eval.csv"))]
    groups = {}
    for t, v in present:
        groups.update(report.load([os.path.join(out_dir, t, v)]))
    png = os.path.join(out_dir, "curves.png")
    if groups:
        report.plot_curves(groups, png, title, variants)
    rows = []
    for task, variant in present:
        runs = groups[task, variant]
        finals = np.array([r.returns[-1] for r in runs])
        fse = finals.std(ddof=1) / np.sqrt(len(finals)) if len(finals) > 1 else 0.0
        rows.append(dict(task=task, variant=variant, seeds=len(finals),
                         env_steps=int(runs[0].steps[-1]), final_mean=finals.mean(),
                         final_se=fse, finals=" ".join(f"{v:.1f}" for v in finals)))
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    header = "| variant | " + " | ".join(tasks) + " |"
    lines = [header, "|---" * (len(tasks) + 1) + "|"]
    by = {(r["task"], r["variant"]): r for r in rows}
    for variant in variants:
        cells = []
        for task in tasks:
            r = by.get((task, variant))
            cells.append("-" if r is None else f"{r['final_mean']:.1f} +- {r['final_se']:.1f}")
        lines.append(f"| {sc.variant_label(variant)} | " + " | ".join(cells) + " |")
    steps_note = ", ".join(sorted({f"{r['task']}: {r['env_steps']:,d}" for r in rows}))
    table = "\n".join(lines)
    md = (f"# Final evaluation return (mean +- s.e. over seeds)\n\n{table}\n\n"
          f"Env steps at the final evaluation: {steps_note}.\n")
    if "state_full" in variants:   # the paper's comparison: each variant against full state
        rel = [header, "|---" * (len(tasks) + 1) + "|"]
        for variant in variants:
            cells = []
            for task in tasks:
                r, full = by.get((task, variant)), by.get((task, "state_full"))
                ok = r is not None and full is not None and full["final_mean"] > 0
                cells.append(f"{100 * r['final_mean'] / full['final_mean']:.0f}%" if ok else "-")
            rel.append(f"| {sc.variant_label(variant)} | " + " | ".join(cells) + " |")
        md += ("\n## Final return as a share of full state's\n\n" + "\n".join(rel) + "\n")
    with open(os.path.join(out_dir, "final_returns.md"), "w") as f:
        f.write(md)
    return table, png


def main(argv):
    del argv
    # every run's config first: bad flags are refused before anything starts
    with cli.bad_input():
        configs = [study_config(task, variant, FLAGS.seeds, FLAGS.env_steps, FLAGS.evals,
                                FLAGS.eval_episodes, os.path.join(FLAGS.out_dir, task, variant))
                   for task in FLAGS.tasks for variant in FLAGS.variants]
    sizes = (FLAGS.env_steps, FLAGS.evals, FLAGS.eval_episodes, FLAGS.out_dir)
    if FLAGS.in_process and os.environ.get(_CHILD_ENV) == "1":
        # a child of run_study: train one (task, variant), the parent reports
        run_study(configs)
        return
    with runtime.RunDirLock(FLAGS.out_dir):
        # the effective study flags, so the command reproduces the run whatever the entry point
        # (make run starts experiments.default_run, whose defaults differ)
        run_flags = [] if FLAGS.summarise_only else [
            f"--seeds={','.join(FLAGS.seeds)}", f"--env_steps={FLAGS.env_steps}",
            f"--evals={FLAGS.evals}", f"--eval_episodes={FLAGS.eval_episodes}"]
        write_command(FLAGS.out_dir, "experiments.state_study", [
            f"--tasks={','.join(FLAGS.tasks)}", f"--variants={','.join(FLAGS.variants)}", *run_flags,
            f"--out_dir={FLAGS.out_dir}"] + (["--summarise_only"] if FLAGS.summarise_only else []),
            append=True)
        t0 = time.time()
        print(f"[study] tasks {FLAGS.tasks}, variants {FLAGS.variants}, seeds {FLAGS.seeds}, "
              f"{FLAGS.env_steps:,d} env steps per run -> {FLAGS.out_dir}", flush=True)
        if not FLAGS.summarise_only:
            if not FLAGS.in_process:  # SIGTERM ends the children too (see _run_child)
                signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
            run_study(configs, in_process=FLAGS.in_process, sizes=sizes)
        table, png = summarise(FLAGS.tasks, FLAGS.variants, FLAGS.out_dir, FLAGS.title)
    print("\nFinal evaluation return (mean +- s.e. over seeds):\n" + table +
          f"\n\nplot: {png}\ntable: {os.path.join(FLAGS.out_dir, 'final_returns.md')}\n"
          f"[study] done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    runtime.setup_process(reexec="experiments.state_study")
    cli.run_main(main)
