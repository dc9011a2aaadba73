"""`make run`: the default experiment, a CPU-sized run of the paper's state-space study.

Full-state, position-only and state-Flare SAC on two DMC tasks from states, 3 seeds each (vmapped
in one process per task/variant), then the table of final returns and the learning-curve plot.
It is `experiments.state_study` with smaller defaults, sized to finish in under ~20 minutes on a
2-core CPU; any of its flags can be given. Output: runs/default_state_study (resumed if
interrupted).
"""
from __future__ import annotations

from absl import flags

from experiments import cli, state_study
from flare_jax import runtime

DEFAULTS = dict(tasks=["cartpole_swingup", "ball_in_cup_catch"],
                variants=["state_full", "state_position", "state_flare"],
                seeds=["0", "1", "2"], env_steps=40_000, evals=8, eval_episodes=5,
                out_dir="runs/default_state_study",
                title="SAC from states, velocities removed (make run), 3 seeds, mean +- s.e.")

for _name, _value in DEFAULTS.items():
    flags.FLAGS.set_default(_name, _value)


def main(argv):
    print("[make run] the paper's state-space study (section 4), CPU-sized: "
          "python -m experiments.state_study with the defaults of experiments/default_run.py",
          flush=True)
    state_study.main(argv)


if __name__ == "__main__":
    runtime.setup_process(reexec="experiments.default_run")
    cli.run_main(main)
