"""Evaluation results of run directories, grouped by task and variant, and the published numbers.

A *run* here is one seed's evaluation log, `<dir>/seed_<s>/eval.csv` (columns `step` and
`return_mean`; step = env steps for SAC, frames for Rainbow), as the launchers, `state_study` and
`report collect` write it. Its task, variant (encoder or Rainbow torso) and agent come from the
`config.json` of its run directory (`<dir>/config.json`, else `<dir>/seed_<s>/config.json`); a
`--runs` entry `LABEL=PATH` names the variant of every run under PATH instead.

    runs = find_runs(["results/state_study/large"])         # [Run], one per seed
    groups = group_runs(runs)                                # {(task, variant): [Run]}, checked
    scores = score_matrices(groups)                          # {variant: [seeds, tasks]} normalised

Normalised scores (Agarwal et al. 2021): DMC returns / 1000; Atari human-normalised with the
per-game random and human scores of `data/published.json` (sources there); gym classic control
by the time limit's maximum return. Every problem with the inputs is a ValueError of one line
that names the file (and the row, or the runs whose step grids differ).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

PUBLISHED = os.path.join(os.path.dirname(__file__), "data", "published.json")
SEED_DIR = re.compile(r"^seed_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Run:
    """One seed's evaluations: steps [K] int (env steps or frames, `unit`), returns [K] float."""
    path: str
    agent: str            # "sac" | "rainbow"
    task: str
    variant: str
    seed: int
    steps: np.ndarray
    returns: np.ndarray

    @property
    def unit(self) -> str:
        return "frames" if self.agent == "rainbow" else "env steps"


def read_eval(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [K], mean returns [K]) of an eval.csv; ValueError (one line) naming a malformed row."""
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
            if not np.isfinite(returns[-1]):
                raise ValueError(f"{path}, line {reader.line_num}: return_mean is {returns[-1]}")
    if not steps:
        raise ValueError(f"{path}: no evaluation rows")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{path}: steps are not increasing ({steps})")
    return np.array(steps), np.array(returns)


def describe_config(record: dict, path: str) -> tuple[str, str, str]:
    """(agent, task, variant) of a run's config.json record (this version's {"agent", "config"}
    or an earlier flat config)."""
    cfg = record.get("config", record)
    agent = record.get("agent") or ("sac" if "sac" in cfg else "rainbow" if "rainbow" in cfg else None)
    task = cfg.get("task") or cfg.get("game") or cfg.get("env")
    if agent == "sac":
        variant = cfg.get("sac", {}).get("encoder")
    elif agent == "rainbow":
        variant = cfg.get("rainbow", {}).get("torso")
    else:
        variant = None
    if not task or not variant:
        raise ValueError(f"{path}: cannot tell the agent, task and variant of this config "
                         f"(agent {agent!r}, task {task!r}, variant {variant!r})")
    return agent, task, variant


def _config_of(seed_dir: str) -> tuple[dict, str]:
    for d in (os.path.dirname(seed_dir), seed_dir):
        path = os.path.join(d, "config.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    return json.load(f), path
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
    raise ValueError(f"{seed_dir}: no config.json beside it or in its run directory (the task "
                     "and variant come from it)")


def find_runs(specs: Sequence[str]) -> list[Run]:
    """Every `seed_<s>/eval.csv` under each spec (`PATH` or `LABEL=PATH`), sorted by path."""
    runs = []
    for spec in specs:
        label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        if not os.path.isdir(path):
            raise ValueError(f"run directory {path} does not exist")
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tb", "videos"))
            m = SEED_DIR.match(os.path.basename(root))
            if m is None:
                continue
            if "eval.csv" not in files:
                raise ValueError(f"{root} has no eval.csv (a run directory's seed_<s> folders "
                                 "hold the evaluation logs)")
            record, cfg_path = _config_of(root)
            agent, task, variant = describe_config(record, cfg_path)
            steps, returns = read_eval(os.path.join(root, "eval.csv"))
            found.append(Run(os.path.join(root, "eval.csv"), agent, task, label or variant,
                             int(m.group(1)), steps, returns))
        if not found:
            raise ValueError(f"run directory {path} holds no seed_*/eval.csv")
        runs += found
    return runs


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """{(task, variant): runs sorted by seed}; refuses a seed given twice and seeds of one task
    and variant evaluated at different steps (naming the runs)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.task, r.variant), []).append(r)
    for (task, variant), rs in groups.items():
        rs.sort(key=lambda r: r.seed)
        for a, b in zip(rs, rs[1:]):
            if a.seed == b.seed:
                raise ValueError(f"seed {a.seed} of {task} / {variant} is given twice: {a.path} "
                                 f"and {b.path} (label one of them: --runs=LABEL=PATH)")
        agents = {r.agent for r in rs}
        if len(agents) > 1:
            raise ValueError(f"{task} / {variant} mixes agents {sorted(agents)}")
        ref = rs[0]
        for r in rs[1:]:
            if not np.array_equal(r.steps, ref.steps):
                raise ValueError(f"{task} / {variant}: runs with different step grids: {ref.path} "
                                 f"({_grid(ref.steps)}) and {r.path} ({_grid(r.steps)})")
    return dict(sorted(groups.items()))


