"""Named experiment presets: config instances written as overrides of the config dataclasses.

A launcher's flags are generated from the chosen preset (`--preset`), so each flag's default is
the preset's value (`--helpfull` shows them); flags given on the command line override it.
"""
from __future__ import annotations

from agents.rainbow_train import RainbowTrainConfig
from agents.sac_train import TrainConfig
from flare_jax.config_flags import replace

PAPER_TASKS = ("quadruped_walk", "pendulum_swingup", "hopper_hop", "finger_turn_hard", "walker_run")

SAC_PRESETS: dict[str, TrainConfig] = {
    # reference.md section 2: Flare on RAD-SAC from pixels, the paper's Table 1 protocol; the
    # config's defaults are these settings.
    "flare_paper": TrainConfig(),
    # The same settings for any DMC task (e.g. the cheap cartpole_swingup check).
    "flare": replace(TrainConfig(), task="cartpole_swingup"),
    # The RAD baseline (frame stack), the paper's protocol.
    "rad_paper": replace(TrainConfig(), encoder="frame_stack"),
    # SAC from states (paper section 4 / Figs. 2-3 and CPU learning checks): smaller MLPs and
    # batch than the pixel agent so 100k env steps take minutes on a CPU; SAC (Haarnoja et al.
    # 2018) learning rate 3e-4; RAD's update periods and target rates as for pixels.
    "state": replace(
        TrainConfig(), task="cartpole_swingup", pixels=False, encoder="state_full", batch_size=256,
        init_steps=1_000, eval_every=1_250, hidden_dim=256, critic_lr=3e-4, actor_lr=3e-4,
        alpha_lr=3e-4, augmentation="none", env_steps=100_000),
}
PRESET_TASKS = {"flare_paper": PAPER_TASKS, "rad_paper": PAPER_TASKS}

# Rainbow (reference.md section 4). Frames are emulator frames (4 per Atari agent step).
RAINBOW_PRESETS: dict[str, RainbowTrainConfig] = {
    # DQN Zoo's Rainbow with the paper's protocol: 1M-frame training phases alternating with 500k
    # evaluation frames, 100M training frames per game (the config's defaults).
    "atari": RainbowTrainConfig(),
    # Fast learning check on envpool CartPole-v1 with an MLP torso and the full Rainbow machinery
    # (PER, n-step, noisy dueling C51, double Q). Returns reach 100 with discount 0.99, hence the
    # support [0, 100]; a larger learning rate and a faster target copy than Atari.
    "cartpole": replace(
        RainbowTrainConfig(), game="CartPole-v1", torso="mlp", frames=30_000, num_envs=1,
        eval_every_frames=5_000, eval_frames=4_000, eval_envs=4, learn_period_frames=1,
        batch_size=64, replay_capacity=60_000, min_replay=1_000, learning_rate=5e-4,
        target_update_period=500, v_min=0.0, v_max=100.0),
}


def get(presets: dict, name: str):
    try:
        return presets[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(presets))}") from None
