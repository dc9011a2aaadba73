"""Aggregate statistics of many runs on many tasks, after Agarwal et al. 2021, "Deep
Reinforcement Learning at the Edge of the Statistical Precipice" (NeurIPS; the rliable library).

Scores are normalised score matrices `[num_runs, num_tasks]`, one per algorithm; several
algorithms come as a dict `{name: matrix}` (each its own num_runs, all the same num_tasks). The
point estimates equal `rliable.metrics` and `rliable.library`; the confidence intervals are
percentile intervals of the stratified bootstrap (runs resampled with replacement within each
task), as `rliable.library.get_interval_estimates` computes them by default.

Every metric also takes a batch `[..., num_runs, num_tasks]` and reduces its last two axes, so
the bootstrap evaluates whole chunks of resamples at once. Bootstrap draws come from
`np.random.default_rng(seed)` and do not depend on `chunk` (the number of resamples held in
memory at once), so a seed gives the same intervals for any chunk size.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import scipy.stats

METRICS = ("IQM", "mean", "median", "optimality gap")  # the order of `aggregate`'s output


def _scores(scores, name: str = "scores", batch: bool = True) -> np.ndarray:
    """`scores` as a float array [..., R, T] (exactly [R, T] unless `batch`), or ValueError."""
    x = np.asarray(scores, dtype=np.float64)
    shape = "[..., num_runs, num_tasks]" if batch else "[num_runs, num_tasks]"
    if x.ndim < 2 or (x.ndim > 2 and not batch):
        raise ValueError(f"{name} has shape {x.shape}; expected a {shape} matrix")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} has shape {x.shape}; it needs at least one run and one task")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds {np.sum(~np.isfinite(x))} NaN or infinite values; "
                         "all scores must be finite")
    return x


def _score_dict(score_dict: Mapping) -> dict:
    """The dict's matrices checked as [R, T] with one T for all, or ValueError."""
    if not isinstance(score_dict, Mapping) or not score_dict:
        raise ValueError("score_dict must be a non-empty dict {name: [num_runs, num_tasks]}")
    out = {k: _scores(v, f"score_dict[{k!r}]", batch=False) for k, v in score_dict.items()}
    tasks = {k: v.shape[1] for k, v in out.items()}
    if len(set(tasks.values())) > 1:
        raise ValueError(f"the algorithms have different numbers of tasks {tasks}; "
                         "all need the same tasks")
    return out


def _confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}; it must lie strictly between 0 and 1")


def _bootstrap_args(reps: int, confidence: float, chunk: int) -> None:
    if not (isinstance(reps, (int, np.integer)) and reps >= 1):
        raise ValueError(f"reps={reps!r}; the number of bootstrap resamples must be an int >= 1")
    if not (isinstance(chunk, (int, np.integer)) and chunk >= 1):
        raise ValueError(f"chunk={chunk!r}; the resamples per chunk must be an int >= 1")
    _confidence(confidence)


def _taus(taus) -> np.ndarray:
    t = np.asarray(taus, dtype=np.float64)
    if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)):
        raise ValueError(f"taus must be a non-empty 1-D array of finite thresholds, got {t!r}")
    return t


# ---------------------------------------------------------------- point estimates
def iqm(scores) -> np.ndarray:
    """Interquartile mean of all runs and tasks: the 25% trimmed mean of the flattened [R, T]
    matrix (`scipy.stats.trim_mean(scores, 0.25, axis=None)`, rliable's `aggregate_iqm`).
    [..., R, T] -> [...]."""
    x = _scores(scores)
    flat = x.reshape(x.shape[:-2] + (-1,))
    n = flat.shape[-1]
    lo, hi = int(0.25 * n), n - int(0.25 * n)
    return np.partition(flat, (lo, hi - 1), axis=-1)[..., lo:hi].mean(axis=-1)


def mean(scores) -> np.ndarray:
    """Mean over tasks of the per-task mean over runs (rliable's `aggregate_mean`).
    [..., R, T] -> [...]."""
    return _scores(scores).mean(axis=-2).mean(axis=-1)


def median(scores) -> np.ndarray:
    """Median over tasks of the per-task mean over runs (rliable's `aggregate_median`).
    [..., R, T] -> [...]."""
    return np.median(_scores(scores).mean(axis=-2), axis=-1)


