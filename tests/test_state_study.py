"""experiments.state_study end to end at toy size: child processes per (task, variant), CSVs,
plot, table, command, and resuming a finished study without training again."""
import csv
import os
import subprocess
import sys


def _study(out_dir, *extra):
    args = [sys.executable, "-m", "experiments.state_study", "--tasks=cartpole_swingup",
            "--variants=state_flare", "--seeds=0,1", "--env_steps=1600", "--evals=2",
            "--eval_episodes=1", f"--out_dir={out_dir}", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_study_writes_results_and_resumes(tmp_path):
    out = _study(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for variant in ("state_flare",):
        for seed in (0, 1):
            with open(tmp_path / "cartpole_swingup" / variant / f"seed_{seed}" / "eval.csv") as f:
                rows = list(csv.DictReader(f))
            assert [int(r["step"]) for r in rows] == [800, 1600]
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    table = (tmp_path / "final_returns.md").read_text()
    assert "| state-Flare |" in table and "cartpole_swingup" in table
    command = (tmp_path / "command.txt").read_text().splitlines()
    assert command == [f"python -m experiments.state_study --tasks=cartpole_swingup "
                       f"--variants=state_flare --seeds=0,1 --env_steps=1600 "
                       f"--evals=2 --eval_episodes=1 --out_dir={tmp_path}"]
    again = _study(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done, skipped") == 1 and "[sac] task" not in again.stdout


def test_unknown_variant_lists_the_valid_ones(tmp_path):
    out = _study(tmp_path, "--variants=state_full,velocity_only")
    assert out.returncode != 0
    assert "unknown variant 'velocity_only'" in out.stderr and "state_recurrent" in out.stderr


def _long_study(out_dir):
    return [sys.executable, "-m", "experiments.state_study", "--tasks=cartpole_swingup",
            "--variants=state_flare", "--seeds=0", "--env_steps=400000", f"--out_dir={out_dir}"]


def _start_training(args):
    """A study process whose child has started training."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("[sac] replay"):
            break
    return proc


def test_sigterm_stops_the_study_and_its_child(tmp_path):
    import signal
    import time
    proc = _start_training(_long_study(tmp_path))
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    left = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the child process outlived the study"


def test_summary_tables_give_returns_and_shares_of_full_state(tmp_path):
    from experiments.state_study import summarise
    finals = {"state_full": (800.0, 600.0), "state_flare": (700.0, 500.0)}   # seeds 0, 1
    for variant, values in finals.items():
        (tmp_path / "cartpole_swingup" / variant).mkdir(parents=True)
        (tmp_path / "cartpole_swingup" / variant / "config.json").write_text(   # as runs write it
            '{"agent": "sac", "config": {"task": "cartpole_swingup", "sac": {"encoder": "%s"}}}' % variant)
        for seed, final in enumerate(values):
            d = tmp_path / "cartpole_swingup" / variant / f"seed_{seed}"
            d.mkdir(parents=True)
            (d / "eval.csv").write_text(
                "step,agent_steps,return_mean,return_std,episodes,eval_seconds,wall_seconds\n"
                f"1000,125,10.0,0,5,0,0\n2000,250,{final},0,5,0,0\n")
    table, png = summarise(["cartpole_swingup"], ["state_full", "state_position", "state_flare"],
                           str(tmp_path))
    assert "| full-state SAC | 700.0 +- 100.0 |" in table and "| position only | - |" in table
    md = (tmp_path / "final_returns.md").read_text()
    assert "| state-Flare | 600.0 +- 100.0 |" in md
    assert "| state-Flare | 86% |" in md and "| full-state SAC | 100% |" in md   # 600 / 700
    assert "cartpole_swingup: 2,000" in md and os.path.exists(png)


def test_a_killed_study_takes_its_child_along_and_a_second_study_is_refused(tmp_path):
    import signal
    import time
    args = _long_study(tmp_path)
    proc = _start_training(args)
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"in use by a running process (PID {proc.pid})" in second.stderr
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)          # no handler of the study runs
    proc.wait(timeout=60)
    deadline = time.time() + 120
    while time.time() < deadline:
        left = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}"], capture_output=True, text=True)
        if not left.stdout.strip():
            break
        time.sleep(1)
    assert not left.stdout.strip(), "the child process outlived the killed study"
    # the child stopped on the SIGTERM its death signal sent, and saved where it was
    assert os.listdir(tmp_path / "cartpole_swingup" / "state_flare" / "checkpoints")
