"""Named experiment presets: the reference settings and the CPU-sized ones, with their sources.

A preset is a dict of TrainConfig / SACConfig field values; launcher flags given explicitly on
the command line override them.
"""
from __future__ import annotations

PAPER_TASKS = ("quadruped_walk", "pendulum_swingup", "hopper_hop", "finger_turn_hard", "walker_run")

SAC_PRESETS: dict[str, dict] = {
    # reference.md section 2: Flare on RAD-SAC from pixels, the paper's Table 1 protocol.
    "flare_paper": dict(
        pixels=True, encoder="flare", batch_size=128, replay_capacity=100_000, init_steps=10_000,
        eval_every=10_000, eval_episodes=10, hidden_dim=1024, critic_lr=2e-4, actor_lr=2e-4,
        alpha_lr=1e-4, init_temperature=0.1, encoder_tau=0.05, critic_tau=0.01,
        augmentation="translate", env_steps=500_000),
    # The same settings for any DMC task (e.g. the cheap cartpole_swingup check).
    "flare": dict(
        pixels=True, encoder="flare", batch_size=128, replay_capacity=100_000, init_steps=10_000,
        eval_every=10_000, eval_episodes=10, hidden_dim=1024, critic_lr=2e-4, actor_lr=2e-4,
        alpha_lr=1e-4, init_temperature=0.1, encoder_tau=0.05, critic_tau=0.01,
        augmentation="translate", env_steps=500_000),
    # The same for the RAD baseline (frame stack).
    "rad_paper": dict(
        pixels=True, encoder="frame_stack", batch_size=128, replay_capacity=100_000,
        init_steps=10_000, eval_every=10_000, eval_episodes=10, hidden_dim=1024, critic_lr=2e-4,
        actor_lr=2e-4, alpha_lr=1e-4, init_temperature=0.1, encoder_tau=0.05, critic_tau=0.01,
        augmentation="translate", env_steps=500_000),
    # SAC from states (paper section 4 / Figs. 2-3 and CPU learning checks): smaller MLPs and
    # batch than the pixel agent so 100k env steps take minutes on a CPU; SAC (Haarnoja et al.
    # 2018) learning rate 3e-4; RAD's update periods and target rates as for pixels.
    "state": dict(
        pixels=False, encoder="state_full", batch_size=256, replay_capacity=100_000,
        init_steps=1_000, eval_every=1_250, eval_episodes=10, hidden_dim=256, critic_lr=3e-4,
        actor_lr=3e-4, alpha_lr=3e-4, init_temperature=0.1, encoder_tau=0.05, critic_tau=0.01,
        augmentation="none", env_steps=100_000),
}
PRESET_TASKS = {"flare_paper": PAPER_TASKS, "rad_paper": PAPER_TASKS}


def get_preset(name: str) -> dict:
    try:
        return dict(SAC_PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(SAC_PRESETS))}") from None


# Rainbow (reference.md section 4). Frames are emulator frames (4 per Atari agent step).
RAINBOW_PRESETS: dict[str, dict] = {
    # DQN Zoo's Rainbow with the paper's protocol: 1M-frame training phases alternating with 500k
    # evaluation frames, 100M training frames per game.
    "atari": dict(
        network="flare", frames=100_000_000, num_envs=4, eval_every_frames=1_000_000,
        eval_frames=500_000, eval_envs=4, learn_period_frames=16, batch_size=32,
        replay_capacity=1_000_000, min_replay=20_000, n_step=3, learning_rate=6.25e-5,
        target_update_frames=32_000, v_min=-10.0, v_max=10.0),
    # Fast learning check on envpool CartPole-v1 with an MLP torso and the full Rainbow machinery
    # (PER, n-step, noisy dueling C51, double Q). Returns reach 100 with discount 0.99, hence the
    # support [0, 100]; a larger learning rate and a faster target copy than Atari.
    "cartpole": dict(
        network="mlp", frames=30_000, num_envs=1, eval_every_frames=5_000, eval_frames=4_000,
        eval_envs=4, learn_period_frames=1, batch_size=64, replay_capacity=60_000,
        min_replay=1_000, n_step=3, learning_rate=5e-4, target_update_frames=500,
        v_min=0.0, v_max=100.0),
}
RAINBOW_NETWORKS = {"flare": "atari_flare", "baseline": "atari_baseline", "mlp": "mlp"}


def get_rainbow_preset(name: str) -> dict:
    try:
        return dict(RAINBOW_PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: "
                         f"{', '.join(sorted(RAINBOW_PRESETS))}") from None
