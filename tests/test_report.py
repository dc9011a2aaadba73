"""experiments.report and experiments.scores: run discovery and its errors, normalisation, the
aggregate table (reproducible byte for byte), the published-table comparison, curves."""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from experiments import flow, report
from experiments import scores as sc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(root, task="cartpole_swingup", encoder="state_full", seeds=(0, 1, 2),
             steps=(50_000, 100_000), returns=None, agent="sac", seed_configs=False):
    """A run directory like the launchers write: config.json and seed_<s>/eval.csv."""
    os.makedirs(root, exist_ok=True)
    cfg = ({"task": task, "sac": {"encoder": encoder}} if agent == "sac"
           else {"game": task, "rainbow": {"torso": encoder}})
    record = json.dumps({"agent": agent, "config": cfg})
    if not seed_configs:
        with open(os.path.join(root, "config.json"), "w") as f:
            f.write(record)
    for i, s in enumerate(seeds):
        d = os.path.join(root, f"seed_{s}")
        os.makedirs(d, exist_ok=True)
        if seed_configs:
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(record)
        ys = returns[i] if returns is not None else [100.0 * (k + 1) + s for k in range(len(steps))]
        with open(os.path.join(d, "eval.csv"), "w") as f:
            f.write("step,agent_steps,return_mean\n")
            for st, y in zip(steps, ys):
                f.write(f"{st},{st // 8},{y}\n")
    return root


def study(tmp_path, variants=("state_full", "state_flare"), tasks=("cartpole_swingup", "cheetah_run")):
    rng = np.random.default_rng(0)
    for t in tasks:
        for k, v in enumerate(variants):
            make_run(str(tmp_path / "study" / t / v), task=t, encoder=v,
                     returns=rng.uniform(100 + 300 * k, 500 + 300 * k, size=(3, 2)),
                     seed_configs=True)
    return str(tmp_path / "study")


def test_runs_are_found_with_task_variant_and_seed_from_their_config(tmp_path):
    root = study(tmp_path)
    groups = sc.group_runs(sc.find_runs([root]))
    assert sorted(groups) == [(t, v) for t in ("cartpole_swingup", "cheetah_run")
                              for v in ("state_flare", "state_full")]
    runs = groups["cheetah_run", "state_flare"]
    assert [r.seed for r in runs] == [0, 1, 2] and runs[0].unit == "env steps"
    np.testing.assert_array_equal(runs[0].steps, [50_000, 100_000])
    labelled = sc.group_runs(sc.find_runs([f"mine={root}/cartpole_swingup/state_full"]))
    assert list(labelled) == [("cartpole_swingup", "mine")]


def test_runs_with_different_step_grids_are_refused_naming_them(tmp_path):
    make_run(str(tmp_path / "a"), seeds=(0,), steps=(10_000, 20_000))
    make_run(str(tmp_path / "b"), seeds=(1,), steps=(10_000, 30_000))
    with pytest.raises(ValueError, match=r"different step grids: .*a/seed_0/eval.csv.*b/seed_1"):
        sc.group_runs(sc.find_runs([str(tmp_path / "a"), str(tmp_path / "b")]))
    make_run(str(tmp_path / "c"), seeds=(0,), steps=(10_000, 20_000))
    with pytest.raises(ValueError, match="seed 0 of cartpole_swingup / state_full is given twice"):
        sc.group_runs(sc.find_runs([str(tmp_path / "a"), str(tmp_path / "c")]))


