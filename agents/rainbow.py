"""Distributional Rainbow (DQN Zoo's, reference.md section 4) with any torso, as pure functions.

    config = RainbowConfig(torso="atari_flare")
    state = init(key, obs_spec, num_actions, config)
    actions = act(state, obs, key)                              # noisy greedy (epsilon optional)
    state, metrics, priorities = update(state, batch, weights, key)

Network: torso from `flare_jax.encoders` (AtariFlareTorso, AtariBaselineTorso or an MLP for vector
observations) -> dueling C51 heads with factorised-Gaussian noisy layers (DQN Zoo's
`noisy_linear`: noise from a truncated normal in [-2, 2] through sign(x) sqrt|x|, shared over
the batch; mu ~ U(+-1/sqrt(n_in)), sigma = sigma0/sqrt(n_in)):
  value:     noisy 512 (bias) -> ReLU -> noisy 51 (no bias)
  advantage: noisy 512 (bias) -> ReLU -> noisy |A|*51 (no bias)
  q_logits = V + A - mean_a A   [B, |A|, 51],  Q = sum softmax(q_logits) * z,  z in [-10, 10].

The noise of one network call is a function of one key: `noise_keys(key)` splits it into the four
layers' keys (advantage hidden, advantage out, value hidden, value out), each split into
(input noise, output noise). The loss evaluates the online net on s_t, and the online net (action
selection, double Q) and the target net on s_{t+n} with three independent keys.

Loss: rlax's categorical double-Q learning (projection of the target distribution on the support),
weighted by the importance weights; priorities = clip(per-sample loss, 0, 100). Adam(6.25e-5,
eps 1.5625e-4) after global-norm clipping at 10; hard target copy every `target_update_period`
updates (32,000 frames / 16 frames per update = 2,000).

Precision (`compute_dtype`, `flare_jax.precision`): with "bfloat16" the torso and the noisy
layers' matmuls compute in bfloat16 (inputs and float32 weights cast; the noise itself is float32);
the value and advantage outputs are cast to float32 before the dueling aggregation, so the logits,
softmax, C51 projection, log-softmax and loss are float32. Parameters, gradients, optimiser
states and targets are float32 either way.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import rlax
from flax import struct

from flare_jax import mesh as mesh_lib
from flare_jax import precision
from flare_jax.encoders import make_encoder
from flare_jax.encoders.layers import dqn_uniform
from flare_jax.precision import COMPUTE_DTYPES, canonical_dtype

Array = jax.Array


def _f(default, help_: str, **extra):
    return dataclasses.field(default=default, metadata=dict(help=help_, **extra))


TORSOS = ("atari_flare", "atari_baseline", "mlp")


@dataclasses.dataclass(frozen=True)
class RainbowConfig:
    """Hyperparameters; defaults are DQN Zoo's Rainbow with the Flare torso."""
    torso: str = _f("atari_flare", "torso: atari_flare (Flare), atari_baseline (frame stack), "
                                   "mlp (vector observations); alias --network",
                     choices=TORSOS, aliases=("network",))
    torso_kwargs: tuple[tuple[str, Any], ...] = _f((), "other torso options, key=value items")
    num_atoms: int = _f(51, "C51 atoms")
    v_min: float = _f(-10.0, "C51 support minimum")
    v_max: float = _f(10.0, "C51 support maximum")
    head_hidden: int = _f(512, "width of the noisy dueling heads")
    noisy_sigma0: float = _f(0.1, "initial noise scale of the noisy layers")
    learning_rate: float = _f(6.25e-5, "Adam learning rate")
    adam_eps: float = _f(1.5625e-4, "Adam epsilon")
    max_global_norm: float = _f(10.0, "gradient clipping by global norm")
    target_update_period: int = _f(2_000, "updates between hard target copies (2,000 = 32,000 "
                                          "frames at one update per 16 frames)")
    max_priority: float = _f(100.0, "priorities are clipped to [0, this]")
    compute_dtype: str = _f("float32", "dtype of the network's matmuls and convs (torso and noisy "
                                       "heads); parameters, optimiser states, targets, logits "
                                       "and the loss stay float32", choices=COMPUTE_DTYPES)

    def __post_init__(self):
        if isinstance(self.torso_kwargs, dict):
            object.__setattr__(self, "torso_kwargs", tuple(sorted(self.torso_kwargs.items())))
        if self.torso not in TORSOS:
            raise ValueError(f"unknown torso {self.torso!r}; valid torsos: {', '.join(TORSOS)}")
        precision.check_config(self.compute_dtype, self.torso_kwargs, "torso")
        if self.num_atoms < 2 or self.v_max <= self.v_min:
            raise ValueError(f"need num_atoms >= 2 and v_max > v_min, got {self.num_atoms}, "
                             f"[{self.v_min}, {self.v_max}]")
        for name in ("target_update_period", "head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "adam_eps", "max_global_norm", "max_priority"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.noisy_sigma0 < 0:
            raise ValueError(f"noisy_sigma0 must be >= 0, got {self.noisy_sigma0}")
        make_encoder(self.torso, **dict(self.torso_kwargs))   # unknown options raise here

    @property
    def support(self) -> Array:
        return jnp.linspace(self.v_min, self.v_max, self.num_atoms)


def _noise_sqrt(key: Array, size: int) -> Array:
    noise = jax.random.truncated_normal(key, -2.0, 2.0, (1, size))
    return jax.lax.stop_gradient(jnp.sign(noise) * jnp.sqrt(jnp.abs(noise)))


class NoisyDense(nn.Module):
    """DQN Zoo's factorised noisy linear layer. `key=None` gives the mean network (mu only).

    x [..., n_in] -> [..., features]; the two matmuls compute in `dtype` (float32 parameters), the
    noise is float32: the output is float32 with a key and `dtype` without."""
    features: int
    sigma0: float
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, key: Optional[Array]) -> Array:
        n_in = x.shape[-1]
        dtype = canonical_dtype(self.dtype)
        mu_init = dqn_uniform(n_in)
        mu = nn.Dense(self.features, use_bias=self.use_bias, kernel_init=mu_init, bias_init=mu_init,
                      dtype=dtype, param_dtype=jnp.float32, name="mu")(x)
        sigma_init = nn.initializers.constant(self.sigma0 / math.sqrt(n_in))
        sigma_layer = nn.Dense(self.features, kernel_init=sigma_init, bias_init=sigma_init,
                               dtype=dtype, param_dtype=jnp.float32, name="sigma")
        if key is None:
            if self.is_initializing():
                sigma_layer(x)
            return mu
        k_in, k_out = jax.random.split(key)
        return mu + sigma_layer(x * _noise_sqrt(k_in, n_in)) * _noise_sqrt(k_out, self.features)


