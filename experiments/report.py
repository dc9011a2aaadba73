"""Collect a training run's evaluation logs into results/: CSVs, a learning-curve plot, a summary.

  python -m experiments.report --run_dir=runs/sac_state_cartpole --out=results/sac_state_cartpole \
      --title="Full-state SAC, cartpole_swingup"

Reads <run_dir>/seed_*/eval.csv (columns step = env steps, return_mean), writes
<out>/eval_seed_<s>.csv, <out>/curve.png (mean +- standard error over seeds) and <out>/summary.md
(final and best returns per seed). Copies <run_dir>/command.txt when present.
"""
from __future__ import annotations

import csv
import glob
import os
import re
import shutil

from absl import flags

import numpy as np

from experiments import cli

FLAGS = flags.FLAGS


def _define_flags():
    """Flags of the command line only (this module is also imported by the study scripts)."""
    flags.DEFINE_string("run_dir", None, "run directory with seed_*/eval.csv")
    flags.DEFINE_string("out", None, "output directory under results/")
    flags.DEFINE_string("title", "", "plot title")


def read_eval(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean returns) of an eval.csv; ValueError (one line) naming a malformed row."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"step", "return_mean"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: not an eval log (needs the columns step and return_mean, "
                             f"has {reader.fieldnames})")
        steps, returns = [], []
        for row in reader:
            try:
                steps.append(int(row["step"]))
                returns.append(float(row["return_mean"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {reader.line_num}: bad row {row}") from None
    if not steps:
        raise ValueError(f"{path}: no evaluation rows")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{path}: steps are not increasing ({steps})")
    return np.array(steps), np.array(returns)


def load_runs(run_dir: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    runs = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "seed_*", "eval.csv"))):
        seed = int(re.search(r"seed_(\d+)", path).group(1))
        runs[seed] = read_eval(path)
    if not runs:
        what = "does not exist" if not os.path.isdir(run_dir) else "holds no seed_*/eval.csv"
        raise FileNotFoundError(f"run directory {run_dir} {what}")
    return runs


def mean_and_se(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(c) for c in curves)
    y = np.stack([c[:n] for c in curves])
    se = y.std(0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else np.zeros(n)
    return y.mean(0), se


def plot_curves(ax, runs, label=None, color=None):
    steps = min((s for s, _ in runs.values()), key=len)
    mean, se = mean_and_se([r for _, r in runs.values()])
    ax.plot(steps[:len(mean)], mean, label=label, color=color)
    ax.fill_between(steps[:len(mean)], mean - se, mean + se, alpha=0.25, color=color)


def write_report(run_dir: str, out: str, title: str = "") -> str:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    runs = load_runs(run_dir)
    os.makedirs(out, exist_ok=True)
    for seed in runs:
        shutil.copy(os.path.join(run_dir, f"seed_{seed}", "eval.csv"),
                    os.path.join(out, f"eval_seed_{seed}.csv"))
    if os.path.exists(os.path.join(run_dir, "command.txt")):
        shutil.copy(os.path.join(run_dir, "command.txt"), os.path.join(out, "command.txt"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    plot_curves(ax, runs)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(title or os.path.basename(out), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=110)
    plt.close(fig)
    finals = {s: r[-1] for s, (_, r) in runs.items()}
    bests = {s: r.max() for s, (_, r) in runs.items()}
    last_step = {s: st[-1] for s, (st, _) in runs.items()}
    vals = np.array(list(finals.values()))
    se = vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0
    lines = [f"# {title or os.path.basename(out)}", "",
             f"Seeds: {sorted(runs)}. Source run: `{run_dir}`.", "",
             "| seed | env steps | final return | best return |", "|---|---|---|---|"]
    lines += [f"| {s} | {last_step[s]:,d} | {finals[s]:.1f} | {bests[s]:.1f} |" for s in sorted(runs)]
    lines += ["", f"Final return over seeds: mean {vals.mean():.1f} +- {se:.1f} (s.e.)", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv):
    del argv
    if not FLAGS.run_dir or not FLAGS.out:
        raise cli.UserError("--run_dir and --out are required")
    with cli.bad_input():
        try:
            text = write_report(FLAGS.run_dir, FLAGS.out, FLAGS.title)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
    print(text)


if __name__ == "__main__":
    _define_flags()
    cli.run_main(main)