def test_missing_and_malformed_runs_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sc.find_runs([str(tmp_path / "nothing")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no seed_"):
        sc.find_runs([str(tmp_path / "empty")])
    os.makedirs(tmp_path / "noconf" / "seed_0")
    (tmp_path / "noconf" / "seed_0" / "eval.csv").write_text("step,return_mean\n1,2\n")
    with pytest.raises(ValueError, match="no config.json"):
        sc.find_runs([str(tmp_path / "noconf")])
    root = make_run(str(tmp_path / "bad"), seeds=(0,))
    with open(os.path.join(root, "seed_0", "eval.csv"), "a") as f:
        f.write("150000,1,nan\n")
    with pytest.raises(ValueError, match="line 4: return_mean is nan"):
        sc.find_runs([root])


def test_normalisation_dmc_atari_gym():
    np.testing.assert_allclose(sc.normalise("sac", "walker_run", [0.0, 500.0, 1000.0]), [0, 0.5, 1])
    np.testing.assert_allclose(sc.normalise("rainbow", "pong", [-20.7, 14.6]), [0.0, 1.0])
    np.testing.assert_allclose(sc.normalise("rainbow", "CartPole-v1", [250.0]), [0.5])
    with pytest.raises(ValueError, match="no normalisation for rainbow task 'Pongg'"):
        sc.normalise("rainbow", "Pongg", [1.0])
    table = sc.published()["normalisation"]["atari"]["random_human"]
    assert len(table) == 57 and table["breakout"] == [1.7, 30.5]


def test_aggregate_table_is_reproducible_and_a_variant_against_itself_is_half(tmp_path):
    root = study(tmp_path)
    groups = report.load([root])
    a = report.aggregate_report(groups, str(tmp_path / "o1"), compare=["state_flare:state_full",
                                "state_full:state_full"], reps=2000, seed=3)
    b = report.aggregate_report(groups, str(tmp_path / "o2"), compare=["state_flare:state_full",
                                "state_full:state_full"], reps=2000, seed=3)
    assert a == b == (tmp_path / "o1" / "aggregate.md").read_text()
    assert "| full-state SAC | full-state SAC | 0.500 [" in a
    assert os.path.getsize(tmp_path / "o1" / "aggregate.png") > 10_000
    # state_flare's returns were drawn 300 higher on every task: it improves on full state
    poi = float(re.search(r"\| state-Flare \| full-state SAC \| ([\d.]+)", a).group(1))
    assert poi > 0.7
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        report.aggregate_report(groups, str(tmp_path / "o3"), compare=["nope:state_full"], reps=10)


def test_aggregate_refuses_tasks_that_end_at_different_steps(tmp_path):
    make_run(str(tmp_path / "r" / "a"), encoder="state_full", steps=(50_000, 100_000))
    make_run(str(tmp_path / "r" / "b"), encoder="state_flare", steps=(50_000, 90_000))
    groups = report.load([str(tmp_path / "r")])
    with pytest.raises(ValueError, match="different steps .*--at=STEP"):
        report.aggregate_report(groups, str(tmp_path / "o"), reps=10)
    md = report.aggregate_report(groups, str(tmp_path / "o"), at=50_000, reps=10)
    assert "cartpole_swingup at 50,000 env steps" in md


def test_table_marks_a_published_number_outside_our_ci(tmp_path):
    # the state_sac table: cartpole_swingup full-state SAC ~835 at 100k env steps
    near = make_run(str(tmp_path / "near"), returns=[[0, 830], [0, 840], [0, 836]])
    md = report.table_report(report.load([near]), str(tmp_path / "o"), "state_sac", reps=2000)
    row = [l for l in md.splitlines() if l.startswith("| cartpole_swingup")][0]
    assert row.endswith("| yes |") and "835" in row
    far = make_run(str(tmp_path / "far"), returns=[[0, 500], [0, 520], [0, 510]])
    md = report.table_report(report.load([far]), str(tmp_path / "o"), "state_sac", reps=2000)
    row = [l for l in md.splitlines() if l.startswith("| cartpole_swingup")][0]
    assert row.endswith("| **no** |") and "| -325.0 |" in row
    short = make_run(str(tmp_path / "short"), steps=(10_000, 20_000))
    md = report.table_report(report.load([short]), str(tmp_path / "o"), "state_sac", reps=10)
    assert "not reached (our last evaluation: 20,000)" in md
    with pytest.raises(ValueError, match="no published number of flare_table1"):
        report.table_report(report.load([near]), str(tmp_path / "o"), "flare_table1", reps=10)


def test_curves_draw_every_task_with_the_published_markers(tmp_path):
    root = study(tmp_path)
    png = report.plot_curves(report.load([root]), str(tmp_path / "c.png"), paper="state_sac", reps=200)
    import matplotlib.image  # pylint: disable=g-import-not-at-top
    h, w, _ = matplotlib.image.imread(png).shape
    assert w > 2 * h > 500      # two task panels side by side


def test_bootstrap_band_contains_the_mean_and_is_zero_width_for_equal_seeds():
    y = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 5.0], [2.0, 2.0, 4.0]])
    mean, ci = report.mean_band(y, reps=2000, seed=0)
    np.testing.assert_allclose(mean, [2.0, 2.0, 4.0])
    assert np.all(ci[0] <= mean) and np.all(mean <= ci[1])
    assert ci[0, 1] == ci[1, 1] == 2.0 and ci[1, 0] - ci[0, 0] > 0.5


def test_flow_pictures_of_a_frame_stack_encoder_are_refused(tmp_path):
    make_run(str(tmp_path / "fs"), encoder="frame_stack")
    with pytest.raises(ValueError, match="'frame_stack' computes no latent flow"):
        flow.flow_report(str(tmp_path / "fs"), str(tmp_path / "o"))
    make_run(str(tmp_path / "st"), encoder="state_flare")
    with pytest.raises(ValueError, match="needs? .*pixel Flare run"):
        flow.check_flow_run(str(tmp_path / "st"))


def test_the_committed_aggregate_table_is_reproduced_byte_for_byte(tmp_path):
    """results/state_study/large/aggregate.md ends with the command that made it."""
    committed = os.path.join(ROOT, "results", "state_study", "large", "aggregate.md")
    text = open(committed).read()
    command = re.search(r"Made by `python -m experiments.report (.*)`", text).group(1)
    args = shlex.split(command) + [f"--out={tmp_path}"]
    subprocess.run([sys.executable, "-m", "experiments.report", *args], cwd=ROOT, check=True,
                   capture_output=True)
    assert (tmp_path / "aggregate.md").read_text() == text