def noise_keys(key: Array) -> Array:
    """The 4 noisy layers' keys of one network call: advantage hidden/out, value hidden/out."""
    return jax.random.split(key, 4)


class RainbowNetwork(nn.Module):
    """obs [B, T, *frame] -> q_logits [B, |A|, atoms] float32. The heads compute in `dtype`
    (the torso in its own dtype, `make_network` gives both the config's compute_dtype)."""
    torso: nn.Module
    num_actions: int
    num_atoms: int
    head_hidden: int
    sigma0: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs: Array, key: Optional[Array]) -> Array:
        h = self.torso(obs)
        keys = [None] * 4 if key is None else list(noise_keys(key))
        noisy = functools.partial(NoisyDense, sigma0=self.sigma0, dtype=self.dtype)
        adv = nn.relu(noisy(self.head_hidden, name="advantage_hidden")(h, keys[0]))
        adv = noisy(self.num_actions * self.num_atoms, use_bias=False,
                    name="advantage_out")(adv, keys[1]).astype(jnp.float32)
        adv = adv.reshape(adv.shape[:-1] + (self.num_actions, self.num_atoms))
        val = nn.relu(noisy(self.head_hidden, name="value_hidden")(h, keys[2]))
        val = noisy(self.num_atoms, use_bias=False, name="value_out")(val, keys[3]).astype(jnp.float32)
        val = val[..., None, :]
        return val + adv - jnp.mean(adv, axis=-2, keepdims=True)


def make_network(config: RainbowConfig, num_actions: int) -> RainbowNetwork:
    torso = make_encoder(config.torso, dtype=config.compute_dtype, **dict(config.torso_kwargs))
    return RainbowNetwork(torso=torso, num_actions=num_actions, num_atoms=config.num_atoms,
                          head_hidden=config.head_hidden, sigma0=config.noisy_sigma0,
                          dtype=config.compute_dtype)


def q_values(config: RainbowConfig, q_logits: Array) -> Array:
    """[..., A, atoms] logits -> [..., A] expected returns."""
    return jnp.sum(jax.nn.softmax(q_logits) * config.support, axis=-1)


@struct.dataclass
class RainbowState:
    params: Any
    target_params: Any
    opt_state: Any
    updates: Array                                   # [] int32
    config: RainbowConfig = struct.field(pytree_node=False)
    num_actions: int = struct.field(pytree_node=False)


