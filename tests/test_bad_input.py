"""Bad input to the launchers is refused before any work starts: one line on stderr naming the
problem (and the valid choices), no traceback, exit status 2.

All cases run as real launcher processes, four at a time (module-scoped fixture); each case is
its own test."""
import os
import subprocess
import sys
import time

import pytest

from flare_jax.runtime import RunDirLock

SAC, RAINBOW = "experiments.train_sac", "experiments.train_rainbow"
STUDY, REPORT = "experiments.state_study", "experiments.report"
STATE = ["--preset=state"]

# id: (module, args, words the error line must contain); {tmp} is a per-case directory
CASES = {
    "pixel_encoder_without_pixels": (SAC, ["--preset=flare", "--pixels=false"],
                                     ["takes pixels but --pixels=false", "state_full"]),
    "state_encoder_with_pixels": (SAC, STATE + ["--pixels=true"], ["not pixels", "frame_stack"]),
    "out_dir_is_a_file": (SAC, STATE + ["--out_dir={tmp}/file"], ["is a file"]),
    "out_dir_not_writable": (SAC, STATE + ["--out_dir=/proc/flare_jax_test/run"], ["not writable"]),
    "action_repeat_zero": (SAC, STATE + ["--action_repeat=0"], ["action_repeat must be >= 1"]),
    "num_frames_zero": (SAC, ["--preset=flare", "--num_frames=0"], ["num_frames must be >= 1"]),
    "n_step_zero": (RAINBOW, ["--n_step=0"], ["n_step must be >= 1"]),
    "sac_learning_rate_zero": (SAC, STATE + ["--critic_lr=0"], ["critic_lr must be > 0"]),
    "rainbow_learning_rate_negative": (RAINBOW, ["--learning_rate=-1"], ["learning_rate must be > 0"]),
    "tau_above_one": (SAC, STATE + ["--encoder_tau=1.5"], ["encoder_tau must lie in (0, 1]"]),
    "tau_zero": (SAC, STATE + ["--critic_tau=0"], ["critic_tau must lie in (0, 1]"]),
    "init_temperature_zero": (SAC, STATE + ["--init_temperature=0"], ["init_temperature must be > 0"]),
    "replay_smaller_than_batch": (SAC, STATE + ["--replay_capacity=100"], ["must be >= batch_size"]),
    "replay_smaller_than_min_replay": (RAINBOW, ["--replay_capacity=1000"], ["must be >= min_replay"]),
    "eval_frames_zero": (RAINBOW, ["--eval_frames=0"], ["eval_frames must be >= 1"]),
    "eval_episodes_zero": (SAC, STATE + ["--eval_episodes=0"], ["eval_episodes must be >= 1"]),
    "duplicate_seeds_sac": (SAC, STATE + ["--seeds=0,0"], ["seeds must be distinct"]),
    "duplicate_seeds_rainbow": (RAINBOW, ["--seeds=1,2,1"], ["seeds must be distinct"]),
    "frames_not_a_multiple_of_the_frame_skip": (RAINBOW, ["--frames=1001"], ["multiple of the frame skip"]),
    "unknown_task_names_the_valid_ones": (SAC, STATE + ["--task=walker_runn"], ["walker_run", "cartpole_swingup"]),
    "unknown_game_names_the_valid_ones": (RAINBOW, ["--game=pongg"], ["pong", "breakout"]),
    "unknown_preset": (SAC, ["--preset=nope"], ["unknown preset 'nope'", "flare_paper"]),
    "torso_does_not_fit_the_game": (RAINBOW, ["--preset=cartpole", "--torso=atari_flare"], ["--torso=mlp"]),
    "mesh_syntax": (SAC, STATE + ["--mesh=seeds:2"], ["expected seed:S,data:D"]),
    "mesh_seed_axis_does_not_divide_the_seeds": (SAC, STATE + ["--seeds=0,1,2", "--mesh=seed:2"],
                                                 ["valid seed-axis sizes for 3 seeds: 1, 3"]),
    "mesh_more_devices_than_visible": (RAINBOW, ["--mesh=data:2"], ["needs 2 devices", "JAX_NUM_CPU_DEVICES"]),
    "process_id_without_coordinator": (SAC, STATE + ["--process_id=1"], ["need --coordinator_address"]),
    "checkpoint_every_zero": (SAC, STATE + ["--checkpoint_every=0"], ["checkpoint_every must be >= 1"]),
    "resume_false_with_a_used_out_dir": (SAC, STATE + ["--resume=false", "--out_dir={tmp}/used"],
                                         ["is not empty and --resume=false"]),
    "out_dir_in_use": (SAC, STATE + ["--out_dir={tmp}/locked"], ["in use by a running process (PID"]),
    # 8 seeds x 150M transitions of 5 floats (33 bytes a slot): ~40 GB, on a 24 GB machine
    "replay_does_not_fit_for_all_seeds": (SAC, STATE + ["--seeds=0,1,2,3,4,5,6,7",
                                                        "--replay_capacity=150000000",
                                                        "--eval_episodes=1", "--out_dir={tmp}/run"],
                                          ["does not fit", "x 8 seed(s)"]),
    "study_unknown_variant": (STUDY, ["--tasks=cartpole_swingup", "--variants=velocity_only",
                                      "--out_dir={tmp}/study"], ["unknown variant 'velocity_only'",
                                                                 "state_recurrent"]),
    "study_env_steps_zero": (STUDY, ["--tasks=cartpole_swingup", "--env_steps=0",
                                     "--out_dir={tmp}/study"], ["env_steps must be >= 1"]),
    "study_unknown_task": (STUDY, ["--tasks=cartpole_swingdown", "--out_dir={tmp}/study"],
                           ["unknown DMC task", "cartpole_swingup"]),
    "report_missing_run_dir": (REPORT, ["curves", "--runs={tmp}/nothing", "--out={tmp}/out"],
                               ["does not exist"]),
    "report_malformed_csv": (REPORT, ["aggregate", "--runs={tmp}/bad", "--out={tmp}/out"],
                             ["line 3: bad row"]),
    "report_no_eval_csv": (REPORT, ["table", "--runs={tmp}/bad", "--out={tmp}/out"],
                           ["has no eval.csv"]),
    "report_unknown_subcommand": (REPORT, ["histogram", "--out={tmp}/out"],
                                  ["give one subcommand", "aggregate", "flow"]),
    "report_unknown_published_table": (REPORT, ["table", "--runs={tmp}/bad", "--table=table9",
                                                "--out={tmp}/out"], ["unknown published table", "flare_table1"]),
    "report_flow_of_frame_stack": (REPORT, ["flow", "--run={tmp}/bad", "--out={tmp}/out"],
                                   ["computes no latent flow", "flare"]),
}


