"""The device mesh (seed and data axes) on 4 virtual CPU devices, multi-host on localhost, and a
sharded run killed and resumed. Each check runs in a fresh process (tests/mesh_cases.py): the
number of CPU devices is fixed when JAX starts."""
import csv
import os
import signal
import socket
import subprocess
import sys

import pytest

from flare_jax import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int, **extra):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), FLARE_JAX_TCMALLOC="0",
               PYTHONUNBUFFERED="1", **extra)
    # no persistent compilation cache: a sharded CPU program read back from it crashed jaxlib
    # 0.10.2 (segfault) in the run loop
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _case(name: str, *args, devices: int = 4, timeout: int = 900):
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_cases", name, *args], cwd=ROOT,
                          env=_env(devices), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"OK {name}" in out, out[-4000:]
    return out


def test_sac_update_on_a_data_axis_equals_the_one_device_update_on_the_whole_batch():
    _case("sac_update")


def test_rainbow_update_on_a_data_axis_equals_the_one_device_update_on_the_whole_batch():
    _case("rainbow_update")


@pytest.mark.parametrize("agent", ["sac", pytest.param("rainbow", marks=pytest.mark.slow)])
def test_runs_on_a_seed_axis_equal_the_one_device_vmapped_run(agent):
    _case("seed_axis", agent)


def test_each_replay_shard_holds_and_samples_only_its_own_envs():
    _case("replay_shards")


def test_stratified_per_frequencies_follow_priorities_across_shards():
    _case("per_shards")


def test_mesh_flag_is_parsed_and_bad_meshes_are_refused_with_the_valid_choices():
    assert mesh_lib.parse_spec("") == mesh_lib.MeshShape(1, 1)
    assert mesh_lib.parse_spec("data:4") == mesh_lib.MeshShape(1, 4)
    assert mesh_lib.parse_spec("data:2,seed:3") == mesh_lib.MeshShape(3, 2)
    assert mesh_lib.parse_spec("auto") is None
    r = lambda spec, **kw: mesh_lib.resolve(spec, **{**dict(num_seeds=4, num_envs=2,  # noqa: E731
                                                            batch_size=128, num_devices=4), **kw})
    assert r("auto") == mesh_lib.MeshShape(4, 1)
    assert r("auto", num_seeds=3) == mesh_lib.MeshShape(3, 1)
    assert r("auto", num_seeds=1, num_envs=4) == mesh_lib.MeshShape(1, 4)
    assert r("auto", num_seeds=1, num_envs=6) == mesh_lib.MeshShape(1, 2)
    for spec, kw, message in [
            ("seed:3", {}, "valid seed-axis sizes for 4 seeds: 1, 2, 4"),
            ("data:4", {}, "--num_envs=2 (per seed) must be divisible by the data axis (4 devices)"),
            ("data:2", dict(batch_size=5), "--batch_size=5 must be divisible by the data axis"),
            ("seed:4,data:2", {}, "needs 8 devices, 4 cpu device(s) are visible"),
            ("seed=2", {}, "expected seed:S,data:D"), ("model:2", {}, "expected seed:S,data:D"),
            ("seed:0", {}, "axis sizes must be >= 1")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            r(spec, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_multi_host_run_on_localhost(tmp_path):
    """2 processes x 2 CPU devices (gloo), mesh data:4, state SAC: both finish, process 0 alone
    writes, and both hold the same parameters."""
    port, out = str(_free_port()), str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.mesh_cases", "multihost", str(i), port, out],
                              cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0 and f"OK multihost {i}" in log, \
            f"process {i} failed; its log:\n{log[-3000:]}\nthe other's:\n{logs[1 - i][-3000:]}"
    digests = [[l for l in log.splitlines() if l.startswith("DIGEST")] for log in logs]
    assert digests[0] == digests[1] and len(digests[0]) == 1, (digests, logs[0][-2000:], logs[1][-2000:])
    evals = [[l for l in log.splitlines() if l.startswith("EVALS")] for log in logs]
    assert evals[0] == evals[1], evals
    assert "[sac] done" in logs[0] and "[sac]" not in logs[1], logs[1][-3000:]   # 1 logs nothing
    with open(os.path.join(out, "seed_0", "eval.csv")) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps)) and steps[-1] == 8 * 4 * 60     # one writer: no duplicates
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["160", "240"]


_SHARDED = ["--preset=state", "--task=cartpole_swingup", "--env_steps=1280", "--init_steps=40",
            "--eval_every=40", "--eval_episodes=1", "--batch_size=32", "--replay_capacity=400",
            "--hidden_dim=32", "--max_episode_steps=160", "--log_every=20", "--seeds=0,1",
            "--num_envs=2", "--stall_seconds=300"]


def _launch(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "experiments.train_sac", *_SHARDED,
                             f"--out_dir={out}", *extra], cwd=ROOT, env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_sharded_run_is_killed_and_resumes_on_its_mesh(tmp_path):
    out = tmp_path / "run"
    proc = _launch(out, "--mesh=seed:2,data:2")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "checkpoint at agent step 40" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=300)
    assert any("checkpoint at agent step 40" in l for l in seen), "".join(seen)[-3000:]
    # another data axis is refused in one line; the seed axis may change
    bad = _launch(out, "--mesh=seed:2,data:1")
    log, _ = bad.communicate(timeout=300)
    assert bad.returncode == 2 and "Traceback" not in log
    assert "written on a data axis of 2" in log, log[-2000:]
    proc = _launch(out, "--mesh=seed:1,data:2")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "resuming from" in log and "agent step 40" in log and "final evaluation at 1,280" in log
    with open(out / "seed_1" / "eval.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [320 * k for k in range(1, 5)]