def _optimizer(config: RainbowConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.max_global_norm),
                       optax.adam(config.learning_rate, eps=config.adam_eps))


def init(key: Array, obs_spec, num_actions: int, config: RainbowConfig = RainbowConfig()) -> RainbowState:
    """obs_spec: one observation [T, *frame] (e.g. (4, 84, 84, 1) uint8)."""
    net = make_network(config, num_actions)
    k_params, k_noise = jax.random.split(key)
    obs = jnp.zeros((1,) + tuple(obs_spec.shape), getattr(obs_spec, "dtype", jnp.float32))
    params = net.init(k_params, obs, k_noise)["params"]
    return RainbowState(params=params, target_params=jax.tree.map(jnp.copy, params),
                        opt_state=_optimizer(config).init(params), updates=jnp.zeros((), jnp.int32),
                        config=config, num_actions=num_actions)


def apply_network(state: RainbowState, params, obs: Array, key: Optional[Array]) -> Array:
    return make_network(state.config, state.num_actions).apply({"params": params}, obs, key)


def act(state: RainbowState, obs: Array, key: Array, epsilon: float | Array = 0.0) -> Array:
    """obs [N, T, *frame] -> greedy actions [N] under fresh network noise (epsilon-greedy if > 0)."""
    k_noise, k_eps, k_rand = jax.random.split(key, 3)
    q = q_values(state.config, apply_network(state, state.params, obs, k_noise))
    greedy = jnp.argmax(q, axis=-1)
    n = obs.shape[0]
    explore = jax.random.uniform(k_eps, (n,)) < epsilon
    random_actions = jax.random.randint(k_rand, (n,), 0, state.num_actions)
    return jnp.where(explore, random_actions, greedy).astype(jnp.int32)


def loss_fn(state: RainbowState, params, batch, weights: Array, key: Array):
    """Importance-weighted double-Q categorical loss; returns (loss, per-sample losses)."""
    config = state.config
    k_online, k_target, k_select = jax.random.split(key, 3)
    logits_tm1 = apply_network(state, params, batch.obs, k_online)               # [B, A, K]
    logits_t = apply_network(state, state.target_params, batch.next_obs, k_target)
    logits_select = apply_network(state, params, batch.next_obs, k_select)
    q_select = jax.lax.stop_gradient(q_values(config, logits_select))            # [B, A]
    support = config.support
    per_sample = jax.vmap(rlax.categorical_double_q_learning,
                          in_axes=(None, 0, 0, 0, 0, None, 0, 0))(
        support, logits_tm1, batch.action, batch.reward, batch.discount, support, logits_t,
        q_select)
    chex.assert_shape(per_sample, (batch.reward.shape[0],))
    return jnp.mean(weights * per_sample), per_sample


def update(state: RainbowState, batch, weights: Array, key: Array,
           axis_name: Optional[str] = None) -> tuple[RainbowState, dict, Array]:
    """One Rainbow update on `batch` (flare_jax.data.replay.Batch: n-step reward, discount =
    gamma^n * prod(transition discounts)) with importance weights [B].

    Returns the new state, metrics and the new priorities [B] = clip(per-sample loss, 0, 100).
    `axis_name` (inside `shard_map`): `batch` is this data shard's part of the batch (weights
    normalised over the whole batch, `prioritized.sample`); gradients and metrics are averaged
    over the axis before the optimiser, so every shard applies the one-device update of the
    concatenated batch (the network noise is one draw per call, the same on every shard).
    """
    config = state.config
    (loss, per_sample), grads = jax.value_and_grad(
        lambda p: loss_fn(state, p, batch, weights, key), has_aux=True)(state.params)
    grads = mesh_lib.pmean(grads, axis_name)
    updates, opt_state = _optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    count = state.updates + 1
    # a cond, not a select: the other updates leave the target's buffers alone (no pass over
    # them); under a seed vmap the predicate is batched and the cond becomes the select
    target = jax.lax.cond(count % config.target_update_period == 0, lambda: params,
                          lambda: state.target_params)
    priorities = jnp.clip(jax.lax.stop_gradient(per_sample), 0.0, config.max_priority)
    metrics = {**mesh_lib.pmean({"loss": loss, "per_sample_loss_mean": jnp.mean(per_sample)}, axis_name),
               "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}
    return (state.replace(params=params, target_params=target, opt_state=opt_state, updates=count),
            metrics, priorities)
