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
