"""Rainbow network and loss: an independent dm-haiku implementation of the reference Flare Rainbow
network gives the same Q-values from the same weights; the categorical projection and loss match
a float64 reference; noisy layers, dueling aggregation, priorities and target copies."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import rainbow
from flare_jax.data.replay import Batch

KEY = jax.random.PRNGKey(0)
A = 6


def _state(torso="atari_flare", **kw):
    shape = (4, 84, 84, 1) if torso != "mlp" else (1, 4)
    dtype = jnp.uint8 if torso != "mlp" else jnp.float32
    cfg = rainbow.RainbowConfig(torso=torso, **kw)
    return rainbow.init(KEY, jax.ShapeDtypeStruct(shape, dtype), A, cfg)


def _obs(n=5, key=KEY):
    return jax.random.randint(key, (n, 4, 84, 84, 1), 0, 256).astype(jnp.uint8)


# --------------------------------------------------------------- independent Haiku reference

def _haiku_flare_rainbow(obs, layer_keys, num_actions, num_atoms=51):
    """reference.md section 4, written from the text: per-frame torso (conv 16@8x8/4 ReLU,
    32@4x4/2 ReLU, 32@3x3/1 linear) with shared weights, flow, Dense 256 + LayerNorm, noisy
    dueling C51 heads (DQN Zoo noisy_linear with explicit per-layer noise keys)."""
    x = obs.astype(jnp.float32) / 255.0                         # [B, 4, 84, 84, 1]
    b = x.shape[0]
    c1 = hk.Conv2D(16, 8, 4, padding="VALID", name="c1")
    c2 = hk.Conv2D(32, 4, 2, padding="VALID", name="c2")
    c3 = hk.Conv2D(32, 3, 1, padding="VALID", name="c3")
    zs = []
    for t in range(4):
        h = jax.nn.relu(c1(x[:, t]))
        h = jax.nn.relu(c2(h))
        zs.append(c3(h).reshape(b, -1))                         # 7*7*32 = 1568, no ReLU
    flows = [zs[i] - jax.lax.stop_gradient(zs[i - 1]) for i in range(1, 4)]
    h = jnp.concatenate(zs[1:] + flows, axis=-1)                # 9408
    h = hk.Linear(256, name="proj")(h)
    h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-5, name="ln")(h)

    def noisy(x, n_out, key, name, bias=True):
        n_in = x.shape[-1]
        k_in, k_out = jax.random.split(key)
        f = lambda k, n: (lambda e: jnp.sign(e) * jnp.sqrt(jnp.abs(e)))(  # noqa: E731
            jax.random.truncated_normal(k, -2.0, 2.0, (1, n)))
        mu = hk.Linear(n_out, with_bias=bias, name=name + "_mu")(x)
        sigma = hk.Linear(n_out, name=name + "_sigma")(x * f(k_in, n_in)) * f(k_out, n_out)
        return mu + sigma

    adv = noisy(jax.nn.relu(noisy(h, 512, layer_keys[0], "ah")), num_actions * num_atoms,
                layer_keys[1], "ao", bias=False).reshape(b, num_actions, num_atoms)
    val = noisy(jax.nn.relu(noisy(h, 512, layer_keys[2], "vh")), num_atoms, layer_keys[3], "vo",
                bias=False).reshape(b, 1, num_atoms)
    return val + adv - adv.mean(axis=1, keepdims=True)


def _to_haiku(p):
    t, c = p["torso"], p["torso"]["convs"]
    hp = {f"c{i + 1}": {"w": c[f"conv_{i}"]["kernel"], "b": c[f"conv_{i}"]["bias"]} for i in range(3)}
    hp["proj"] = {"w": t["projection"]["dense"]["kernel"], "b": t["projection"]["dense"]["bias"]}
    hp["ln"] = {"scale": t["projection"]["layer_norm"]["scale"],
                "offset": t["projection"]["layer_norm"]["bias"]}
    for ours, theirs in (("advantage_hidden", "ah"), ("advantage_out", "ao"),
                         ("value_hidden", "vh"), ("value_out", "vo")):
        mu = {"w": p[ours]["mu"]["kernel"]}
        if "bias" in p[ours]["mu"]:
            mu["b"] = p[ours]["mu"]["bias"]
        hp[theirs + "_mu"] = mu
        hp[theirs + "_sigma"] = {"w": p[ours]["sigma"]["kernel"], "b": p[ours]["sigma"]["bias"]}
    return hp


def test_flax_network_equals_independent_haiku_network():
    state = _state()
    # randomise every parameter so nothing (zero bias, unit LN scale) hides a mismatch
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    params = tree.unflatten([l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    obs = _obs()
    noise_key = jax.random.PRNGKey(9)
    ours = rainbow.apply_network(state, params, obs, noise_key)
    ref_fn = hk.without_apply_rng(hk.transform(
        lambda o, ks: _haiku_flare_rainbow(o, ks, A)))
    theirs = ref_fn.apply(_to_haiku(params), obs, rainbow.noise_keys(noise_key))
    assert ours.shape == (5, A, 51)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rainbow.q_values(state.config, ours),
                               jnp.sum(jax.nn.softmax(theirs) * jnp.linspace(-10, 10, 51), -1),
                               rtol=1e-5, atol=1e-5)
    # and the Haiku parameter tree has exactly the Flax parameter count
    n_hk = sum(x.size for x in jax.tree.leaves(_to_haiku(params)))
    assert n_hk == sum(x.size for x in jax.tree.leaves(params))


def test_noise_is_deterministic_given_a_key_and_resampled_per_key():
    state = _state()
    obs = _obs(2)
    f = jax.jit(lambda k: rainbow.apply_network(state, state.params, obs, k))
    a, b, c = f(jax.random.PRNGKey(1)), f(jax.random.PRNGKey(1)), f(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-4
    mean_net = rainbow.apply_network(state, state.params, obs, None)
    assert np.abs(np.asarray(a - mean_net)).max() > 1e-4


def test_dueling_aggregation():
    state = _state("mlp")
    obs = jax.random.normal(KEY, (7, 1, 4))
    logits = rainbow.apply_network(state, state.params, obs, jax.random.PRNGKey(3))
    net = rainbow.make_network(state.config, A)
    _, inter = net.apply({"params": state.params}, obs, jax.random.PRNGKey(3),
                         capture_intermediates=True)
    value = inter["intermediates"]["value_out"]["__call__"][0]            # [7, 51]
    adv = inter["intermediates"]["advantage_out"]["__call__"][0].reshape(7, A, 51)
    np.testing.assert_allclose(logits, value[:, None] + adv - adv.mean(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(logits.mean(1), value, atol=1e-5)


def _project_f64(support, probs, reward, discount):
    """C51 projection of r + discount * z onto the support (float64, loops)."""
    z = np.asarray(support, np.float64)
    dz = z[1] - z[0]
    out = np.zeros_like(z)
    for p, zj in zip(probs, z):
        tz = np.clip(reward + discount * zj, z[0], z[-1])
        bj = (tz - z[0]) / dz
        lo, hi = int(np.floor(bj)), int(np.ceil(bj))
        if lo == hi:
            out[lo] += p
        else:
            out[lo] += p * (hi - bj)
            out[hi] += p * (bj - lo)
    return out


def test_categorical_double_q_loss_matches_float64_reference():
    state = _state("mlp")
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(11), 5)
    b = 16
    batch = Batch(obs=jax.random.normal(k1, (b, 1, 4)), action=jax.random.randint(k2, (b,), 0, A),
                  reward=jax.random.normal(k3, (b,)) * 3, discount=jax.random.uniform(k4, (b,)),
                  next_obs=jax.random.normal(k5, (b, 1, 4)), env=jnp.zeros(b, jnp.int32),
                  slot=jnp.zeros(b, jnp.int32))
    state = state.replace(target_params=jax.tree.map(lambda x: x * 1.3, state.params))
    key = jax.random.PRNGKey(4)
    _, per_sample = rainbow.loss_fn(state, state.params, batch, jnp.ones(b), key)
    k_online, k_target, k_select = jax.random.split(key, 3)
    lt = np.asarray(rainbow.apply_network(state, state.params, batch.obs, k_online), np.float64)
    tt = np.asarray(rainbow.apply_network(state, state.target_params, batch.next_obs, k_target), np.float64)
    st = np.asarray(rainbow.apply_network(state, state.params, batch.next_obs, k_select), np.float64)
    z = np.linspace(-10, 10, 51)
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    for i in range(b):
        a_star = np.argmax((softmax(st[i]) * z).sum(-1))          # online net selects (double Q)
        target = _project_f64(z, softmax(tt[i, a_star]), float(batch.reward[i]), float(batch.discount[i]))
        logp = lt[i, int(batch.action[i])] - np.log(np.exp(lt[i, int(batch.action[i])]).sum())
        np.testing.assert_allclose(float(per_sample[i]), -(target * logp).sum(), rtol=1e-4, atol=1e-5)


def test_update_priorities_weights_and_target_copy():
    state = _state("mlp", target_update_period=3, learning_rate=1e-3)
    b = 8
    batch = Batch(obs=jax.random.normal(KEY, (b, 1, 4)), action=jnp.arange(b) % A,
                  reward=jnp.ones(b), discount=jnp.full(b, 0.97),
                  next_obs=jax.random.normal(KEY, (b, 1, 4)), env=jnp.zeros(b, jnp.int32),
                  slot=jnp.zeros(b, jnp.int32))
    up = jax.jit(rainbow.update)
    s1, m, prio = up(state, batch, jnp.ones(b), KEY)
    _, per_sample = rainbow.loss_fn(state, state.params, batch, jnp.ones(b), KEY)
    np.testing.assert_allclose(prio, np.clip(per_sample, 0, 100), rtol=1e-6)
    # importance weights scale the loss sample by sample
    w = jnp.linspace(0.1, 1.0, b)
    loss_w, _ = rainbow.loss_fn(state, state.params, batch, w, KEY)
    np.testing.assert_allclose(float(loss_w), float(jnp.mean(w * per_sample)), rtol=1e-6)
    first_leaf = lambda t: np.asarray(jax.tree.leaves(t)[0])  # noqa: E731
    s2, _, _ = up(s1, batch, jnp.ones(b), KEY)
    assert np.array_equal(first_leaf(s2.target_params), first_leaf(state.params))  # not yet
    s3, _, _ = up(s2, batch, jnp.ones(b), KEY)                   # 3rd update: hard copy
    for t, p in zip(jax.tree.leaves(s3.target_params), jax.tree.leaves(s3.params)):
        np.testing.assert_array_equal(t, p)


def test_act_is_greedy_on_noisy_q_and_epsilon_explores():
    state = _state("mlp")
    obs = jax.random.normal(KEY, (64, 1, 4))
    a = rainbow.act(state, obs, jax.random.PRNGKey(1))
    q = rainbow.q_values(state.config, rainbow.apply_network(
        state, state.params, obs, jax.random.split(jax.random.PRNGKey(1), 3)[0]))
    np.testing.assert_array_equal(a, jnp.argmax(q, -1))
    rand = rainbow.act(state, obs, jax.random.PRNGKey(1), epsilon=1.0)
    assert len(set(np.asarray(rand).tolist())) > 2


def test_config_errors():
    with pytest.raises(ValueError, match="v_max > v_min"):
        rainbow.RainbowConfig(v_min=1.0, v_max=-1.0)
    with pytest.raises(ValueError, match="unknown torso 'resnet'; valid torsos: atari_flare"):
        _state("resnet")
