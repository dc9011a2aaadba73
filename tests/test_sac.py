"""SAC update semantics (reference.md section 2) on fixed batches."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import sac
from flare_jax.data.replay import Batch

KEY = jax.random.PRNGKey(0)
STORE, VIEW, A, B = 20, 24, 2, 8


def _config(**kw):
    base = dict(encoder="flare", image_size=VIEW, hidden_dim=32,
                encoder_kwargs=(("feature_dim", 16),))
    base.update(kw)
    return sac.SACConfig(**base)


def _batch(key=KEY, b=B):
    """A batch like the replay's: next_obs is obs shifted by one frame plus a new frame."""
    k1, k2, k3 = jax.random.split(key, 3)
    frames = jax.random.randint(k1, (b, 4, STORE, STORE, 3), 0, 256).astype(jnp.uint8)
    return Batch(obs=frames[:, :3], action=jax.random.uniform(k2, (b, A), minval=-1, maxval=1),
                 reward=jax.random.normal(k3, (b,)), discount=jnp.full((b,), 0.99),
                 next_obs=frames[:, 1:], env=jnp.zeros(b, jnp.int32), slot=jnp.zeros(b, jnp.int32))


def _init(config):
    return sac.init(KEY, jax.ShapeDtypeStruct((3, STORE, STORE, 3), jnp.uint8),
                    jax.ShapeDtypeStruct((A,), jnp.float32), config)


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


UPDATE = jax.jit(sac.update)


def test_conv_weights_have_one_copy_owned_by_the_critic():
    state = _init(_config())
    assert "convs" in state.critic.params["trunk"]
    assert set(state.actor.params) == {"head", "policy"}
    assert "convs" not in str(jax.tree_util.tree_structure(state.actor.params))
    # the actor has its own Dense+LayerNorm head
    assert set(state.actor.params["head"]["projection"]) == {"dense", "layer_norm"}


def test_one_update_changes_every_critic_parameter_and_the_actor():
    state = _init(_config())
    new, metrics = UPDATE(state, _batch(), KEY)
    before, after = _flat(state.critic.params), _flat(new.critic.params)
    for name in before:
        assert not np.array_equal(before[name], after[name]), f"critic {name} did not change"
    assert bool(metrics["actor_updated"])
    assert not np.array_equal(_flat(state.actor.params)["['policy']['out']['kernel']"],
                              _flat(new.actor.params)["['policy']['out']['kernel']"])
    assert int(new.updates) == 1


def test_actor_step_leaves_conv_and_critic_parameters_untouched():
    """Changing only the actor/temperature learning rates must not change the critic at all."""
    a = UPDATE(_init(_config(actor_lr=1e-4, alpha_lr=1e-4)), _batch(), KEY)[0]
    b = UPDATE(_init(_config(actor_lr=5e-2, alpha_lr=5e-2)), _batch(), KEY)[0]
    # Bit-exact on CPU. On GPU the two configs are two compiled programs whose convolutions may
    # differ in the last bits (seen on an H200: up to 1.4e-9 absolute after Adam's division); an
    # actor gradient reaching the critic would move it by Adam steps of ~lr = 1e-4 or more.
    tol = {"rtol": 0, "atol": 0} if jax.default_backend() == "cpu" else {"rtol": 0, "atol": 1e-7}
    for name, value in _flat(a.critic.params).items():
        np.testing.assert_allclose(value, _flat(b.critic.params)[name], err_msg=name, **tol)
    assert not np.allclose(_flat(a.actor.params)["['head']['projection']['dense']['kernel']"],
                           _flat(b.actor.params)["['head']['projection']['dense']['kernel']"])


def test_targets_move_by_exactly_the_ema_rule_every_second_update():
    config = _config()
    state = _init(config)
    # make targets differ from the online critic so the rule is visible
    state = state.replace(target=jax.tree.map(lambda x: x + 0.5, state.target))
    new, _ = UPDATE(state, _batch(), KEY)          # update 0: targets move
    for part, tau in (("trunk", 0.05), ("head", 0.05), ("q", 0.01)):
        old_t, online, new_t = (_flat(p[part]) for p in (state.target, new.critic.params, new.target))
        for name in old_t:
            np.testing.assert_allclose(new_t[name], (1 - tau) * old_t[name] + tau * online[name],
                                       rtol=1e-6, atol=1e-7, err_msg=f"{part}{name}")
    newer, m = UPDATE(new, _batch(jax.random.PRNGKey(1)), KEY)   # update 1: no target move, no actor
    for name, value in _flat(new.target).items():
        np.testing.assert_array_equal(value, _flat(newer.target)[name])
    assert not bool(m["actor_updated"])
    for name, value in _flat(new.actor.params).items():
        np.testing.assert_array_equal(value, _flat(newer.actor.params)[name])


