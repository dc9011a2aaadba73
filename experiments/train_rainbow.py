"""Train distributional Rainbow (+ Flare torso) on envpool Atari or CartPole.
`python -m experiments.train_rainbow --helpfull`.

  python -m experiments.train_rainbow --game=pong --torso=atari_flare --frames=10000000 --seeds=0,1,2
  python -m experiments.train_rainbow --preset=cartpole --seeds=0

Frames are emulator frames (Atari: 4 per agent step). Every flag comes from the config
dataclasses (agents/rainbow_train.RainbowTrainConfig, agents/rainbow.RainbowConfig,
flare_jax/loop.RunConfig) with the preset's values as defaults. Writes <out_dir>/{config.json,
command.txt, checkpoints/} and <out_dir>/seed_<s>/{eval.csv, train.csv, tb/}; rerunning the same
command resumes. Exit status: 0 finished, 2 bad input, 3 diverged, 128 + signal when interrupted.
"""
from __future__ import annotations

import os

from absl import flags

from experiments import cli, presets
from flare_jax import config_flags

FLAGS = flags.FLAGS
cli.define_preset_flags(presets.RAINBOW_PRESETS, "atari")


def build_config():
    config = config_flags.from_flags(presets.get(presets.RAINBOW_PRESETS, FLAGS.preset))
    if config.run.out_dir is None:
        config = config_flags.replace(config, out_dir=os.path.join(
            "runs", f"rainbow_{config.game}_{config.rainbow.torso}_{FLAGS.preset}"))
    return config


def main(argv):
    del argv
    from agents import rainbow_train  # pylint: disable=g-import-not-at-top
    with cli.bad_input():
        config = build_config()
    cli.train(rainbow_train.RainbowTrainer, config, "experiments.train_rainbow")


if __name__ == "__main__":
    from flare_jax.runtime import setup_process
    setup_process(reexec="experiments.train_rainbow")
    cli.run_main(main)
