"""Writes notebooks/inspect_update.ipynb from the cells below and executes it in place, so the
committed notebook carries its outputs (plots visible on GitHub):

    .venv/bin/python notebooks/build_inspect_update.py          # ~2 min on a 2-core CPU

The cells are the notebook's source of truth; edit them here, not in the .ipynb.
tests/test_notebook.py executes the committed notebook top to bottom.
"""
import os
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "inspect_update.ipynb")

CELLS = [
    ("md", """# Inspecting the pure update functions of flare_jax

This notebook makes two small runs with the library's own launchers' code (a pixel **Flare
RAD-SAC** run on DMC `cartpole_swingup` and a **Rainbow** run on CartPole), restores each with
`agents.load_run`, draws a batch from the *restored* replay, and calls the agents' pure functions
on it:

1. SAC: the three losses (`sac.critic_loss`, `sac.actor_loss`, `sac.alpha_loss`), per-layer
   gradient norms (the actor's gradient into the shared convs is exactly zero), Q-values and
   targets, and one jitted `sac.update`, whose metrics equal the losses computed here;
2. what the Flare encoder sees move (`experiments.flow`: frames, latents z_t, latent flow);
3. Rainbow: the return distribution over the 51 atoms for one state, before and after one
   `rainbow.update`.

The runs are tiny (a few hundred env steps, a CPU is enough): the point is the functions, not
the returns. `make test` executes this notebook (tests/test_notebook.py); regenerate it with
`python notebooks/build_inspect_update.py`."""),
    ("code", """%matplotlib inline
import os, tempfile

from flare_jax.runtime import setup_process
setup_process()                       # the one process set-up call (fast CPU convs, headless EGL)

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import agents
from agents import rainbow, rainbow_train, sac, sac_train
from experiments import flow, presets
from flare_jax import config_flags
from flare_jax.data import prioritized as per
from flare_jax.data import replay as rp

WORK = tempfile.mkdtemp(prefix="inspect_update_")
print("jax", jax.__version__, jax.devices(), "runs in", WORK)"""),
    ("md", """## 1. A small pixel Flare SAC run, restored with `load_run`

60 agent steps (480 env steps at action repeat 8) with 20 updates on batches of 32, then one
evaluation episode (episodes cut at 240 env steps to keep the notebook fast); the run directory
holds the whole-state checkpoint (agent, replay, stacks)."""),
    ("code", """sac_dir = os.path.join(WORK, "sac_flare")
cfg = config_flags.replace(
    presets.get(presets.SAC_PRESETS, "flare"), task="cartpole_swingup", env_steps=480,
    init_steps=40, batch_size=32, replay_capacity=1000, eval_every=60, eval_episodes=1,
    max_episode_steps=240, seeds=(0,), out_dir=sac_dir, tensorboard=False)
result = sac_train.train(cfg, log=print)

config, state, trainer = agents.load_run(sac_dir, seed=0, with_trainer=True)
agent = state.agent                              # sac.SACState of seed 0
replay = jax.tree.map(lambda x: x[0], state.replay)   # data shard 0 (the run had one)
batch = rp.sample(trainer.replay_config, replay, jax.random.PRNGKey(1), 32)
print({k: (v.shape, str(v.dtype)) for k, v in vars(batch).items()})
print("updates done:", int(agent.updates), "| temperature:", float(jnp.exp(agent.alpha.params["log_alpha"])))"""),
    ("md", """### The losses, called directly

`update` splits its key into (augmentation, next action, policy sample) keys and calls exactly
these functions; calling them with the same keys gives the same numbers."""),
    ("code", """key = jax.random.PRNGKey(2)
k_aug, k_next, k_pi = jax.random.split(key, 3)
encoder = agent.config.make_encoder()
obs, next_obs = sac.augment_batch(agent.config, k_aug, batch, encoder)   # random translate to 108 px

(critic_loss, (q, y)), critic_grads = jax.value_and_grad(sac.critic_loss, has_aux=True)(
    agent.critic.params, agent, obs, next_obs, batch, k_next)
# the actor loss, differentiated in the actor's parameters and in the critic's (shared convs)
(actor_loss, log_prob), (actor_grads, actor_grads_on_critic) = jax.value_and_grad(
    sac.actor_loss, argnums=(0, 1), has_aux=True)(agent.actor.params, agent.critic.params, agent, obs, k_pi)
alpha_loss = sac.alpha_loss(agent.alpha.params, log_prob, sac.target_entropy(agent))
print(f"critic loss {float(critic_loss):.4f}  actor loss {float(actor_loss):.4f}  "
      f"alpha loss {float(alpha_loss):.5f}  entropy {float(-log_prob.mean()):.3f}")"""),
    ("code", """def layer_norms(grads):
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): float(jnp.linalg.norm(g)) for path, g in flat}

crit, act_on_crit = layer_norms(critic_grads), layer_norms(actor_grads_on_critic)
print(f"{'critic parameter':44s} {'|grad critic loss|':>19s} {'|grad actor loss|':>18s}")
for name in crit:
    print(f"{name:44s} {crit[name]:19.3e} {act_on_crit[name]:18.3e}")
trunk = jax.tree.leaves(actor_grads_on_critic["trunk"])
print("actor-loss gradient into the shared convs exactly zero:", all(bool((g == 0).all()) for g in trunk))"""),
    ("code", """fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
names = list(crit)
axes[0].barh(range(len(names)), [crit[n] for n in names], color="C0")
axes[0].set_yticks(range(len(names)), names, fontsize=7); axes[0].invert_yaxis()
axes[0].set_xscale("log"); axes[0].set_xlabel("gradient norm of the critic loss")
axes[0].set_title("critic parameters: critic-loss gradient norms\\n(the actor loss's gradient is exactly 0 on every one)", fontsize=9)
actor_names = list(layer_norms(actor_grads))
axes[1].barh(range(len(actor_names)), list(layer_norms(actor_grads).values()), color="C1")
axes[1].set_yticks(range(len(actor_names)), actor_names, fontsize=7); axes[1].invert_yaxis()
axes[1].set_xscale("log"); axes[1].set_xlabel("gradient norm of the actor loss")
axes[1].set_title("actor parameters: actor-loss gradient norms\\n(no convs: the actor reads the critic's, detached)", fontsize=9)
fig.tight_layout(); plt.show()"""),
    ("md", """### One jitted `sac.update` on the same batch and key

Its critic loss is the one above. The actor and temperature step too (update 0 of every 2),
after the critic's step and with the *updated* critic (RAD's order): `actor_loss` at the new
critic parameters gives the update's actor loss."""),
    ("code", """new_agent, metrics = jax.jit(sac.update)(agent, batch, key, jnp.int32(0))
actor_loss_new = sac.actor_loss(agent.actor.params, new_agent.critic.params, agent, obs, k_pi)[0]
print(f"update's critic loss {float(metrics['critic_loss']):.4f} (above: {float(critic_loss):.4f}); "
      f"actor loss {float(metrics['actor_loss']):.4f} (actor_loss at the updated critic: "
      f"{float(actor_loss_new):.4f}; at the old one, above: {float(actor_loss):.4f})")
print(f"temperature {float(jnp.exp(agent.alpha.params['log_alpha'])):.5f} -> {float(metrics['alpha']):.5f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].scatter(np.asarray(y), np.asarray(q[0]), s=12, label="Q1")
axes[0].scatter(np.asarray(y), np.asarray(q[1]), s=12, label="Q2")
lim = [float(min(y.min(), q.min())), float(max(y.max(), q.max()))]
axes[0].plot(lim, lim, "k--", lw=1); axes[0].set_xlabel("target y"); axes[0].set_ylabel("Q(s, a)")
axes[0].legend(); axes[0].set_title("Q-values against their targets (batch of 32)", fontsize=10)
axes[1].hist(np.asarray(-log_prob), bins=15, color="C2")
axes[1].axvline(-sac.target_entropy(agent), color="k", ls="--", label="target entropy")
axes[1].set_xlabel("-log pi(a|s)"); axes[1].set_ylabel("samples"); axes[1].legend()
axes[1].set_title("policy entropy per sample", fontsize=10)
fig.tight_layout(); plt.show()"""),
    ("md", """## 2. What the Flare encoder sees move

`experiments.flow` plays an evaluation episode with the restored policy and shows, per agent step,
the frame, the pixel change, three channels of the per-frame latents z_t (the critic trunk's
conv maps) and the same channels of the latent flow z_t - z_{t-1}. This is also
`python -m experiments.report flow --run=DIR --out=OUT`."""),
    ("code", """data = flow.episode_latents(sac_dir, seed=0, frames=3, skip=4)
print("frames", data["frames"].shape, "latents", data["latents"].shape)
fig = flow.flow_figure(data, channels=3)
plt.show()"""),
    ("md", """## 3. Rainbow: the return distribution of one state, before and after one update

A small Rainbow (C51, noisy dueling heads, 3-step double-Q, prioritised replay) run on CartPole
with the MLP torso; restored with `load_run`, a prioritised batch drawn from its replay, and one
jitted `rainbow.update` (network noise off for the pictures: `key=None`)."""),
    ("code", """rb_dir = os.path.join(WORK, "rainbow_cartpole")
rcfg = config_flags.replace(
    presets.get(presets.RAINBOW_PRESETS, "cartpole"), frames=800, min_replay=300,
    replay_capacity=1000, eval_every_frames=800, eval_frames=200, eval_envs=1, seeds=(0,),
    out_dir=rb_dir, tensorboard=False)
rainbow_train.train(rcfg, log=print)

rconfig, rstate, rtrainer = agents.load_run(rb_dir, seed=0, with_trainer=True)
ragent = rstate.agent
rreplay = jax.tree.map(lambda x: x[0], rstate.replay)
rbatch, weights, probs = per.sample(rtrainer.per_config, rreplay, jax.random.PRNGKey(3), 32, jnp.float32(0.4))
new_ragent, rmetrics, priorities = jax.jit(rainbow.update)(ragent, rbatch, weights, jax.random.PRNGKey(4))
print(f"loss {float(rmetrics['loss']):.4f}, grad norm {float(rmetrics['grad_norm']):.3f}; "
      f"priorities of the batch {np.round(np.asarray(priorities[:6]), 3)} ...")"""),
    ("code", """obs1 = rbatch.obs[:1]
before = jax.nn.softmax(rainbow.apply_network(ragent, ragent.params, obs1, None))[0]        # [A, atoms]
after = jax.nn.softmax(rainbow.apply_network(new_ragent, new_ragent.params, obs1, None))[0]
support = np.asarray(ragent.config.support)
w = support[1] - support[0]
fig, axes = plt.subplots(2, before.shape[0], figsize=(11, 5), sharex=True, sharey="row", squeeze=False)
for a in range(before.shape[0]):
    ax, dx = axes[0, a], axes[1, a]
    ax.bar(support, np.asarray(before[a]), width=w, color="C0", alpha=0.7, label="before")
    ax.step(support, np.asarray(after[a]), where="mid", color="C1", lw=1.2, label="after one update")
    ax.set_title(f"action {a}: Q {float((before[a] * support).sum()):.3f} -> {float((after[a] * support).sum()):.3f}", fontsize=9)
    dx.bar(support, np.asarray(after[a] - before[a]), width=w, color="C3")
    dx.axhline(0, color="k", lw=0.6)
    dx.set_xlabel("return (atom of the support)")
axes[0, 0].set_ylabel("probability"); axes[1, 0].set_ylabel("after - before")
axes[0, 0].legend(fontsize=8, loc="upper right")
fig.suptitle(f"C51 return distribution of one replayed state (action taken: {int(rbatch.action[0])})", fontsize=10)
fig.tight_layout(); plt.show()"""),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in CELLS]
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(HERE)}}).execute()
    return nb


if __name__ == "__main__":
    notebook = execute(build())
    for cell in notebook.cells:       # no per-run noise in the committed file
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(notebook, PATH)
    print(f"wrote {PATH}", file=sys.stderr)