def optimality_gap(scores, gamma: float = 1.0) -> np.ndarray:
    """How far the scores fall short of `gamma`: gamma - mean of min(score, gamma) over all runs
    and tasks (rliable's `aggregate_optimality_gap`). [..., R, T] -> [...]."""
    x = _scores(scores)
    if not np.isfinite(gamma):
        raise ValueError(f"gamma={gamma!r}; the optimality threshold must be finite")
    return gamma - np.minimum(x, gamma).reshape(x.shape[:-2] + (-1,)).mean(axis=-1)


def aggregate(scores) -> np.ndarray:
    """The four aggregates in the order of `METRICS` (IQM, mean, median, optimality gap at
    gamma=1). [..., R, T] -> [..., 4]."""
    return np.stack([iqm(scores), mean(scores), median(scores), optimality_gap(scores)], axis=-1)


def probability_of_improvement(x, y) -> np.ndarray:
    """Average probability of improvement of X over Y: the mean over tasks of
    P(X_t > Y_t) + 0.5 P(X_t = Y_t), counted exactly over all N*M pairs of runs (the Mann-Whitney
    U statistic over N*M, as rliable's `probability_of_improvement`). The counts of all tasks are
    summed before one division, so PoI(x, x) == 0.5 and PoI(x, y) + PoI(y, x) == 1 hold exactly.
    x [..., N, T], y [..., M, T] (same leading axes) -> [...]."""
    x, y = _scores(x, "x"), _scores(y, "y")
    if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x {x.shape} and y {y.shape} must share the leading axes and the "
                         "number of tasks (the last axis)")
    n, m, t = x.shape[-2], y.shape[-2], x.shape[-1]
    ranks = scipy.stats.rankdata(np.concatenate([x, y], axis=-2), axis=-2)  # ties: mean rank
    u = ranks[..., :n, :].sum(axis=(-2, -1)) - t * n * (n + 1) / 2  # half-integers, exact
    return u / (n * m * t)


def performance_profile(scores, taus) -> np.ndarray:
    """Run-score distribution (rliable's `create_performance_profile` default): for each
    threshold tau, the fraction of all (run, task) scores above tau, i.e. the mean over tasks of
    the fraction of runs above tau. scores [..., R, T], taus [K] -> [..., K]."""
    x, t = _scores(scores), _taus(taus)
    flat = x.reshape(x.shape[:-2] + (-1, 1))
    return (flat > t).mean(axis=-2)


# ---------------------------------------------------------------- stratified bootstrap
def stratified_bootstrap_indices(rng: np.random.Generator, num_runs: int, num_tasks: int,
                                 reps: int) -> np.ndarray:
    """Run indices of `reps` stratified bootstrap resamples: for every resample and task,
    num_runs indices drawn with replacement from that task's runs, independently per task.
    -> int array [reps, num_runs, num_tasks]. Successive calls continue the stream of `rng`, so
    drawing 2 * n resamples at once or n twice gives the same indices."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a np.random.Generator, got {type(rng).__name__}")
    if min(num_runs, num_tasks) < 1 or reps < 1:
        raise ValueError(f"num_runs={num_runs}, num_tasks={num_tasks}, reps={reps}; "
                         "all must be >= 1")
    return rng.integers(0, num_runs, size=(reps, num_runs, num_tasks))


def resample(scores, idx) -> np.ndarray:
    """The resampled matrices out[b, r, t] = scores[idx[b, r, t], t].
    scores [R, T], idx int [reps, R', T] with values in [0, R) -> [reps, R', T]."""
    x = _scores(scores, batch=False)
    idx = np.asarray(idx)
    if (idx.ndim != 3 or idx.size == 0 or idx.shape[2] != x.shape[1]
            or idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= x.shape[0]):
        raise ValueError(f"idx (shape {idx.shape}, dtype {idx.dtype}) must be integer run "
                         f"indices [reps, runs, {x.shape[1]}] in [0, {x.shape[0]})")
    return x[idx, np.arange(x.shape[1])]


def percentile_interval(replicates, confidence: float = 0.95) -> np.ndarray:
    """Percentile confidence interval of bootstrap replicates [reps, ...] -> [2, ...] (lower,
    upper): the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles with linear
    interpolation, as arch's `conf_int(method='percentile')` that rliable calls."""
    _confidence(confidence)
    alpha = (1.0 - confidence) / 2
    return np.percentile(np.asarray(replicates), 100 * np.array([alpha, 1.0 - alpha]), axis=0)


