"""What a saved Flare encoder sees move: frames, per-frame latents z_t, latent flow, pixel change.

    data = episode_latents("runs/cartpole_flare", seed=0, frames=4, skip=4)
    fig = flow_figure(data, channels=3)          # or: python -m experiments.report flow ...

Flare (Shang et al. 2021) encodes each frame x_t of the stack with the shared conv stack into a
latent map z_t [h, w, c] and feeds the agent [z_2..z_T, z_t - z_{t-1}]. Here the run's newest
checkpoint is restored (`flare_jax.loop.load_state`), one evaluation episode of `seed` is played
with its deterministic policy, and for `frames` consecutive agent steps after `skip` the
figure shows x_t, the pixel change |x_t - x_{t-1}| (mean over RGB), a few channels of z_t and
the same channels of the flow z_t - z_{t-1}: the channels whose flow is largest over the shown
steps. Latents are the critic trunk's per-frame conv maps (the convs SAC shares), computed on
the network's acting view of each frame (the stored 100 px centre pasted into the 108 px canvas).
Only pixel Flare runs have latent flow; other encoders are refused in one line.
"""
from __future__ import annotations

import json
import os

import numpy as np

from experiments import scores as sc

FLOW_ENCODERS = ("flare",)


def check_flow_run(run_dir: str) -> tuple[str, str, str]:
    """(agent, task, encoder) of a run whose encoder computes latent flow; ValueError otherwise."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir} is not a run directory (no config.json)")
    with open(path) as f:
        agent, task, encoder = sc.describe_config(json.load(f), path)
    if agent != "sac" or encoder not in FLOW_ENCODERS:
        raise ValueError(f"{run_dir}: its {agent} encoder {encoder!r} computes no latent flow; flow "
                         f"pictures need a pixel Flare run (SAC encoder {', '.join(FLOW_ENCODERS)})")
    return agent, task, encoder


def episode_latents(run_dir: str, seed: int = 0, frames: int = 4, skip: int = 4) -> dict:
    """Plays one evaluation episode of the restored agent of `seed`; returns, for the agent steps
    skip .. skip + frames (one more frame before them for the differences):
    frames [K+1, H, W, 3] uint8 (stored format), latents [K+1, h, w, c] float32, returns [K+1]
    (the episode's return so far), task, step (the checkpoint's env steps)."""
    import jax  # pylint: disable=g-import-not-at-top
    from agents import sac, sac_train  # pylint: disable=g-import-not-at-top
    from flare_jax import loop  # pylint: disable=g-import-not-at-top
    _, task, _ = check_flow_run(run_dir)
    if frames < 1 or skip < 0:
        raise ValueError(f"need frames >= 1 and skip >= 0, got frames={frames}, skip={skip}")
    config, trainer, carry, counters = loop.load_state(sac_train.SACTrainer, run_dir)
    if seed not in config.run.seeds:
        raise ValueError(f"seed {seed} is not in {run_dir}'s seeds {list(config.run.seeds)}")
    i = config.run.seeds.index(seed)
    agent = jax.tree.map(lambda x: x[i], carry.agent)
    episode_steps = (config.max_episode_steps or 1000) // config.repeat     # agent steps
    if skip + frames >= episode_steps:
        raise ValueError(f"skip + frames must be < the episode's {episode_steps} agent steps, "
                         f"got {skip} + {frames}")
    env = sac_train.SACTrainer.make_env(config, "eval", members=[(i, 0)])
    act = jax.jit(lambda a, s, k: trainer.act(a, s, k, "eval"))
    push = jax.jit(trainer.stack_push)
    try:
        ts = env.reset()
        frame = trainer.store(ts.frame)
        stack = trainer.stack_init(frame)
        shown, returns = [], []
        for t in range(skip + frames + 1):
            if t >= skip:
                shown.append(np.asarray(frame[0]))
                returns.append(float(ts.episode_return[0]))
            if t == skip + frames:
                break
            action = act(agent, stack, jax.random.PRNGKey(t))
            ts = env.step(np.asarray(action))
            frame = trainer.store(ts.frame)
            stack = push(stack, frame, ts.first)
    finally:
        env.close()
    x = np.stack(shown)                                             # [K+1, H, W, 3]
    nets = sac._nets(agent.config, agent.action_dim)                # pylint: disable=protected-access
    view = sac._view(agent.config, x[None], nets.encoder)           # pylint: disable=protected-access
    z = nets.encoder.apply({"params": agent.critic.params["trunk"]}, view, method="encode_frames")
    return dict(frames=x, latents=np.asarray(z[0], np.float32), returns=np.array(returns),
                task=task, step=counters.iteration * trainer.schedule.units_per_iteration,
                skip=skip)


def flow_figure(data: dict, channels: int = 3, title: str = ""):
    """The figure of `episode_latents`' data: one row per shown step, columns frame, pixel
    change, `channels` latent channels of z_t and the same channels of z_t - z_{t-1}."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    x, z = data["frames"].astype(np.float32), data["latents"]
    flow = z[1:] - z[:-1]                                           # [K, h, w, c]
    pix = np.abs(x[1:] - x[:-1]).mean(-1)                           # [K, H, W]
    if not 1 <= channels <= z.shape[-1]:
        raise ValueError(f"channels must lie in [1, {z.shape[-1]}], got {channels}")
    chosen = np.argsort(-np.abs(flow).mean(axis=(0, 1, 2)))[:channels]
    k = flow.shape[0]
    cols = 2 + 2 * channels
    fig, axes = plt.subplots(k, cols, figsize=(1.55 * cols, 1.6 * k + 0.8), squeeze=False)
    pix_max = max(float(pix.max()), 1.0)
    for r in range(k):
        t = data["skip"] + r + 1
        panels = [(x[r + 1] / 255.0, None, None, None), (pix[r], "magma", 0, pix_max)]
        for c in chosen:
            lo, hi = float(z[1:, ..., c].min()), float(z[1:, ..., c].max())
            panels.append((z[r + 1, ..., c], "viridis", lo, hi))
        for c in chosen:
            m = float(np.abs(flow[..., c]).max()) or 1.0
            panels.append((flow[r, ..., c], "RdBu_r", -m, m))
        for j, (img, cmap, lo, hi) in enumerate(panels):
            ax = axes[r, j]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"t = {t}", fontsize=8)
    names = (["frame $x_t$", r"$|x_t - x_{t-1}|$"] + [f"$z_t$ ch {c}" for c in chosen]
             + [f"$z_t - z_{{t-1}}$ ch {c}" for c in chosen])
    for j, name in enumerate(names):
        axes[0, j].set_title(name, fontsize=8)
    fig.suptitle(title or f"Flare latents and latent flow, {data['task']} (checkpoint at "
                 f"{data['step']:,d} env steps; flow: red +, blue -; each channel on its own scale)", fontsize=9)
    fig.tight_layout()
    return fig


def flow_report(run_dir: str, out_dir: str, seed: int = 0, frames: int = 4, skip: int = 4,
                channels: int = 3, title: str = "") -> str:
    """Writes `<out_dir>/flow.png`; returns its path."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    check_flow_run(run_dir)           # refused before anything is loaded
    fig = flow_figure(episode_latents(run_dir, seed, frames, skip), channels, title)
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "flow.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
