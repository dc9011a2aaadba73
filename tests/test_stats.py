"""flare_jax.stats against rliable 1.2.0 (the reference implementation of Agarwal et al. 2021).

rliable draws its bootstrap indices with the global legacy generator (`np.random.choice` in
`StratifiedBootstrap.update_indices`; its `random_state` argument does not reach them), so after
`np.random.seed(s)` its resamples are reproducible: the tests draw the same indices, pass them
through `stats.resample`, the batched metrics and `stats.percentile_interval`, and require
rliable's intervals exactly. `stats.interval_estimates` itself draws from
`np.random.default_rng(seed)`, so against rliable it agrees only up to bootstrap noise (the
tolerances are derived where they are used).
"""
import contextlib
import warnings

import numpy as np
import pytest
import rliable.library as rly
import rliable.metrics as rm

from flare_jax import stats




@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _rliable_aggregate(s):
    return np.array([rm.aggregate_iqm(s), rm.aggregate_mean(s), rm.aggregate_median(s),
                     rm.aggregate_optimality_gap(s)])


def _matrices():
    """Fixed [R, T] score matrices: continuous, with ties, above 1 and below 0, odd and even
    task counts, one run, fewer than 4 scores, a constant matrix."""
    g = np.random.default_rng(20210913)
    return [
        g.uniform(0.0, 1.0, (10, 26)),
        g.uniform(-0.2, 1.8, (5, 7)),                  # scores above 1 (clipped by the gap)
        g.integers(0, 5, (8, 6)) / 4.0,                # many ties, values in {0, .25, .., 1}
        np.round(g.normal(1.0, 0.5, (3, 57)), 1),      # ties and above 1, Atari-57 sized
        g.lognormal(0.0, 1.0, (1, 9)),                 # one run
        g.uniform(0.0, 2.0, (1, 3)),                   # fewer than 4 scores: nothing trimmed
        np.full((4, 5), 0.7),
    ]


