"""Train distributional Rainbow (+ Flare torso) on envpool Atari or CartPole.

  python -m experiments.train_rainbow --game=pong --network=flare --frames=10000000 --seed=0
  python -m experiments.train_rainbow --preset=cartpole --game=CartPole-v1 --seed=0

Frames are emulator frames (Atari: 4 per agent step). Writes <out_dir>/{eval.csv, train.csv,
config.json, command.txt, tb/, params_final.msgpack}. Flags given explicitly override the preset.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

import flare_jax  # noqa: F401  (XLA CPU settings before JAX starts)

from agents import rainbow, rainbow_train
from experiments import presets
from flare_jax.logging import write_command

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "atari", f"one of {sorted(presets.RAINBOW_PRESETS)}")
flags.DEFINE_string("game", "pong", "Atari game (snake_case, e.g. pong, breakout) or CartPole-v1")
flags.DEFINE_enum("network", "flare", sorted(presets.RAINBOW_NETWORKS),
                  "torso: flare (AtariFlareTorso), baseline (AtariBaselineTorso), mlp (vectors)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_integer("frames", 100_000_000, "training frames")
flags.DEFINE_integer("num_envs", 4, "parallel training envs")
flags.DEFINE_integer("eval_every_frames", 1_000_000, "training frames per phase")
flags.DEFINE_integer("eval_frames", 500_000, "evaluation frames per phase")
flags.DEFINE_integer("eval_envs", 4, "parallel evaluation envs")
flags.DEFINE_integer("learn_period_frames", 16, "frames per update")
flags.DEFINE_integer("batch_size", 32, "batch size")
flags.DEFINE_integer("replay_capacity", 1_000_000, "replay capacity (transitions)")
flags.DEFINE_integer("min_replay", 20_000, "transitions before learning starts")
flags.DEFINE_integer("n_step", 3, "n-step returns")
flags.DEFINE_float("learning_rate", 6.25e-5, "Adam learning rate")
flags.DEFINE_integer("target_update_frames", 32_000, "frames between hard target copies")
flags.DEFINE_float("v_min", -10.0, "C51 support minimum")
flags.DEFINE_float("v_max", 10.0, "C51 support maximum")
flags.DEFINE_string("out_dir", None, "output directory (default runs/rainbow_<game>_<network>_s<seed>)")
flags.DEFINE_bool("tensorboard", True, "write TensorBoard logs")
flags.DEFINE_float("stall_seconds", 3600.0, "end the process with tracebacks when one training "
                   "step (an evaluation included) takes longer than this; <= 0: never")

_FIELDS = ("network", "frames", "num_envs", "eval_every_frames", "eval_frames", "eval_envs",
           "learn_period_frames", "batch_size", "replay_capacity", "min_replay", "n_step",
           "learning_rate", "target_update_frames", "v_min", "v_max")


def build_config() -> rainbow_train.RainbowTrainConfig:
    values = presets.get_rainbow_preset(FLAGS.preset)
    for name in _FIELDS:
        if FLAGS[name].present or name not in values:
            values[name] = FLAGS[name].value
    updates_per_target = max(1, values["target_update_frames"] // values["learn_period_frames"])
    rb = rainbow.RainbowConfig(torso=presets.RAINBOW_NETWORKS[values["network"]],
                               learning_rate=values["learning_rate"], v_min=values["v_min"],
                               v_max=values["v_max"], target_update_period=updates_per_target)
    out_dir = FLAGS.out_dir or os.path.join(
        "runs", f"rainbow_{FLAGS.game}_{values['network']}_s{FLAGS.seed}")
    return rainbow_train.RainbowTrainConfig(
        env=FLAGS.game, seed=FLAGS.seed, num_envs=values["num_envs"], train_frames=values["frames"],
        eval_every_frames=values["eval_every_frames"], eval_frames=values["eval_frames"],
        eval_envs=values["eval_envs"], learn_period_frames=values["learn_period_frames"],
        batch_size=values["batch_size"], replay_capacity=values["replay_capacity"],
        min_replay=values["min_replay"], n_step=values["n_step"], rainbow=rb, out_dir=out_dir,
        tensorboard=FLAGS.tensorboard, stall_seconds=FLAGS.stall_seconds)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = build_config()
        if config.vector_obs != (config.rainbow.torso == "mlp"):
            raise ValueError(f"network {FLAGS.network!r} does not fit {config.env!r}: use "
                             f"--network=mlp for vector observations and flare/baseline for Atari")
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    write_command(config.out_dir, "experiments.train_rainbow", sys.argv[1:])
    result = rainbow_train.train(config)
    print(f"final evaluation: {result['eval'][-1] if result['eval'] else 'none'}; "
          f"logs in {config.out_dir}")


if __name__ == "__main__":
    from flare_jax.runtime import reexec_with_tcmalloc
    reexec_with_tcmalloc("experiments.train_rainbow")
    app.run(main)