def _replicates(stat: Callable, samples, rngs, reps: int, chunk: int) -> np.ndarray:
    """stat(*resamples) of `reps` stratified resamples of each matrix in `samples` (each with its
    own generator), `chunk` resamples at a time -> [reps, ...]."""
    out = []
    for start in range(0, reps, chunk):
        n = min(chunk, reps - start)
        out.append(stat(*(resample(s, stratified_bootstrap_indices(g, *s.shape, n))
                          for s, g in zip(samples, rngs))))
    return np.concatenate(out)


def interval_estimates(score_dict: Mapping, fn: Callable = aggregate, reps: int = 50_000,
                       confidence: float = 0.95, seed: int = 0, chunk: int = 1000):
    """Point estimates and stratified-bootstrap percentile confidence intervals of `fn` for each
    algorithm, as `rliable.library.get_interval_estimates` (Agarwal et al. 2021).

    fn maps [..., R, T] -> [..., *out] (every metric of this module does; default `aggregate`).
    Each algorithm is resampled with its own fresh `np.random.default_rng(seed)`, so its interval
    depends only on its scores, reps, confidence and seed (not on the other algorithms; two with
    the same shape share their index draws). Returns (points {name: [*out]},
    cis {name: [2, *out]} with lower and upper bounds)."""
    scores = _score_dict(score_dict)
    _bootstrap_args(reps, confidence, chunk)
    points, cis = {}, {}
    for name, x in scores.items():
        points[name] = np.asarray(fn(x))
        values = _replicates(fn, [x], [np.random.default_rng(seed)], reps, chunk)
        cis[name] = percentile_interval(values, confidence)
    return points, cis


def probability_of_improvement_interval(x, y, reps: int = 2000, confidence: float = 0.95,
                                        seed: int = 0, chunk: int = 1000):
    """`probability_of_improvement(x, y)` and its percentile confidence interval, with x [N, T]
    and y [M, T] resampled independently within each task (rliable's
    StratifiedIndependentBootstrap). x and y draw from the two children of
    `np.random.SeedSequence(seed)`. -> (point: float, ci: [2] lower and upper)."""
    x, y = _scores(x, "x", batch=False), _scores(y, "y", batch=False)
    _bootstrap_args(reps, confidence, chunk)
    point = float(probability_of_improvement(x, y))
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]
    values = _replicates(probability_of_improvement, [x, y], rngs, reps, chunk)
    return point, percentile_interval(values, confidence)


def performance_profile_interval(score_dict: Mapping, taus, reps: int = 2000,
                                 confidence: float = 0.95, seed: int = 0, chunk: int = 1000):
    """Run-score distributions `performance_profile` at thresholds taus [K] for each algorithm,
    with stratified-bootstrap percentile intervals (rliable's `create_performance_profile`;
    streams as in `interval_estimates`). -> (points {name: [K]}, cis {name: [2, K]})."""
    t = _taus(taus)
    return interval_estimates(score_dict, lambda s: performance_profile(s, t), reps, confidence,
                              seed, chunk)


# ---------------------------------------------------------------- normalisation
def normalise_dmc(returns) -> np.ndarray:
    """DeepMind Control returns (0..1000 per episode) as scores in [0, 1]: returns / 1000."""
    r = np.asarray(returns, dtype=np.float64)
    if not np.all(np.isfinite(r)):
        raise ValueError("returns hold NaN or infinite values; they must be finite")
    return r / 1000.0


def normalise_atari(returns, random, human) -> np.ndarray:
    """Human-normalised Atari scores (returns - random) / (human - random), with the per-game
    random and human scores broadcast against returns (e.g. returns [R, T], random/human [T])."""
    r, lo, hi = (np.asarray(a, dtype=np.float64) for a in (returns, random, human))
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("returns, random and human must be finite")
    if np.any(hi == lo):
        raise ValueError("human equals random for some game; normalising needs human != random")
    return (r - lo) / (hi - lo)