# ---------------------------------------------------------------- point estimates
@pytest.mark.parametrize("i", range(len(_matrices())))
def test_point_estimates_equal_rliable(i):
    x = _matrices()[i]
    np.testing.assert_allclose(stats.iqm(x), rm.aggregate_iqm(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.mean(x), rm.aggregate_mean(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.median(x), rm.aggregate_median(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.optimality_gap(x), rm.aggregate_optimality_gap(x),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.optimality_gap(x, gamma=1.5),
                               rm.aggregate_optimality_gap(x, gamma=1.5), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.aggregate(x), _rliable_aggregate(x), rtol=0, atol=1e-12)
    assert stats.aggregate(x).shape == (len(stats.METRICS),)


def test_metrics_of_a_batch_equal_the_metric_of_each_matrix():
    x = np.stack(_matrices()[1:2] * 3) + np.arange(3)[:, None, None]
    out = stats.aggregate(x)
    assert out.shape == (3, 4)
    for b in range(3):
        np.testing.assert_array_equal(out[b], stats.aggregate(x[b]))


# ---------------------------------------------------------------- stratified bootstrap
def test_stratified_bootstrap_resamples_runs_within_each_task():
    runs, tasks, reps = 6, 5, 400
    x = 100.0 * np.arange(tasks) + np.arange(runs)[:, None]  # column t holds 100t .. 100t+5
    idx = stats.stratified_bootstrap_indices(np.random.default_rng(0), runs, tasks, reps)
    assert idx.shape == (reps, runs, tasks) and idx.min() >= 0 and idx.max() < runs
    out = stats.resample(x, idx)
    assert out.shape == (reps, runs, tasks)
    for t in range(tasks):
        assert set(np.unique(out[..., t])) <= set(x[:, t])
    np.testing.assert_array_equal(out, 100.0 * np.arange(tasks) + idx)
    counts = np.stack([np.bincount(idx[b, :, t], minlength=runs)
                       for b in range(reps) for t in range(tasks)])
    assert np.all(counts.sum(axis=1) == runs)
    # Tasks are resampled independently: their draws differ, and every run gets drawn.
    for t in range(1, tasks):
        assert not np.array_equal(idx[..., 0], idx[..., t])
    assert np.all(np.bincount(idx.ravel(), minlength=runs) > 0)
    # The stream continues across calls: chunks equal one draw.
    g = np.random.default_rng(0)
    chunks = [stats.stratified_bootstrap_indices(g, runs, tasks, n) for n in (1, 99, 300)]
    np.testing.assert_array_equal(np.concatenate(chunks), idx)


def test_pipeline_equals_rliable_exactly_on_rliable_indices():
    """rliable's intervals for all four aggregates, reproduced bit for bit from its own draws."""
    reps = 1500
    for x in _matrices()[:4]:
        np.random.seed(11)
        with _quiet():
            point, ci = rly.get_interval_estimates({"a": x}, _rliable_aggregate, reps=reps)
        np.random.seed(11)
        idx = np.random.choice(x.shape[0], (reps,) + x.shape, replace=True)
        np.testing.assert_array_equal(point["a"], stats.aggregate(x))
        mine = stats.percentile_interval(stats.aggregate(stats.resample(x, idx)), 0.95)
        np.testing.assert_array_equal(ci["a"], mine)


def test_interval_estimates_agree_with_rliable_within_bootstrap_noise():
    """Independent draws: the 2.5% / 97.5% percentile of n replicates has standard error about
    sqrt(.025 * .975 / n) / phi(1.96) * sd = 0.027 sd at n = 10,000 (rliable) and 0.012 sd at
    n = 50,000 (ours), 0.029 sd for the difference. The bootstrap sd of every aggregate of this
    matrix is below 0.07 (asserted), so the difference has standard error below 0.002 and the
    tolerance 0.012 is 6 of them (over rliable seeds 0-2 the largest difference was 0.0027)."""
    scores = {"a": np.random.default_rng(5).uniform(0.0, 1.5, (10, 8))}
    with _quiet():
        np.random.seed(0)
        ref_points, ref_cis = rly.get_interval_estimates(scores, _rliable_aggregate, reps=10_000)
    points, cis = stats.interval_estimates(scores, reps=50_000, seed=0)
    for k in scores:
        np.testing.assert_array_equal(points[k], ref_points[k])
        assert cis[k].shape == (2, 4) and np.all(cis[k][0] <= points[k] + 1e-12)
        assert np.all(points[k] <= cis[k][1] + 1e-12)
        idx = stats.stratified_bootstrap_indices(np.random.default_rng(1), *scores[k].shape, 5000)
        assert np.all(stats.aggregate(stats.resample(scores[k], idx)).std(axis=0) < 0.07)
        np.testing.assert_allclose(cis[k], ref_cis[k], rtol=0, atol=0.012)


def test_interval_estimates_are_reproducible_per_algorithm_and_chunk_free():
    g = np.random.default_rng(3)
    a, b = g.uniform(0, 1, (7, 6)), g.uniform(0, 1, (4, 6))
    p1, c1 = stats.interval_estimates({"a": a}, reps=3000, seed=4)
    p2, c2 = stats.interval_estimates({"b": b, "a": a}, reps=3000, seed=4, chunk=7)
    np.testing.assert_array_equal(p1["a"], p2["a"])
    np.testing.assert_array_equal(c1["a"], c2["a"])
    # The documented stream: a fresh np.random.default_rng(seed) for each algorithm.
    idx = stats.stratified_bootstrap_indices(np.random.default_rng(4), *b.shape, 3000)
    np.testing.assert_array_equal(
        c2["b"], stats.percentile_interval(stats.aggregate(stats.resample(b, idx))))
    _, c3 = stats.interval_estimates({"a": a}, reps=3000, seed=5)
    assert not np.array_equal(c1["a"], c3["a"])
    _, c4 = stats.interval_estimates({"a": a}, stats.iqm, reps=3000, seed=4, confidence=0.5)
    assert c4["a"].shape == (2,) and c1["a"][0, 0] < c4["a"][0] < c4["a"][1] < c1["a"][1, 0]


# ---------------------------------------------------------------- probability of improvement
def _poi_pairs():
    g = np.random.default_rng(77)
    ties = lambda shape: g.integers(0, 4, shape) / 3.0  # noqa: E731
    return [
        (g.uniform(0, 1, (10, 5)), g.uniform(0, 1, (10, 5))),
        (g.uniform(0, 1.3, (6, 9)), g.uniform(0.2, 1, (11, 9))),
        (ties((5, 4)), ties((8, 4))),
        (ties((3, 26)), ties((3, 26))),
    ]


@pytest.mark.parametrize("i", range(len(_poi_pairs())))
def test_probability_of_improvement(i):
    x, y = _poi_pairs()[i]
    assert stats.probability_of_improvement(x, x) == 0.5
    assert stats.probability_of_improvement(y, y) == 0.5
    assert stats.probability_of_improvement(x, y) + stats.probability_of_improvement(y, x) == 1.0
    np.testing.assert_allclose(stats.probability_of_improvement(x, y),
                               rm.probability_of_improvement(x, y), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.probability_of_improvement(y, x),
                               rm.probability_of_improvement(y, x), rtol=0, atol=1e-12)
    assert stats.probability_of_improvement(x + 10.0, y) == 1.0
    assert stats.probability_of_improvement(x, y + 10.0) == 0.0


def test_probability_of_improvement_interval():
    x, y = _poi_pairs()[2][0], _poi_pairs()[2][1][:5]  # same runs, so one legacy draw serves both
    reps = 400
    np.random.seed(2)
    with _quiet():
        point, ci = rly.get_interval_estimates(
            {"xy": [x, y]}, lambda a, b: np.array([rm.probability_of_improvement(a, b)]),
            reps=reps)
    np.random.seed(2)
    idx = np.random.choice(5, (reps, 2) + x.shape, replace=True)  # per rep: x's, then y's
    values = stats.probability_of_improvement(stats.resample(x, idx[:, 0]),
                                              stats.resample(y, idx[:, 1]))
    np.testing.assert_allclose(stats.percentile_interval(values), ci["xy"][:, 0], rtol=0,
                               atol=1e-12)
    p, c = stats.probability_of_improvement_interval(x, y, reps=2000, seed=1)
    np.testing.assert_allclose(p, point["xy"][0], rtol=0, atol=1e-12)
    assert c.shape == (2,) and 0.0 <= c[0] <= p <= c[1] <= 1.0
    p2, c2 = stats.probability_of_improvement_interval(x, y, reps=2000, seed=1, chunk=3)
    assert p2 == p and np.array_equal(c2, c)
    gx, gy = (np.random.default_rng(s) for s in np.random.SeedSequence(1).spawn(2))
    values = stats.probability_of_improvement(
        stats.resample(x, stats.stratified_bootstrap_indices(gx, *x.shape, 2000)),
        stats.resample(y, stats.stratified_bootstrap_indices(gy, *y.shape, 2000)))
    np.testing.assert_array_equal(c, stats.percentile_interval(values))
    assert stats.probability_of_improvement_interval(x + 10, y, reps=50)[1].tolist() == [1, 1]


# ---------------------------------------------------------------- performance profiles
def test_performance_profile_equals_rliable():
    taus = np.linspace(-0.1, 2.0, 22)
    with _quiet():
        for x in _matrices():
            np.random.seed(0)
            ref, ref_ci = rly.create_performance_profile({"a": x}, taus, reps=300)
            np.random.seed(0)
            idx = np.random.choice(x.shape[0], (300,) + x.shape, replace=True)
            np.testing.assert_allclose(stats.performance_profile(x, taus), ref["a"], rtol=0,
                                       atol=1e-12)
            mine = stats.percentile_interval(stats.performance_profile(stats.resample(x, idx),
                                                                       taus))
            np.testing.assert_array_equal(mine, ref_ci["a"])


def test_performance_profile_interval_agrees_with_rliable_within_bootstrap_noise():
    """A profile value is a fraction of the R * T = 260 scores, with bootstrap sd below
    sqrt(.25 / 260) ~= 0.031 in any tau; 2,000 rliable replicates put the percentile's standard
    error near 0.06 sd ~= 0.002, and the values move on a lattice of 1 / 260 ~= 0.004: a tolerance
    of 0.02 is a few lattice steps and many standard errors."""
    scores = {"a": _matrices()[0]}
    taus = np.linspace(0.0, 1.0, 11)
    with _quiet():
        np.random.seed(1)
        ref, ref_ci = rly.create_performance_profile(scores, taus)  # reps=2000, its default
    points, cis = stats.performance_profile_interval(scores, taus, reps=20_000, seed=0)
    np.testing.assert_array_equal(points["a"], ref["a"])
    assert cis["a"].shape == (2, len(taus))
    np.testing.assert_allclose(cis["a"], ref_ci["a"], rtol=0, atol=0.02)


# ---------------------------------------------------------------- normalisation
def test_normalisation():
    np.testing.assert_array_equal(stats.normalise_dmc([[0.0, 500.0, 1000.0]]), [[0, 0.5, 1]])
    returns = np.array([[227.8, 30.0], [7127.7, 12.0]])  # e.g. Alien, Pong-like columns
    random, human = np.array([227.8, -20.7]), np.array([7127.7, 14.6])
    np.testing.assert_allclose(stats.normalise_atari(returns, random, human),
                               [[0.0, 50.7 / 35.3], [1.0, 32.7 / 35.3]], rtol=1e-12)


# ---------------------------------------------------------------- bad input
def test_bad_input_names_the_problem():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"shape \(4,\).*num_runs, num_tasks"):
        stats.iqm(np.zeros(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        stats.aggregate(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        stats.probability_of_improvement(x, np.full((2, 4), np.inf))
    with pytest.raises(ValueError, match="different numbers of tasks"):
        stats.interval_estimates({"a": x, "b": np.zeros((3, 5))}, reps=10)
    with pytest.raises(ValueError, match="number of tasks"):
        stats.probability_of_improvement(x, np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"score_dict\['a'\] has shape \(3, 4, 1\)"):
        stats.interval_estimates({"a": np.zeros((3, 4, 1))}, reps=10)
    with pytest.raises(ValueError, match="at least one run"):
        stats.mean(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="non-empty dict"):
        stats.interval_estimates({})
    with pytest.raises(ValueError, match="reps=0"):
        stats.interval_estimates({"a": x}, reps=0)
    with pytest.raises(ValueError, match="confidence=1.0"):
        stats.probability_of_improvement_interval(x, x, confidence=1.0)
    with pytest.raises(ValueError, match="confidence=0"):
        stats.percentile_interval(np.zeros(5), confidence=0)
    with pytest.raises(ValueError, match="taus"):
        stats.performance_profile(x, [[0.5]])
    with pytest.raises(ValueError, match=r"idx .* in \[0, 3\)"):
        stats.resample(x, np.full((2, 3, 4), 3))
    with pytest.raises(ValueError, match="np.random.Generator"):
        stats.stratified_bootstrap_indices(np.random.RandomState(0), 3, 4, 5)
    with pytest.raises(ValueError, match="human != random"):
        stats.normalise_atari(x, np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        stats.normalise_dmc([np.nan])