def _grid(steps: np.ndarray) -> str:
    return f"{len(steps)} evaluations at {steps[0]:,d}..{steps[-1]:,d}"


@functools.lru_cache(maxsize=None)
def published(path: str = PUBLISHED) -> dict:
    with open(path) as f:
        return json.load(f)


def variant_label(variant: str) -> str:
    return published()["variant_labels"].get(variant, variant)


def normalise(agent: str, task: str, returns: np.ndarray) -> np.ndarray:
    """Normalised scores of raw returns (module docstring); ValueError for an unknown task."""
    from flare_jax import stats  # pylint: disable=g-import-not-at-top
    norm = published()["normalisation"]
    returns = np.asarray(returns, np.float64)
    if agent == "sac":
        return stats.normalise_dmc(returns)
    if task in norm["gym"]["max_return"]:
        return returns / norm["gym"]["max_return"][task]
    table = norm["atari"]["random_human"]
    if task not in table:
        raise ValueError(f"no normalisation for {agent} task {task!r}: Atari games "
                         f"({', '.join(sorted(table)[:5])}, ... 57 in all) or "
                         f"{', '.join(norm['gym']['max_return'])}")
    random, human = table[task]
    return stats.normalise_atari(returns, random, human)


def final_index(run: Run, at: Optional[int]) -> int:
    """The index of the evaluation at step `at` (None: the last); ValueError if there is none."""
    if at is None:
        return len(run.steps) - 1
    hits = np.flatnonzero(run.steps == at)
    if not len(hits):
        raise ValueError(f"{run.path} has no evaluation at step {at:,d} ({_grid(run.steps)})")
    return int(hits[0])


def score_matrices(groups: dict, variants: Optional[Sequence[str]] = None,
                   at: Optional[int] = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """({variant: normalised final scores [seeds, tasks]}, tasks) over the tasks every variant ran.

    `at`: use the evaluation at this step instead of each run's last. The runs of one task must
    end at the same step (else ValueError naming them) and a variant needs the same number of
    seeds on every task (the stratified bootstrap resamples seeds within tasks).
    """
    all_variants = sorted({v for _, v in groups})
    variants = list(variants) if variants else all_variants
    unknown = [v for v in variants if v not in all_variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the runs hold {all_variants}")
    tasks = sorted({t for t, v in groups if v in variants})
    missing = [(t, v) for t in tasks for v in variants if (t, v) not in groups]
    if missing:
        raise ValueError(f"not every variant ran every task: missing {missing}")
    for t in tasks:
        ends = {v: int(groups[t, v][0].steps[final_index(groups[t, v][0], at)]) for v in variants}
        if len(set(ends.values())) > 1:
            raise ValueError(f"{t}: the variants' final evaluations are at different steps "
                             f"{ends}; pick one with --at=STEP")
    out = {}
    for v in variants:
        cols = []
        for t in tasks:
            rs = groups[t, v]
            cols.append(normalise(rs[0].agent, t, [r.returns[final_index(r, at)] for r in rs]))
        n = {t: len(c) for t, c in zip(tasks, cols)}
        if len(set(n.values())) > 1:
            raise ValueError(f"variant {v} has different numbers of seeds per task {n}")
        out[v] = np.stack(cols, axis=1)
    return out, tasks


def reference_rows(table: str) -> tuple[dict, list[dict]]:
    """(the table's record, its rows) of `data/published.json`; ValueError naming the tables."""
    tables = published()["tables"]
    if table not in tables:
        raise ValueError(f"unknown published table {table!r}; valid: {', '.join(tables)}")
    return tables[table], tables[table]["rows"]
