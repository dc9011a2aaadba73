"""Reports from run directories: curves, aggregate statistics, paper tables, latent-flow pictures.

    python -m experiments.report curves    --runs=DIR[,LABEL=DIR...] --out=OUT [--paper=TABLE]
    python -m experiments.report aggregate --runs=... --out=OUT [--compare=A:B,...] [--at=STEP]
    python -m experiments.report table     --runs=... --out=OUT [--table=NAME]
    python -m experiments.report flow      --run=DIR --out=OUT [--seed=S] [--frames=K]
    python -m experiments.report collect   --runs=DIR --out=results/NAME

`--runs` entries are run directories (one launcher run, a `state_study` tree, a `collect`ed
results folder): every `seed_<s>/eval.csv` below them is one run, its task and variant read from
the run's config.json (`experiments.scores`); `LABEL=DIR` names the variant of the runs under DIR.

- curves: `<out>/curves.png`, one panel per task, one line per variant: the mean over seeds with
  a pointwise 95% bootstrap band (seeds resampled); x in env steps (frames for Atari); with
  `--paper=TABLE` the published numbers of that table of `data/published.json` as markers.
- aggregate: `<out>/aggregate.md` and `<out>/aggregate.png`: IQM, mean, median and optimality
  gap of normalised final scores with 95% stratified-bootstrap CIs (seeds resampled within each
  task; `--reps` resamples, seeded by `--seed`, so the table is reproduced byte for byte),
  performance profiles, and the probability of improvement of `--compare` pairs (Agarwal et al.
  2021; statistics in `flare_jax.stats`).
- table: `<out>/table.md`: the published numbers of `--table` (default: every table that has a
  task and variant of the runs) against ours at the same step: our mean over seeds with its 95%
  bootstrap CI, the difference, and whether the published mean lies inside our CI.
- flow: `<out>/flow.png` for a saved Flare encoder (`experiments.flow`).
- collect: copies a run directory's config.json, command.txt and seed_*/{eval,train}.csv (and
  videos) into `--out`, the layout every other subcommand reads.
Missing or malformed runs are refused in one line naming the file (exit status 2).
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Optional, Sequence

from absl import flags

import numpy as np

from experiments import cli
from experiments import scores as sc

FLAGS = flags.FLAGS
SUBCOMMANDS = ("curves", "aggregate", "table", "flow", "collect")
CONFIDENCE = 0.95


def _define_flags():
    """Flags of the command line only (the study scripts import this module)."""
    flags.DEFINE_list("runs", [], "run directories (DIR or LABEL=DIR), comma-separated")
    flags.DEFINE_string("out", None, "output directory")
    flags.DEFINE_string("title", "", "figure title")
    flags.DEFINE_list("variants", [], "variants to report, in this order (default: all, sorted)")
    flags.DEFINE_list("tasks", [], "tasks to report (default: all)")
    flags.DEFINE_list("compare", [], "aggregate: A:B pairs, the probability that A improves on B")
    flags.DEFINE_integer("at", None, "aggregate: the evaluation step to score (default: each "
                         "run's last)")
    flags.DEFINE_integer("reps", 50_000, "bootstrap resamples")
    flags.DEFINE_integer("seed", 0, "bootstrap seed (aggregate, table, curves); flow: the run's seed")
    flags.DEFINE_string("table", None, "table: the published table (data/published.json)")
    flags.DEFINE_string("paper", None, "curves: draw this published table's numbers as markers")
    flags.DEFINE_string("run", None, "flow: the run directory of a pixel Flare run")
    flags.DEFINE_integer("frames", 4, "flow: consecutive agent steps shown")
    flags.DEFINE_integer("skip", 4, "flow: agent steps of the episode before the first shown")
    flags.DEFINE_integer("channels", 3, "flow: latent channels shown")
    flags.DEFINE_bool("videos", True, "collect: copy the evaluation videos too")


# ----------------------------------------------------------------------------- reading


def load(specs: Sequence[str], tasks: Sequence[str] = (), variants: Sequence[str] = ()) -> dict:
    """{(task, variant): [Run]} of the run directories, filtered to `tasks` and `variants`."""
    if not specs:
        raise ValueError("--runs is required (run directories, comma-separated)")
    groups = sc.group_runs(sc.find_runs(specs))
    for name, wanted, have in (("task", tasks, {t for t, _ in groups}),
                               ("variant", variants, {v for _, v in groups})):
        unknown = [w for w in wanted if w not in have]
        if unknown:
            raise ValueError(f"unknown {name}(s) {unknown}; the runs hold {sorted(have)}")
    return {k: v for k, v in groups.items()
            if (not tasks or k[0] in tasks) and (not variants or k[1] in variants)}


def _ordered(values, order: Sequence[str]) -> list:
    values = sorted(set(values))
    return [v for v in order if v in values] + [v for v in values if v not in order]


def _plt():
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    return plt


def _thousands(ax, axis="x"):
    import matplotlib.ticker  # pylint: disable=g-import-not-at-top
    fmt = matplotlib.ticker.FuncFormatter(
        lambda v, _: "0" if v == 0 else f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k")
    getattr(ax, f"{axis}axis").set_major_formatter(fmt)


def mean_band(returns: np.ndarray, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """returns [seeds, K] -> (mean [K], pointwise 95% bootstrap CI of the mean [2, K])."""
    from flare_jax import stats  # pylint: disable=g-import-not-at-top
    if returns.shape[0] < 2:
        return returns.mean(0), np.stack([returns.mean(0)] * 2)
    points, cis = stats.interval_estimates({"x": returns}, lambda s: s.mean(-2), reps=reps,
                                           confidence=CONFIDENCE, seed=seed)
    return points["x"], cis["x"]


# ----------------------------------------------------------------------------- curves


def plot_curves(groups: dict, out_png: str, title: str = "", variants: Sequence[str] = (),
                paper: Optional[str] = None, reps: int = 2_000, seed: int = 0) -> str:
    """One panel per task, one line per variant (mean, 95% bootstrap band); writes `out_png`."""
    plt = _plt()
    tasks = sorted({t for t, _ in groups})
    order = _ordered([v for _, v in groups], variants)
    colors = {v: f"C{i}" for i, v in enumerate(order)}
    ref_rows = sc.reference_rows(paper)[1] if paper else []
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.3 * cols, 6.4), 3.3 * rows + 0.5),
                             squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        unit = None
        for v in order:
            if (task, v) not in groups:
                continue
            runs = groups[task, v]
            unit = runs[0].unit
            y = np.stack([r.returns for r in runs])
            mean, ci = mean_band(y, reps, seed)
            ax.plot(runs[0].steps, mean, color=colors[v], lw=1.6,
                    label=f"{sc.variant_label(v)} ({len(runs)} seeds)" if len(runs) > 1 else
                    f"{sc.variant_label(v)} (1 seed)")
            ax.fill_between(runs[0].steps, ci[0], ci[1], color=colors[v], alpha=0.2, lw=0)
        for r in ref_rows:
            if r["task"] == task and r["variant"] in colors:
                ax.errorbar([r["steps"]], [r["mean"]], yerr=None if r["se"] is None else [r["se"]],
                            fmt="D", ms=6, color=colors[r["variant"]], mec="k", capsize=3,
                            label=f"{sc.variant_label(r['variant'])}, published ({paper})")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel(unit or "env steps")
        ax.set_ylabel("evaluation return")
        _thousands(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    legend = {}                     # one legend for all panels, below them (hides no data)
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    fig.suptitle(title or "evaluation return: mean over seeds, 95% bootstrap band", fontsize=10)
    ncol = min(len(legend), 4 if cols > 1 else 2)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * -(-len(legend) // ncol) / rows, 1, 1))
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- aggregate


def _ci_cell(point, ci) -> str:
    return f"{point:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def parse_pairs(pairs: Sequence[str], variants: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for p in pairs:
        a, sep, b = p.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"--compare entries are A:B (variants), got {p!r}")
        for v in (a, b):
            if v not in variants:
                raise ValueError(f"--compare: unknown variant {v!r}; the runs hold {sorted(variants)}")
        out.append((a, b))
    return out


def aggregate_report(groups: dict, out_dir: str, variants: Sequence[str] = (),
                     compare: Sequence[str] = (), at: Optional[int] = None, reps: int = 50_000,
                     seed: int = 0, title: str = "", command: str = "") -> str:
    """Writes aggregate.md and aggregate.png; returns the Markdown."""
    from flare_jax import stats  # pylint: disable=g-import-not-at-top
    order = _ordered([v for _, v in groups], variants)
    matrices, tasks = sc.score_matrices(groups, order, at)
    pairs = parse_pairs(compare, order)
    points, cis = stats.interval_estimates(matrices, stats.aggregate, reps=reps,
                                           confidence=CONFIDENCE, seed=seed)
    agents = sorted({groups[t, v][0].agent for t in tasks for v in order})
    steps = {t: int(groups[t, order[0]][0].steps[sc.final_index(groups[t, order[0]][0], at)])
             for t in tasks}
    unit = groups[tasks[0], order[0]][0].unit
    norm = sc.published()["normalisation"]
    how = [norm["dmc"]["source"]] if "sac" in agents else []
    if any(t in norm["gym"]["max_return"] for t in tasks):
        how.append(norm["gym"]["source"])
    if any(t in norm["atari"]["random_human"] for t in tasks):
        how.append(norm["atari"]["source"])
    lines = [f"# {title or 'Aggregate normalised scores'}", "",
             f"Tasks ({len(tasks)}): " + ", ".join(f"{t} at {steps[t]:,d} {unit}" for t in tasks)
             + ". Seeds per task: " + ", ".join(f"{sc.variant_label(v)} {matrices[v].shape[0]}"
                                                for v in order) + ".",
             "Scores: the final evaluation return of each run, normalised per task. "
             + ". ".join(h[0].upper() + h[1:] for h in how) + ".",
             f"Point estimate [95% CI]; CIs by the stratified bootstrap (seeds resampled within each "
             f"task), {reps:,d} resamples, seed {seed} (Agarwal et al., NeurIPS 2021).", "",
             "| variant | " + " | ".join(stats.METRICS) + " |", "|---" * (len(stats.METRICS) + 1) + "|"]
    for v in order:
        lines.append(f"| {sc.variant_label(v)} | "
                     + " | ".join(_ci_cell(points[v][i], cis[v][:, i]) for i in range(len(stats.METRICS)))
                     + " |")
    lines += ["", "Higher is better except for the optimality gap (the mean shortfall below a "
              "normalised score of 1)."]
    poi = []
    if pairs:
        lines += ["", "## Probability of improvement", "",
                  "P(X > Y): the probability that a run of X scores above a run of Y on a task, "
                  "averaged over tasks (ties count half); 95% CI by the stratified bootstrap of both.", "",
                  "| X | Y | P(X > Y) [95% CI] |", "|---|---|---|"]
        for a, b in pairs:
            p, ci = stats.probability_of_improvement_interval(matrices[a], matrices[b], reps=reps,
                                                              confidence=CONFIDENCE, seed=seed)
            poi.append((a, b, p, ci))
            lines.append(f"| {sc.variant_label(a)} | {sc.variant_label(b)} | {_ci_cell(p, ci)} |")
    if command:
        lines += ["", f"Made by `{command}` (and --out=DIR)."]
    md = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "aggregate.md"), "w") as f:
        f.write(md)
    _plot_aggregate(matrices, order, points, cis, poi, os.path.join(out_dir, "aggregate.png"),
                    title, min(reps, 5_000), seed)
    return md


def _plot_aggregate(matrices, order, points, cis, poi, out_png, title, reps, seed):
    from flare_jax import stats  # pylint: disable=g-import-not-at-top
    plt = _plt()
    colors = {v: f"C{i}" for i, v in enumerate(order)}
    n = len(order)
    fig = plt.figure(figsize=(13, 2.2 + 0.35 * n + 3.2))
    grid = fig.add_gridspec(2, 4, height_ratios=[0.9 + 0.3 * n, 3.2])
    labels = [sc.variant_label(v) for v in order]
    for i, metric in enumerate(stats.METRICS):
        ax = fig.add_subplot(grid[0, i])
        for j, v in enumerate(order):
            lo, hi = cis[v][:, i]
            ax.barh(j, hi - lo, left=lo, height=0.6, color=colors[v], alpha=0.75)
            ax.plot([points[v][i]] * 2, [j - 0.3, j + 0.3], color="k", lw=1.5)
        ax.set_yticks(range(n), labels if i == 0 else [""] * n, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(1.0, max(float(cis[v][1, i]) for v in order)) + 0.03)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("normalised score")
        ax.grid(alpha=0.3, axis="x")
    ax = fig.add_subplot(grid[1, :2])
    top = max(1.0, max(float(m.max()) for m in matrices.values()))
    taus = np.linspace(0.0, top, 101)
    prof, prof_ci = stats.performance_profile_interval(matrices, taus, reps=reps,
                                                       confidence=CONFIDENCE, seed=seed)
    for v in order:
        ax.plot(taus, prof[v], color=colors[v], label=sc.variant_label(v))
        ax.fill_between(taus, prof_ci[v][0], prof_ci[v][1], color=colors[v], alpha=0.2, lw=0)
    ax.set_xlabel(r"normalised score $\tau$")
    ax.set_ylabel(r"fraction of runs with score > $\tau$")
    ax.set_title("performance profiles (95% CI)", fontsize=10)
    ax.grid(alpha=0.3)
    handles = ax.get_lines()
    ax = fig.add_subplot(grid[1, 2:])
    if poi:
        for j, (a, b, p, ci) in enumerate(poi):
            ax.barh(j, ci[1] - ci[0], left=ci[0], height=0.6, color=colors[a], alpha=0.75)
            ax.plot([p, p], [j - 0.3, j + 0.3], color="k", lw=1.5)
        ax.set_yticks(range(len(poi)), [f"{sc.variant_label(a)}\n> {sc.variant_label(b)}"
                                        for a, b, _, _ in poi], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0.5, color="gray", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel("P(X > Y)")
        ax.set_title("probability of improvement (95% CI)", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    else:
        ax.set_visible(False)
    fig.suptitle(title or "aggregate normalised scores (95% stratified-bootstrap CIs)", fontsize=11)
    fig.legend(handles, labels, loc="lower center", ncol=n, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- table


def table_report(groups: dict, out_dir: str, table: Optional[str] = None, reps: int = 50_000,
                 seed: int = 0, command: str = "") -> str:
    """Writes table.md (published numbers against ours at the same step); returns it."""
    from flare_jax import stats  # pylint: disable=g-import-not-at-top
    names = [table] if table else list(sc.published()["tables"])
    sections = []
    for name in names:
        record, rows = sc.reference_rows(name)
        rows = [r for r in rows if (r["task"], r["variant"]) in groups]
        if not rows:
            continue
        lines = [f"## {name}", "", f"Published: {record['source']}.", "",
                 f"| task | variant | {record['unit']} | published | ours: mean [95% CI] | seeds "
                 "| ours - published | published inside our CI |", "|---" * 8 + "|"]
        for r in rows:
            runs = groups[r["task"], r["variant"]]
            pub = (f"{r['mean']:g}" + ("" if r["se"] is None else f" +- {r['se']:g}")
                   + (f" (action repeat {r['action_repeat']})" if "action_repeat" in r else ""))
            head = f"| {r['task']} | {sc.variant_label(r['variant'])} | {r['steps']:,d} | {pub} | "
            hits = np.flatnonzero(runs[0].steps == r["steps"])
            if not len(hits):
                lines.append(head + f"not reached (our last evaluation: {runs[0].steps[-1]:,d}) "
                             f"| {len(runs)} | - | - |")
                continue
            y = np.array([[run.returns[hits[0]] for run in runs]]).T      # [seeds, 1]
            mean = float(y.mean())
            if len(runs) > 1:
                _, cis = stats.interval_estimates({"x": y}, lambda s: s.mean((-2, -1)), reps=reps,
                                                  confidence=CONFIDENCE, seed=seed)
                lo, hi = (float(c) for c in np.ravel(cis["x"]))
            else:
                lo = hi = mean
            inside = "yes" if lo <= r["mean"] <= hi else "**no**"
            lines.append(head + f"{mean:.1f} [{lo:.1f}, {hi:.1f}] | {len(runs)} | "
                         f"{mean - r['mean']:+.1f} | {inside} |")
        sections.append("\n".join(lines))
    if not sections:
        tasks = sorted({(t, v) for t, v in groups})
        raise ValueError(f"no published number of {', '.join(names)} has a task and variant of the "
                         f"runs ({tasks}); see experiments/data/published.json")
    md = ("# Ours against the published numbers\n\n" + "\n\n".join(sections)
          + f"\n\nOur CI: the percentile bootstrap of the mean over seeds ({reps:,d} resamples, "
          f"seed {seed}); with one seed there is no interval.\n"
          + (f"\nMade by `{command}` (and --out=DIR).\n" if command else ""))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(md)
    return md


# ----------------------------------------------------------------------------- collect


def collect(run_dir: str, out: str, videos: bool = True) -> list[str]:
    """Copies a run's config.json, command.txt and seed_*/{eval,train}.csv (+ videos) to `out`."""
    runs = sc.find_runs([run_dir])
    copied = []
    top = [f for f in ("config.json", "command.txt") if os.path.exists(os.path.join(run_dir, f))]
    for f in top:
        os.makedirs(out, exist_ok=True)
        shutil.copy(os.path.join(run_dir, f), os.path.join(out, f))
        copied.append(f)
    for r in runs:
        seed_dir = os.path.dirname(r.path)
        rel = os.path.relpath(seed_dir, run_dir)
        os.makedirs(os.path.join(out, rel), exist_ok=True)
        names = [f for f in ("eval.csv", "train.csv", "config.json")
                 if os.path.exists(os.path.join(seed_dir, f))]
        if videos and os.path.isdir(os.path.join(seed_dir, "videos")):
            os.makedirs(os.path.join(out, rel, "videos"), exist_ok=True)
            names += [os.path.join("videos", f) for f in sorted(os.listdir(os.path.join(seed_dir, "videos")))
                      if f.endswith(".mp4")]
        for f in names:
            shutil.copy(os.path.join(seed_dir, f), os.path.join(out, rel, f))
            copied.append(os.path.join(rel, f))
    return copied