def _prepare(name: str, tmp: str):
    if name == "out_dir_is_a_file":
        open(os.path.join(tmp, "file"), "w").close()
    if name == "resume_false_with_a_used_out_dir":
        os.makedirs(os.path.join(tmp, "used"))
        open(os.path.join(tmp, "used", "config.json"), "w").write("{}")
    if name.startswith("report_"):     # a frame-stack SAC run whose eval.csv is malformed
        os.makedirs(os.path.join(tmp, "bad", "seed_0"))
        with open(os.path.join(tmp, "bad", "config.json"), "w") as f:
            f.write('{"agent": "sac", "config": {"task": "cartpole_swingup", '
                    '"sac": {"encoder": "frame_stack"}}}')
        if name != "report_no_eval_csv":
            with open(os.path.join(tmp, "bad", "seed_0", "eval.csv"), "w") as f:
                f.write("step,return_mean\n1000,1.5\n2000,oops\n")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run as a launcher process, four at a time: {name: (returncode, output)}."""
    env = dict(os.environ, FLARE_JAX_TCMALLOC="0")
    pending, running, done = list(CASES), {}, {}
    lock_dir = tmp_path_factory.mktemp("locked")
    with RunDirLock(str(lock_dir / "locked")):      # held by this process during the cases
        while pending or running:
            while pending and len(running) < 4:
                name = pending.pop(0)
                module, args, _ = CASES[name]
                tmp = str(lock_dir) if name == "out_dir_in_use" else str(tmp_path_factory.mktemp(name))
                _prepare(name, tmp)
                args = [a.replace("{tmp}", tmp) for a in args]
                running[name] = subprocess.Popen([sys.executable, "-m", module, *args],
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, env=env)
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    done[name] = (proc.returncode, out, err)
                    del running[name]
            time.sleep(0.05)
    return done


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_in_one_line(outcomes, name):
    code, out, err = outcomes[name]
    _, _, words = CASES[name]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    if name.startswith("study_"):         # refused by the study itself: no run was started
        assert "[sac]" not in out and "attempt" not in out + err
    if name == "out_dir_in_use":
        assert f"PID {os.getpid()}" in lines[0]
