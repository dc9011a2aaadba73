"""Train RAD-SAC (+ Flare) on DeepMind Control. `python -m experiments.train_sac --help`.

  python -m experiments.train_sac --preset=flare_paper --task=walker_run --seed=0
  python -m experiments.train_sac --preset=state --task=cartpole_swingup --seeds=0,1,2

Writes <out_dir>/seed_<s>/{eval.csv, train.csv, config.json, tb/, params_final.msgpack}.
Flags given on the command line override the preset's values.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags

import flare_jax  # noqa: F401  (XLA CPU settings before JAX starts)

from agents import sac, sac_train
from experiments import presets
from flare_jax.encoders import ENCODERS
from flare_jax.envs import dmc_tasks
from flare_jax.logging import write_command

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "flare_paper", f"one of {sorted(presets.SAC_PRESETS)}")
flags.DEFINE_string("task", "walker_run", f"DMC task, one of {sorted(dmc_tasks.TASKS)}")
flags.DEFINE_bool("pixels", True, "learn from pixels (else from states)")
flags.DEFINE_string("encoder", "flare", f"one of {sorted(ENCODERS)}")
flags.DEFINE_integer("seed", 0, "seed (ignored when --seeds is given)")
flags.DEFINE_list("seeds", None, "several seeds, run vmapped in one process, e.g. 0,1,2")
flags.DEFINE_integer("env_steps", 500_000, "environment steps (agent steps x action repeat)")
flags.DEFINE_integer("action_repeat", None, "override the task preset's action repeat")
flags.DEFINE_integer("num_envs", 1, "parallel environments per seed")
flags.DEFINE_integer("batch_size", 128, "SAC batch size")
flags.DEFINE_integer("replay_capacity", 100_000, "replay capacity per seed, in transitions")
flags.DEFINE_integer("init_steps", 10_000, "agent steps of random actions before learning")
flags.DEFINE_integer("eval_every", 10_000, "agent steps between evaluations")
flags.DEFINE_integer("eval_episodes", 10, "deterministic episodes per evaluation")
flags.DEFINE_integer("updates_per_step", 1, "SAC updates per agent step")
flags.DEFINE_integer("update_every", 1, "fuse updates: run updates_per_step*update_every "
                     "updates in one compiled call every update_every agent steps")
flags.DEFINE_integer("hidden_dim", 1024, "MLP width of the Q and policy networks")
flags.DEFINE_integer("feature_dim", None, "encoder feature size (pixel encoders; default 64)")
flags.DEFINE_integer("num_frames", None, "frames per observation (default: the encoder's)")
flags.DEFINE_float("critic_lr", 2e-4, "critic Adam learning rate")
flags.DEFINE_float("actor_lr", 2e-4, "actor Adam learning rate")
flags.DEFINE_float("alpha_lr", 1e-4, "temperature Adam learning rate")
flags.DEFINE_float("init_temperature", 0.1, "initial SAC temperature")
flags.DEFINE_float("encoder_tau", 0.05, "target EMA rate of the encoder")
flags.DEFINE_float("critic_tau", 0.01, "target EMA rate of the Q heads")
flags.DEFINE_enum("augmentation", "translate", ["translate", "crop", "none"], "pixel augmentation")
flags.DEFINE_string("out_dir", None, "output directory (default runs/<task>_<encoder>_<preset>)")
flags.DEFINE_bool("tensorboard", True, "write TensorBoard logs")
flags.DEFINE_float("stall_seconds", 3600.0, "end the process with tracebacks when one training "
                   "step (an evaluation included) takes longer than this; <= 0: never")

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(sac_train.TrainConfig)}
_SAC_FIELDS = {f.name for f in dataclasses.fields(sac.SACConfig)}


def build_config() -> sac_train.TrainConfig:
    values = presets.get_preset(FLAGS.preset)
    allowed = presets.PRESET_TASKS.get(FLAGS.preset)
    if allowed and FLAGS.task not in allowed:
        raise app.UsageError(f"preset {FLAGS.preset!r} is defined for the paper's tasks "
                             f"{', '.join(allowed)}; got --task={FLAGS.task}")
    for name in ("pixels", "encoder", "env_steps", "batch_size", "replay_capacity", "init_steps",
                 "eval_every", "eval_episodes", "hidden_dim", "critic_lr", "actor_lr", "alpha_lr",
                 "init_temperature", "encoder_tau", "critic_tau", "augmentation", "num_envs",
                 "updates_per_step", "update_every", "action_repeat"):
        if FLAGS[name].present or name not in values:
            values[name] = FLAGS[name].value
    enc_kwargs = {}
    if FLAGS.feature_dim is not None:
        enc_kwargs["feature_dim"] = FLAGS.feature_dim
    if FLAGS.num_frames is not None:
        enc_kwargs["num_frames"] = FLAGS.num_frames
    seeds = tuple(int(s) for s in FLAGS.seeds) if FLAGS.seeds else (FLAGS.seed,)
    sac_cfg = sac.SACConfig(encoder_kwargs=enc_kwargs,
                            **{k: v for k, v in values.items() if k in _SAC_FIELDS})
    out_dir = FLAGS.out_dir or os.path.join(
        "runs", f"{FLAGS.task}_{values['encoder']}_{FLAGS.preset}")
    try:
        return sac_train.TrainConfig(
            task=FLAGS.task, seeds=seeds, sac=sac_cfg, out_dir=out_dir,
            tensorboard=FLAGS.tensorboard, stall_seconds=FLAGS.stall_seconds,
            **{k: v for k, v in values.items() if k in _TRAIN_FIELDS and k not in ("sac",)})
    except ValueError as err:
        raise app.UsageError(str(err)) from err


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = build_config()
        sac_cfg = config.sac
        sac_cfg.make_encoder()  # validates the encoder name and options
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    if config.out_dir:
        write_command(config.out_dir, "experiments.train_sac", sys.argv[1:])
    result = sac_train.train(config)
    print(f"final evaluation ({config.env_steps:,d} env steps): "
          f"{result['eval'][-1] if result['eval'] else 'none'}; logs in {config.out_dir}")


if __name__ == "__main__":
    from flare_jax.runtime import reexec_with_tcmalloc
    reexec_with_tcmalloc("experiments.train_sac")
    app.run(main)