# ----------------------------------------------------------------------------- command line


def _command(sub: str) -> str:
    """The command line that reproduces this report (the given flags but --out, which does not
    change the text, in a fixed order)."""
    names = [n for n in ("runs", "variants", "tasks", "compare", "at", "reps", "seed", "table",
                         "paper", "run", "frames", "skip", "channels", "title")
             if FLAGS[n].present]
    parts = []
    for n in names:
        v = FLAGS[n].value
        v = ",".join(v) if isinstance(v, list) else v
        parts.append(f"--{n}={v!s}" if " " not in str(v) else f'--{n}="{v}"')
    return " ".join(["python -m experiments.report", sub] + parts)


def main(argv):
    sub = argv[1]
    if not FLAGS.out:
        raise cli.UserError(f"{sub}: --out is required (an output directory)")
    with cli.bad_input():
        if sub == "flow":
            if not FLAGS.run:
                raise ValueError("flow: --run is required (a pixel Flare run directory)")
            from experiments import flow  # pylint: disable=g-import-not-at-top
            png = flow.flow_report(FLAGS.run, FLAGS.out, seed=FLAGS.seed, frames=FLAGS.frames,
                                   skip=FLAGS.skip, channels=FLAGS.channels, title=FLAGS.title)
            print(f"wrote {png}")
            return
        if sub == "collect":
            if len(FLAGS.runs) != 1:
                raise ValueError("collect: give one run directory in --runs")
            copied = collect(FLAGS.runs[0], FLAGS.out, FLAGS.videos)
            print(f"copied {len(copied)} files to {FLAGS.out}")
            return
        if FLAGS.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {FLAGS.reps}")
        for name in (FLAGS.table, FLAGS.paper):
            if name:
                sc.reference_rows(name)          # an unknown table is refused before reading runs
        groups = load(FLAGS.runs, FLAGS.tasks, FLAGS.variants)
        if sub == "curves":
            png = plot_curves(groups, os.path.join(FLAGS.out, "curves.png"), FLAGS.title,
                              FLAGS.variants, FLAGS.paper, min(FLAGS.reps, 2_000), FLAGS.seed)
            print(f"wrote {png}")
        elif sub == "aggregate":
            print(aggregate_report(groups, FLAGS.out, FLAGS.variants, FLAGS.compare, FLAGS.at,
                                   FLAGS.reps, FLAGS.seed, FLAGS.title, _command(sub)))
        elif sub == "table":
            print(table_report(groups, FLAGS.out, FLAGS.table, FLAGS.reps, FLAGS.seed, _command(sub)))


if __name__ == "__main__":
    _define_flags()
    cli.run_main(main, SUBCOMMANDS)