def test_critic_loss_falls_on_a_fixed_batch():
    state = _init(_config(critic_lr=1e-3))
    batch = _batch()
    losses = []
    for i in range(30):
        state, m = UPDATE(state, batch, jax.random.PRNGKey(i % 2))
        losses.append(float(m["critic_loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


def test_act_is_deterministic_when_asked_and_in_bounds():
    state = _init(_config())
    obs = _batch().obs
    act = jax.jit(sac.act, static_argnums=3)
    d1, d2 = act(state, obs, jax.random.PRNGKey(1), True), act(state, obs, jax.random.PRNGKey(2), True)
    np.testing.assert_array_equal(d1, d2)
    s1, s2 = act(state, obs, jax.random.PRNGKey(1), False), act(state, obs, jax.random.PRNGKey(2), False)
    assert not np.allclose(s1, s2)
    assert d1.shape == (B, A) and np.abs(np.asarray(s1)).max() <= 1.0


def test_tanh_gaussian_log_prob_matches_change_of_variables():
    mean, log_std = jnp.array([[0.3, -1.2]]), jnp.array([[-0.5, 0.2]])
    a, logp = sac._sample_action(mean, log_std, KEY)
    u = jnp.arctanh(a)
    std = jnp.exp(log_std)
    gauss = jnp.sum(-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi), -1)
    np.testing.assert_allclose(logp, gauss - jnp.sum(jnp.log(1 - a ** 2), -1), rtol=1e-4)


def test_log_std_bounds():
    pol = sac.PolicyMLP(8, 2, -10.0, 2.0)
    p = pol.init(KEY, jnp.zeros((1, 4)))
    p = jax.tree.map(lambda x: x * 1000.0, p)
    _, log_std = pol.apply(p, jax.random.normal(KEY, (64, 4)))
    assert float(log_std.min()) >= -10.0 and float(log_std.max()) <= 2.0


@pytest.mark.parametrize("encoder", ["frame_stack", "state_flare", "state_recurrent"])
def test_update_works_with_other_encoders(encoder):
    if encoder.startswith("state"):
        config = sac.SACConfig(encoder=encoder, hidden_dim=32, augmentation="none")
        obs_spec = jax.ShapeDtypeStruct((4, 3), jnp.float32)
        b = Batch(obs=jax.random.normal(KEY, (B, 4, 3)), action=jnp.zeros((B, A)),
                  reward=jnp.ones(B), discount=jnp.full(B, 0.99),
                  next_obs=jax.random.normal(KEY, (B, 4, 3)), env=jnp.zeros(B, jnp.int32),
                  slot=jnp.zeros(B, jnp.int32))
    else:
        config = _config(encoder=encoder)
        obs_spec = jax.ShapeDtypeStruct((3, STORE, STORE, 3), jnp.uint8)
        b = _batch()
    state = sac.init(KEY, obs_spec, jax.ShapeDtypeStruct((A,), jnp.float32), config)
    new, m = jax.jit(sac.update)(state, b, KEY)
    assert np.isfinite(float(m["critic_loss"]))
    if encoder == "state_recurrent":   # the LSTM is in the critic's trunk and trained by it
        assert not np.array_equal(*[np.asarray(jax.tree.leaves(s.critic.params["trunk"])[0])
                                    for s in (state, new)])


@pytest.mark.parametrize("encoder", ["flare", "recurrent"])
def test_sharing_frames_between_obs_and_next_obs_is_exact(encoder):
    batch = _batch()
    results = []
    for share in (True, False):
        state = _init(_config(encoder=encoder, share_frames=share))
        new, m = UPDATE(state, batch, KEY)
        results.append((new, m))
    (a, ma), (b, mb) = results
    assert int(ma["frame_overlap_violations"]) == 0
    np.testing.assert_allclose(float(ma["target_q"]), float(mb["target_q"]), rtol=1e-5)
    for name, value in _flat(b.critic.params).items():
        np.testing.assert_allclose(_flat(a.critic.params)[name], value, rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    # a batch that breaks the overlap is reported
    bad = batch.replace(next_obs=batch.next_obs[::-1])
    _, m = UPDATE(_init(_config(encoder=encoder)), bad, KEY)
    assert int(m["frame_overlap_violations"]) > 0


def test_update_many_equals_repeated_updates():
    state = _init(_config())
    batches = jax.tree.map(lambda *x: jnp.stack(x), _batch(jax.random.PRNGKey(1)), _batch(jax.random.PRNGKey(2)))
    fused, _ = jax.jit(sac.update_many)(state, batches, KEY)
    keys = jax.random.split(KEY, 2)
    s = state
    for i in range(2):
        s, _ = UPDATE(s, jax.tree.map(lambda x: x[i], batches), keys[i])
    for name, value in _flat(s.critic.params).items():
        np.testing.assert_allclose(_flat(fused.critic.params)[name], value, rtol=2e-5, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="augmentation must be one of"):
        sac.SACConfig(augmentation="flip")
    with pytest.raises(ValueError, match="unknown encoder"):
        sac.SACConfig(encoder="nope").make_encoder()
    cfg = sac.SACConfig(encoder_kwargs={"feature_dim": 50})
    assert dataclasses.replace(cfg).encoder_kwargs == (("feature_dim", 50),)
