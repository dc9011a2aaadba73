"""RAD-SAC with any encoder from `flare_jax.encoders` (reference.md section 2), as pure functions.

    config = SACConfig(encoder="flare")
    state = init(key, obs_spec, action_spec, config)          # SACState pytree
    action = act(state, obs, key, deterministic=False)        # [N, A] in [-1, 1]
    state, metrics = update(state, batch, key)                # one SAC update
    state, metrics = update_many(state, batches, key)         # N updates, one compiled call

Observations are in the *storage* format of the replay: frame stacks [..., T, *frame] (pixels:
the 100x100 centre of each 108 render, uint8). The agent turns them into the network's view: a
random translate into a 108 canvas for updates, the centre paste for acting (reference FIX).

Parameters: the critic owns the encoder's trunk (convs, plus the LSTM of recurrent variants) and
its head (Dense+LayerNorm), and the twin Q MLPs. The actor owns only its own head and policy MLP;
it reads the critic's trunk output under stop_gradient, so conv weights are shared (one copy),
never updated by the actor loss, and never duplicated. The target critic is an EMA of the whole
critic: trunk and head with tau 0.05 ("encoder"), Q heads with tau 0.01, every 2 updates. The
actor and the temperature are updated every 2 critic updates.

Precision (`compute_dtype`, `flare_jax.precision`): with "bfloat16" the encoder, the Q MLPs and the
policy MLP compute in bfloat16 (inputs and float32 weights cast for each conv/matmul); their
outputs, Q values [2, B] and the policy's pre-squash output, are cast to float32 at the head, so
log-probabilities, the tanh correction, targets, losses and the temperature are float32.
Parameters, gradients, optimiser states and targets are float32 either way.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from flare_jax import loop, precision
from flare_jax.data import augment
from flare_jax import mesh as mesh_lib
from flare_jax.encoders import make_encoder
from flare_jax.precision import COMPUTE_DTYPES, canonical_dtype
from flare_jax.data.replay import Batch

Array = jax.Array
_ORTHO = nn.initializers.orthogonal(1.0)


PIXEL_ENCODERS = ("flare", "frame_stack", "pixel_flow", "latent_stack", "recurrent")
STATE_ENCODERS = ("state_full", "state_position", "state_flare", "state_stack", "state_recurrent")


def _f(default, help_: str, **extra):
    return dataclasses.field(default=default, metadata=dict(help=help_, **extra))


@dataclasses.dataclass(frozen=True)
class SACConfig:
    """Hyperparameters; defaults are the reference's (Flare on RAD-SAC, pixels)."""
    encoder: str = _f("flare", "encoder (flare_jax.encoders): pixels " + ", ".join(PIXEL_ENCODERS)
                      + "; states " + ", ".join(STATE_ENCODERS),
                      choices=PIXEL_ENCODERS + STATE_ENCODERS)
    num_frames: Optional[int] = _f(None, "frames per observation (default: the encoder's)")
    feature_dim: Optional[int] = _f(None, "encoder feature size (default: the encoder's, 64 for pixels)")
    encoder_kwargs: tuple[tuple[str, Any], ...] = _f(
        (), "other encoder options, key=value items (e.g. conv_impl=plain)")
    hidden_dim: int = _f(1024, "MLP width of the Q and policy networks")
    critic_lr: float = _f(2e-4, "critic Adam learning rate")
    actor_lr: float = _f(2e-4, "actor Adam learning rate")
    alpha_lr: float = _f(1e-4, "temperature Adam learning rate")
    beta1: float = _f(0.9, "Adam beta1 of actor and critic")
    alpha_beta1: float = _f(0.5, "Adam beta1 of the temperature")
    init_temperature: float = _f(0.1, "initial SAC temperature")
    encoder_tau: float = _f(0.05, "target EMA rate of the encoder (trunk and head)")
    critic_tau: float = _f(0.01, "target EMA rate of the Q heads")
    target_update_period: int = _f(2, "critic updates between target EMA steps")
    actor_update_period: int = _f(2, "critic updates between actor and temperature updates")
    log_std_min: float = _f(-10.0, "policy log-std lower bound")
    log_std_max: float = _f(2.0, "policy log-std upper bound")
    target_entropy: Optional[float] = _f(None, "target entropy (default: -|A|)")
    augmentation: str = _f("translate", "pixel augmentation", choices=augment.AUGMENTATIONS)
    image_size: int = _f(108, "rendered frame and network input size in pixels (frames are "
                              "stored as their 100 px centre)")
    # Per-frame encoders (flare, latent_stack, recurrent): encode the T-1 frames that obs and
    # next_obs share once. Requires next_obs[:, :-1] == obs[:, 1:], which holds for the replay's
    # 1-step batches (augmented or not); `frame_overlap_violations` in the metrics counts misses.
    share_frames: bool = _f(True, "per-frame encoders: encode the frames obs and next_obs share once")
    compute_dtype: str = _f("float32", "dtype of the networks' matmuls and convs (encoder, Q and "
                                       "policy MLPs); parameters, optimiser states, targets and "
                                       "losses stay float32", choices=COMPUTE_DTYPES)

    def __post_init__(self):
        if isinstance(self.encoder_kwargs, Mapping):
            object.__setattr__(self, "encoder_kwargs", tuple(sorted(self.encoder_kwargs.items())))
        if self.encoder not in PIXEL_ENCODERS + STATE_ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; valid encoders: "
                             f"{', '.join(PIXEL_ENCODERS + STATE_ENCODERS)}")
        precision.check_config(self.compute_dtype, self.encoder_kwargs, "encoder")
        if self.augmentation not in augment.AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {', '.join(augment.AUGMENTATIONS)}, "
                             f"got {self.augmentation!r}")
        for name in ("target_update_period", "actor_update_period", "hidden_dim", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("critic_lr", "actor_lr", "alpha_lr", "init_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("encoder_tau", "critic_tau"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        for name in ("beta1", "alpha_beta1"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.log_std_min >= self.log_std_max:
            raise ValueError(f"log_std_min ({self.log_std_min}) must be < log_std_max ({self.log_std_max})")
        for name in ("num_frames", "feature_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        enc = self.make_encoder()       # unknown encoder names and options raise here
        min_frames = getattr(enc, "min_frames", 1)
        if getattr(enc, "num_frames", 1) < min_frames:
            raise ValueError(f"encoder {self.encoder!r} needs num_frames >= {min_frames}, "
                             f"got {enc.num_frames}")

    def encoder_options(self) -> dict:
        opts = dict(self.encoder_kwargs)
        opts.update({k: getattr(self, k) for k in ("num_frames", "feature_dim")
                     if getattr(self, k) is not None})
        opts["dtype"] = self.compute_dtype
        return opts

    def make_encoder(self) -> nn.Module:
        return make_encoder(self.encoder, **self.encoder_options())


class TwinQ(nn.Module):
    """Two Q heads, each MLP [feature + A] -> hidden -> hidden -> 1 (ReLU), orthogonal init.

    features [..., F] (any float dtype), action [..., A] -> Q values [2, ...] float32; the MLPs
    compute in `dtype` (float32 parameters)."""
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array, action: Array) -> Array:
        dtype = canonical_dtype(self.dtype)
        dense = lambda n, name: nn.Dense(n, kernel_init=_ORTHO, dtype=dtype,  # noqa: E731
                                         param_dtype=jnp.float32, name=name)
        x = jnp.concatenate([features, action], -1)
        qs = []
        for i in range(2):
            h = x
            for j in range(2):
                h = nn.relu(dense(self.hidden_dim, f"q{i + 1}_{j}")(h))
            qs.append(dense(1, f"q{i + 1}_out")(h)[..., 0].astype(jnp.float32))
        return jnp.stack(qs)                                           # [2, ...] float32


class PolicyMLP(nn.Module):
    """features [..., F] -> hidden -> hidden -> (mean, log_std) [..., A] each, float32, with
    log_std = tanh rescaled to bounds. The MLP computes in `dtype` (float32 parameters); its
    output is cast to float32 before the split, the tanh and the rescaling."""
    hidden_dim: int
    action_dim: int
    log_std_min: float
    log_std_max: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> tuple[Array, Array]:
        dtype = canonical_dtype(self.dtype)
        dense = lambda n, name: nn.Dense(n, kernel_init=_ORTHO, dtype=dtype,  # noqa: E731
                                         param_dtype=jnp.float32, name=name)
        h = features
        for j in range(2):
            h = nn.relu(dense(self.hidden_dim, f"hidden_{j}")(h))
        out = dense(2 * self.action_dim, "out")(h).astype(jnp.float32)
        mean, log_std = jnp.split(out, 2, axis=-1)
        log_std = jnp.tanh(log_std)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (log_std + 1.0)
        return mean, log_std


@struct.dataclass
class SACState:
    critic: TrainState          # params {"trunk", "head", "q"}
    target: Any                 # EMA of critic.params
    actor: TrainState           # params {"head", "policy"}
    alpha: TrainState           # params {"log_alpha": []}
    updates: Array              # [] int32: critic updates done
    config: SACConfig = struct.field(pytree_node=False)
    action_dim: int = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class _Nets:
    encoder: nn.Module
    q: TwinQ
    policy: PolicyMLP


def _nets(config: SACConfig, action_dim: int) -> _Nets:
    return _Nets(config.make_encoder(), TwinQ(config.hidden_dim, config.compute_dtype),
                 PolicyMLP(config.hidden_dim, action_dim, config.log_std_min, config.log_std_max,
                           config.compute_dtype))


def _params(variables) -> dict:
    return dict(variables.get("params", {}))


def _view(config: SACConfig, obs: Array, encoder: nn.Module) -> Array:
    """Storage-format obs -> what the network sees when acting (centre paste for pixels)."""
    if encoder.observation == "pixels" and obs.shape[-2] != config.image_size:
        return augment.center_paste(obs, config.image_size)
    return obs


def init(key: Array, obs_spec, action_spec, config: SACConfig = SACConfig()) -> SACState:
    """obs_spec: one observation as stored ([T, *frame], e.g. (3, 100, 100, 3) uint8);
    action_spec: anything with .shape == (A,) (actions live in [-1, 1])."""
    action_dim = int(action_spec.shape[-1])
    nets = _nets(config, action_dim)
    obs = jnp.zeros((1,) + tuple(obs_spec.shape), getattr(obs_spec, "dtype", jnp.float32))
    obs = _view(config, obs, nets.encoder)
    k_trunk, k_head, k_q, k_actor_head, k_policy = jax.random.split(key, 5)
    trunk = _params(nets.encoder.init(k_trunk, obs, method="trunk"))
    h = nets.encoder.apply({"params": trunk}, obs, method="trunk")
    head = _params(nets.encoder.init(k_head, h, method="head"))
    feat = nets.encoder.apply({"params": head}, h, method="head")
    q = _params(nets.q.init(k_q, feat, jnp.zeros((1, action_dim))))
    actor_head = _params(nets.encoder.init(k_actor_head, h, method="head"))
    policy = _params(nets.policy.init(k_policy, feat))
    critic_params = {"trunk": trunk, "head": head, "q": q}
    critic = TrainState.create(apply_fn=None, params=critic_params,
                               tx=optax.adam(config.critic_lr, b1=config.beta1))
    actor = TrainState.create(apply_fn=None, params={"head": actor_head, "policy": policy},
                              tx=optax.adam(config.actor_lr, b1=config.beta1))
    alpha = TrainState.create(apply_fn=None,
                              params={"log_alpha": jnp.log(jnp.float32(config.init_temperature))},
                              tx=optax.adam(config.alpha_lr, b1=config.alpha_beta1))
    target = jax.tree.map(jnp.copy, critic_params)
    return SACState(critic=critic, target=target, actor=actor, alpha=alpha,
                    updates=jnp.zeros((), jnp.int32), config=config, action_dim=action_dim)


# ----------------------------------------------------------------------------- network calls


def _trunk(nets: _Nets, params, obs: Array) -> Array:
    return nets.encoder.apply({"params": params["trunk"]}, obs, method="trunk")


def _q_from_trunk(nets: _Nets, params, h: Array, action: Array) -> Array:
    feat = nets.encoder.apply({"params": params["head"]}, h, method="head")
    return nets.q.apply({"params": params["q"]}, feat, action)


def _policy_from_trunk(nets: _Nets, actor_params, h: Array) -> tuple[Array, Array]:
    feat = nets.encoder.apply({"params": actor_params["head"]}, h, method="head")
    return nets.policy.apply({"params": actor_params["policy"]}, feat)


def _sample_action(mean: Array, log_std: Array, key: Array,
                   axis_name: Optional[str] = None) -> tuple[Array, Array]:
    """tanh-squashed Gaussian sample and its log-probability [..., A] -> ([..., A], [...]).

    `axis_name`: mean is this shard's rows of a batch split over that mesh axis (the noise is
    the whole batch's, sliced: `flare_jax.mesh.batch_draw`)."""
    noise = mesh_lib.batch_draw(jax.random.normal, key, mean.shape, axis_name)
    u = mean + noise * jnp.exp(log_std)
    log_prob = jnp.sum(-0.5 * noise ** 2 - log_std - 0.5 * math.log(2 * math.pi), -1)
    # log|d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and stable
    log_prob -= jnp.sum(2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)
    return jnp.tanh(u), log_prob


def init_seeds(keys: Array, obs_spec, action_spec, config: SACConfig = SACConfig()) -> SACState:
    """`init` for S seeds: keys [S, 2] -> an SACState whose leaves have a leading seed axis S.

    Equal to `jax.vmap(init)` (the same keys give the same parameters), but one seed at a time
    (`flare_jax.loop.init_seeds`): the orthogonal initialiser's QR over a seed batch deadlocked
    XLA's CPU thread pool (jaxlib 0.10.2).
    """
    return loop.init_seeds(lambda k: init(k, obs_spec, action_spec, config), keys)


def act(state: SACState, obs: Array, key: Array, deterministic: bool = False) -> Array:
    """obs [N, T, *frame] (storage format) -> actions [N, A] in [-1, 1]."""
    nets = _nets(state.config, state.action_dim)
    h = _trunk(nets, state.critic.params, _view(state.config, obs, nets.encoder))
    mean, log_std = _policy_from_trunk(nets, state.actor.params, h)
    if deterministic:
        return jnp.tanh(mean)
    return _sample_action(mean, log_std, key)[0]


# ----------------------------------------------------------------------------- update


def augment_batch(config: SACConfig, key: Array, batch: Batch, encoder: nn.Module,
                  axis_name: Optional[str] = None) -> tuple[Array, Array]:
    """The network's view of (obs, next_obs) for an update."""
    obs, next_obs = batch.obs, batch.next_obs
    if encoder.observation != "pixels" or config.augmentation == "none":
        return _view(config, obs, encoder), _view(config, next_obs, encoder)
    if config.augmentation == "translate":
        return augment.translate(key, obs, next_obs, config.image_size, axis_name)
    return augment.random_crop(key, obs, next_obs, config.image_size, axis_name)


def _soft_update(target, online, tau: float):
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


def target_entropy(state: SACState) -> float:
    """The temperature's entropy target: config.target_entropy, default -|A|."""
    return (-float(state.action_dim) if state.config.target_entropy is None
            else float(state.config.target_entropy))


def critic_loss(critic_params, state: SACState, obs: Array, next_obs: Array, batch: Batch,
                key: Array, axis_name: Optional[str] = None) -> tuple[Array, tuple[Array, Array]]:
    """The critic loss MSE(Q1, y) + MSE(Q2, y) at `critic_params` -> (loss [], (q [2, B], y [B])).

    y = r + discount * (min_i Q_target,i(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s') drawn with
    `key`, under stop_gradient; the actor, target and temperature are `state`'s. obs / next_obs
    are the network's view [B, T, *frame] (`augment_batch`). Differentiable in critic_params:
    the trunk (shared convs), head and Q MLPs; `update` uses exactly this function.
    """
    config = state.config
    nets = _nets(config, state.action_dim)
    alpha = jnp.exp(state.alpha.params["log_alpha"])
    h_next_target = _trunk(nets, state.target, next_obs)
    if config.share_frames and getattr(nets.encoder, "per_frame", False):
        # encode obs's T frames and next_obs's newest frame only, T+1 in all
        enc = lambda p, x, method: nets.encoder.apply({"params": p}, x, method=method)  # noqa: E731
        # Frames whose latents need no gradient (the encoder's detached oldest d of obs, and
        # next_obs's newest) go through the convs once with frozen parameters: no backward
        # pass and no saved activations for them.
        d = nets.encoder.detached_frames
        frozen = jax.lax.stop_gradient(critic_params["trunk"])
        z_frozen = enc(frozen, jnp.concatenate([obs[:, :d], next_obs[:, -1:]], axis=1),
                       "encode_frames")                                   # [B, d + 1, ...]
        z_live = enc(critic_params["trunk"], obs[:, d:], "encode_frames")  # [B, T - d, ...]
        z = jnp.concatenate([z_frozen[:, :d], z_live], axis=1)            # [B, T, ...]
        h = enc(critic_params["trunk"], z, "fuse_latents")
        z_next = jax.lax.stop_gradient(jnp.concatenate([z[:, 1:], z_frozen[:, d:]], axis=1))
        h_next = jax.lax.stop_gradient(enc(critic_params["trunk"], z_next, "fuse_latents"))
    else:
        h = _trunk(nets, critic_params, obs)
        h_next = jax.lax.stop_gradient(_trunk(nets, critic_params, next_obs))
    mean, log_std = _policy_from_trunk(nets, state.actor.params, h_next)
    next_action, next_log_prob = _sample_action(mean, log_std, key, axis_name)
    target_q = _q_from_trunk(nets, state.target, h_next_target, next_action)
    target_v = jnp.min(target_q, 0) - alpha * next_log_prob
    y = jax.lax.stop_gradient(batch.reward + batch.discount * target_v)
    q = _q_from_trunk(nets, critic_params, h, batch.action)               # [2, B]
    loss = jnp.sum(jnp.mean((q - y[None]) ** 2, axis=1))                  # MSE(Q1,y) + MSE(Q2,y)
    return loss, (q, y)


def actor_loss(actor_params, critic_params, state: SACState, obs: Array, key: Array,
               axis_name: Optional[str] = None) -> tuple[Array, Array]:
    """The actor loss mean(alpha log pi(a|s) - min_i Q_i(s, a)), a ~ pi(.|s) drawn with `key`
    -> (loss [], log_prob [B]).

    The policy reads the critic's trunk output under stop_gradient (the convs are the critic's
    and get exactly zero gradient from this loss), and the Q heads are held fixed; alpha is
    `state`'s. obs: the network's view [B, T, *frame].
    """
    nets = _nets(state.config, state.action_dim)
    alpha = jnp.exp(state.alpha.params["log_alpha"])
    h = jax.lax.stop_gradient(_trunk(nets, critic_params, obs))
    mean, log_std = _policy_from_trunk(nets, actor_params, h)
    action, log_prob = _sample_action(mean, log_std, key, axis_name)
    q_pi = _q_from_trunk(nets, jax.lax.stop_gradient(critic_params), h, action)
    return jnp.mean(alpha * log_prob - jnp.min(q_pi, 0)), log_prob


def alpha_loss(alpha_params, log_prob: Array, entropy_target: float) -> Array:
    """The temperature loss mean(alpha (-log pi - target entropy)), log_prob [B] held fixed."""
    gap = jax.lax.stop_gradient(-log_prob - entropy_target)
    return jnp.mean(jnp.exp(alpha_params["log_alpha"]) * gap)


def update(state: SACState, batch: Batch, key: Array, count: Optional[Array] = None,
           axis_name: Optional[str] = None) -> tuple[SACState, dict]:
    """One SAC update: critic every call; actor+temperature and targets every 2 calls.

    batch.reward [B], batch.discount [B] (gamma included: y = r + discount * V(s')),
    batch.obs / next_obs [B, T, *frame] in storage format, batch.action [B, A].
    `count` (default `state.updates`) is the update number that decides the every-2 steps; pass
    it un-batched when vmapping over seeds so the periodic updates stay real conditionals.
    `axis_name` (inside `shard_map`): `batch` is this data shard's part of the batch; the random
    draws are the whole batch's rows (`flare_jax.mesh.batch_draw`), gradients and metrics are
    averaged over the axis before they are applied, so every shard applies the same update: the
    one-device update on the concatenated batch (shards of equal size), up to float sum order.
    The losses are `critic_loss`, `actor_loss` and `alpha_loss`.
    """
    config = state.config
    count = state.updates if count is None else count
    nets = _nets(config, state.action_dim)
    chex.assert_rank([batch.reward, batch.discount], 1)
    k_aug, k_next, k_pi = jax.random.split(key, 3)
    obs, next_obs = augment_batch(config, k_aug, batch, nets.encoder, axis_name)
    share = config.share_frames and getattr(nets.encoder, "per_frame", False)

    (c_loss, (q, y)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
        state.critic.params, state, obs, next_obs, batch, k_next, axis_name)
    grads = mesh_lib.pmean(grads, axis_name)
    critic = state.critic.apply_gradients(grads=grads)
    metrics = mesh_lib.pmean({"critic_loss": c_loss, "q_mean": jnp.mean(q),
                              "target_q": jnp.mean(y)}, axis_name)
    metrics["critic_grad_norm"] = optax.global_norm(grads)
    if share:
        metrics["frame_overlap_violations"] = mesh_lib.psum(jnp.sum(
            jnp.any((batch.obs[:, 1:] != batch.next_obs[:, :-1]).reshape(batch.obs.shape[0], -1), 1)),
            axis_name)

    # --- actor and temperature, every actor_update_period critic updates (RAD order: after the
    # critic step, with the updated critic; the trunk output is detached).
    def actor_and_alpha(args):
        actor, alpha_state = args
        (a_loss, log_prob), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(
            actor.params, critic.params, state, obs, k_pi, axis_name)
        actor_grads = mesh_lib.pmean(actor_grads, axis_name)
        actor = actor.apply_gradients(grads=actor_grads)
        t_loss, alpha_grad = jax.value_and_grad(alpha_loss)(alpha_state.params, log_prob,
                                                            target_entropy(state))
        alpha_state = alpha_state.apply_gradients(grads=mesh_lib.pmean(alpha_grad, axis_name))
        return actor, alpha_state, {
            **mesh_lib.pmean({"actor_loss": a_loss, "alpha_loss": t_loss,
                              "entropy": -jnp.mean(log_prob)}, axis_name),
            "actor_grad_norm": optax.global_norm(actor_grads)}

    def skip(args):
        actor, alpha_state = args
        zero = jnp.zeros((), jnp.float32)
        return actor, alpha_state, {"actor_loss": zero, "actor_grad_norm": zero, "alpha_loss": zero,
                                    "entropy": zero}

    do_actor = count % config.actor_update_period == 0
    actor, alpha_state, actor_metrics = jax.lax.cond(do_actor, actor_and_alpha, skip,
                                                     (state.actor, state.alpha))
    metrics.update(actor_metrics)
    metrics["actor_updated"] = do_actor
    metrics["alpha"] = jnp.exp(alpha_state.params["log_alpha"])

    # --- targets: encoder (trunk + head) with encoder_tau, Q heads with critic_tau
    def soft(target):
        return {"trunk": _soft_update(target["trunk"], critic.params["trunk"], config.encoder_tau),
                "head": _soft_update(target["head"], critic.params["head"], config.encoder_tau),
                "q": _soft_update(target["q"], critic.params["q"], config.critic_tau)}

    do_target = count % config.target_update_period == 0
    target = jax.lax.cond(do_target, soft, lambda t: t, state.target)
    new_state = state.replace(critic=critic, target=target, actor=actor, alpha=alpha_state,
                              updates=state.updates + 1)
    metrics["param_norm"] = optax.global_norm((critic.params, actor.params, alpha_state.params))
    return new_state, metrics


def update_many(state: SACState, batches: Batch, key: Array) -> tuple[SACState, dict]:
    """`update` over batches with a leading axis [N, B, ...] in one `lax.scan`; metrics [N]."""
    n = jax.tree.leaves(batches)[0].shape[0]

    def body(s, xs):
        batch, k = xs
        return update(s, batch, k)

    return jax.lax.scan(body, state, (batches, jax.random.split(key, n)))
