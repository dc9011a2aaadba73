"""Train RAD-SAC (+ Flare) on DeepMind Control. `python -m experiments.train_sac --helpfull`.

  python -m experiments.train_sac --preset=flare_paper --task=walker_run --seeds=0
  python -m experiments.train_sac --preset=state --task=cartpole_swingup --seeds=0,1,2

Every flag comes from the config dataclasses (agents/sac_train.TrainConfig, agents/sac.SACConfig,
flare_jax/loop.RunConfig) with the preset's values as defaults. Writes <out_dir>/{config.json,
command.txt, checkpoints/} and <out_dir>/seed_<s>/{eval.csv, train.csv, tb/}; rerunning the same
command resumes from the newest checkpoint. Exit status: 0 finished, 2 bad input, 3 diverged,
128 + signal when interrupted (a checkpoint is saved first).
"""
from __future__ import annotations

import os

from absl import flags

from experiments import cli, presets
from flare_jax import config_flags

FLAGS = flags.FLAGS
cli.define_preset_flags(presets.SAC_PRESETS, "flare_paper")


def build_config():
    preset = presets.get(presets.SAC_PRESETS, FLAGS.preset)
    config = config_flags.from_flags(preset)
    allowed = presets.PRESET_TASKS.get(FLAGS.preset)
    if allowed and config.task not in allowed:
        raise ValueError(f"preset {FLAGS.preset!r} is defined for the paper's tasks "
                         f"{', '.join(allowed)}; got --task={config.task} (use --preset=flare)")
    if config.run.out_dir is None:
        config = config_flags.replace(config, out_dir=os.path.join(
            "runs", f"{config.task}_{config.sac.encoder}_{FLAGS.preset}"))
    return config


def main(argv):
    del argv
    from agents import sac_train  # pylint: disable=g-import-not-at-top
    with cli.bad_input():
        config = build_config()
    cli.train(sac_train.SACTrainer, config, "experiments.train_sac")


if __name__ == "__main__":
    from flare_jax.runtime import setup_process
    setup_process(reexec="experiments.train_sac")
    cli.run_main(main)
