"""--compute_dtype=bfloat16 (flare_jax.precision): convs and matmuls in bfloat16, parameters,
gradients, optimiser states, targets, losses and metrics in float32, and outputs and updates near
float32's on the same parameters.

Tolerances. bfloat16 keeps 8 significant bits, so one rounding has a relative error of at most
u = 2^-8 = 3.9e-3 (about u/sqrt(3) = 2.3e-3 rms). Each layer rounds its input, its weights and its
output (products accumulate in float32), so with independent errors adding in quadrature a
depth-L network's output has a norm-wise relative error of about 2.3e-3 * sqrt(3 L): 1.1e-2 for
the deepest network here (L = 4 convs + Dense + 3 MLP layers = 8). LayerNorm, latent flow
(z_i - z_{i-1}) and the dueling mean subtract nearly equal numbers, which amplifies relative
errors a few times, so the outputs are held to REL = 5e-2 (norm-wise, ||y_bf16 - y_f32|| /
||y_f32||), and must differ from float32's (the bfloat16 path is really taken); measured on
CPU: 0.13-0.8% for the encoders, 0.5-0.8% for Q and the policy, 0.2-1.2% for Rainbow's logits
and Q values. Gradients of a random-sign cotangent are sums that cancel, and a ReLU whose
pre-activation lies within bfloat16 noise of 0 flips its mask, so the conv stack's float32-typed
gradients are held to GRAD_REL = 0.15 against float32's (measured 0.2-4.4%), and to REL against
autodiff of the plain bfloat16 path (measured <= 1.1%). Updates: the losses and metrics agree
within REL (measured <= 0.7%), and the first Adam step of each parameter group points the same way as float32's
(cosine similarity of the parameter changes > 0.9, measured 0.938-0.9997: Adam's first step is
about lr * sign(g), so the entries whose gradient is within bfloat16 noise of 0 flip).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from agents import rainbow, sac
from experiments import presets
from flare_jax import config_flags
from flare_jax.cpu import conv as fconv
from flare_jax.encoders import make_encoder
from flare_jax.data.replay import Batch

KEY = jax.random.PRNGKey(0)
REL = 5e-2
GRAD_REL = 0.15
COS = 0.9
STORE, VIEW, A, B = 20, 24, 2, 8


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cosine(a, b) -> float:
    a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
            for t in (a, b))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _all_float32(tree, what):
    """Every floating leaf of `tree` (arrays or ShapeDtypeStructs) is float32."""
    n = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, f"{what}{jax.tree_util.keystr(path)}: {leaf.dtype}"
            n += 1
    assert n > 0


def _same_structure_and_dtypes(a, b):
    """The same leaves (paths, shapes, dtypes); static fields such as a config may differ."""
    def table(tree):        # leaves may be arrays, ShapeDtypeStructs or Python ints (a step)
        return [(jax.tree_util.keystr(p), np.shape(x), jnp.result_type(x))
                for p, x in jax.tree_util.tree_leaves_with_path(tree)]
    assert table(a) == table(b)


def _pixels(shape, key=KEY):
    return jax.random.randint(key, shape, 0, 256).astype(jnp.uint8)


# ----------------------------------------------------------------------------- encoders

ENCODER_CASES = [
    ("flare", (4, 3, 24, 24, 3), jnp.bfloat16),
    ("frame_stack", (4, 3, 24, 24, 3), jnp.bfloat16),
    ("recurrent", (4, 3, 24, 24, 3), jnp.bfloat16),
    ("atari_flare", (2, 4, 84, 84, 1), jnp.bfloat16),
    ("mlp", (8, 2, 5), jnp.bfloat16),
    ("state_recurrent", (8, 4, 3), jnp.float32),     # (s_t, LSTM state): both float32
]


@pytest.mark.parametrize("name,shape,out_dtype", ENCODER_CASES)
def test_bf16_encoder_is_near_float32_on_the_same_parameters(name, shape, out_dtype):
    x = (_pixels(shape) if len(shape) == 5 else jax.random.normal(KEY, shape))
    kw = {"feature_dim": 16} if name in ("flare", "frame_stack", "recurrent") else {}
    if name == "mlp":
        kw = {"num_frames": 2, "hidden_sizes": (64, 64)}
    enc32 = make_encoder(name, dtype="float32", **kw)
    enc16 = make_encoder(name, dtype="bfloat16", **kw)
    params = jax.jit(enc32.init)(KEY, x)
    # the bf16 encoder declares the same float32 parameters (its initialisers ignore dtype)
    _same_structure_and_dtypes(jax.eval_shape(enc16.init, KEY, x), params)
    _all_float32(params, name)
    y32 = jax.jit(enc32.apply)(params, x)
    y16 = jax.jit(enc16.apply)(params, x)
    assert y32.dtype == jnp.float32 and y16.dtype == out_dtype and y16.shape == y32.shape
    err = rel_err(y16, y32)
    assert 0 < err < REL, err


def test_chunked_conv_stack_in_bf16_keeps_float32_gradients(monkeypatch):
    """The custom VJP in bfloat16: kernel/bias gradients float32, near the float32 plain path's,
    and the chunked path near autodiff of the plain bfloat16 path."""
    monkeypatch.setattr(fconv, "CHUNK_BYTES", 20_000)            # several chunks
    key = jax.random.PRNGKey(1)
    ks, bs, cin = [], [], 3
    for i, c in enumerate((8, 8)):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        ks.append(jax.random.normal(k1, (3, 3, cin, c)) / np.sqrt(9 * cin))
        bs.append(jax.random.normal(k2, (c,)) * 0.1)
        cin = c
    x = _pixels((9, 16, 16, 3))
    cot = jax.random.normal(jax.random.PRNGKey(2), (9, 5, 5, 8))

    def grads(impl, dtype):
        loss = lambda ks, bs: jnp.sum(fconv.conv_stack(                        # noqa: E731
            ks, bs, x, (2, 1), True, 1 / 255.0, impl, dtype).astype(jnp.float32) * cot)
        return jax.jit(jax.value_and_grad(loss, (0, 1)))(ks, bs)

    (v32, g32), (v16, g16) = grads("plain", "float32"), grads("chunked", "bfloat16")
    _, g16_plain = grads("plain", "bfloat16")
    jaxpr = str(jax.make_jaxpr(lambda ks: fconv.conv_stack(ks, bs, x, (2, 1), True, 1 / 255.0,
                                                           "chunked", "bfloat16"))(ks))
    assert jaxpr.count("conv_general_dilated") >= 4                          # really chunked
    assert abs(float(v16) - float(v32)) < REL * abs(float(v32))
    for a, b, c in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), jax.tree.leaves(g16_plain)):
        assert a.dtype == jnp.float32
        assert 0 < rel_err(a, b) < GRAD_REL and rel_err(a, c) < REL


# ----------------------------------------------------------------------------- SAC


def _sac_config(encoder, dtype):
    if encoder.startswith("state"):
        return sac.SACConfig(encoder=encoder, hidden_dim=32, augmentation="none",
                             compute_dtype=dtype)
    return sac.SACConfig(encoder=encoder, image_size=VIEW, hidden_dim=32,
                         encoder_kwargs=(("feature_dim", 16),), compute_dtype=dtype)


def _sac_setup(encoder):
    """({dtype: SACState}, batch, obs_spec): the same float32 parameters under both compute dtypes
    (one init; `test_sac_init_is_float32_and_independent_of_the_compute_dtype` checks that the
    bf16 config's init declares the same float32 leaves)."""
    k1, k2, k3 = jax.random.split(KEY, 3)
    act = jax.random.uniform(k2, (B, A), minval=-1, maxval=1)
    if encoder.startswith("state"):
        s = jax.random.normal(k1, (B, 5, 3))
        spec = jax.ShapeDtypeStruct((4, 3), jnp.float32)
        obs, next_obs = s[:, :4], s[:, 1:]
    else:
        frames = _pixels((B, 4, STORE, STORE, 3), k1)
        spec = jax.ShapeDtypeStruct((3, STORE, STORE, 3), jnp.uint8)
        obs, next_obs = frames[:, :3], frames[:, 1:]
    batch = Batch(obs=obs, action=act, reward=jax.random.normal(k3, (B,)),
                  discount=jnp.full((B,), 0.99), next_obs=next_obs,
                  env=jnp.zeros(B, jnp.int32), slot=jnp.zeros(B, jnp.int32))
    state = jax.jit(lambda k: sac.init(k, spec, jax.ShapeDtypeStruct((A,), jnp.float32),
                                       _sac_config(encoder, "float32")))(KEY)
    states = {"float32": state, "bfloat16": state.replace(config=_sac_config(encoder, "bfloat16"))}
    return states, batch, spec


_sac = functools.lru_cache(maxsize=None)(_sac_setup)     # one init per encoder for the module


@pytest.mark.parametrize("encoder", ["flare", "state_flare"])
def test_sac_init_is_float32_and_independent_of_the_compute_dtype(encoder):
    states, _, spec = _sac(encoder)
    shapes16 = jax.eval_shape(lambda k: sac.init(k, spec, jax.ShapeDtypeStruct((A,), jnp.float32),
                                                 _sac_config(encoder, "bfloat16")), KEY)
    _same_structure_and_dtypes(shapes16, states["float32"])
    _all_float32(shapes16, "init")


def test_sac_q_and_policy_in_bf16_are_near_float32_and_float32_typed():
    states, batch, _ = _sac("flare")

    @jax.jit
    def heads(state):
        nets = sac._nets(state.config, state.action_dim)
        obs = sac._view(state.config, batch.obs, nets.encoder)
        h = sac._trunk(nets, state.critic.params, obs)
        q = sac._q_from_trunk(nets, state.critic.params, h, batch.action)
        mean, log_std = sac._policy_from_trunk(nets, state.actor.params, h)
        return dict(h=h, q=q, mean=mean, log_std=log_std)

    r32, r16 = heads(states["float32"]), heads(states["bfloat16"])
    assert r16["h"].dtype == jnp.bfloat16                   # the encoder computed in bf16
    for name in ("q", "mean", "log_std"):
        assert r16[name].dtype == jnp.float32 and r16[name].shape == r32[name].shape, name
        assert 0 < rel_err(r16[name], r32[name]) < REL, (name, rel_err(r16[name], r32[name]))


@pytest.mark.parametrize("encoder", ["flare", "state_flare"])
def test_one_bf16_sac_update_stays_float32_and_lands_near_float32(encoder):
    states, batch, _ = _sac(encoder)
    update = jax.jit(sac.update)
    (n32, m32), (n16, m16) = (update(states[d], batch, KEY) for d in ("float32", "bfloat16"))
    _all_float32((n16.critic, n16.target, n16.actor, n16.alpha), "state")
    for name, value in m16.items():
        assert value.dtype in (jnp.float32, jnp.bool_, jnp.int32), (name, value.dtype)
        assert np.all(np.isfinite(np.asarray(value, np.float64))), name
    for name in ("critic_loss", "actor_loss", "q_mean", "target_q", "entropy"):
        assert abs(float(m16[name]) - float(m32[name])) <= REL * abs(float(m32[name])) + 1e-6, name
    s0 = states["float32"]
    groups = {"critic": lambda s: s.critic.params, "actor": lambda s: s.actor.params,
              "target": lambda s: s.target}
    for group, get in groups.items():
        d32 = jax.tree.map(lambda a, b: a - b, get(n32), get(s0))
        d16 = jax.tree.map(lambda a, b: a - b, get(n16), get(s0))
        assert cosine(d16, d32) > COS, (group, cosine(d16, d32))


def test_bf16_sac_programs_compute_in_bf16_and_float32_programs_do_not():
    states, batch, _ = _sac("flare")
    text16 = str(jax.make_jaxpr(sac.update)(states["bfloat16"], batch, KEY))
    text32 = str(jax.make_jaxpr(sac.update)(states["float32"], batch, KEY))
    assert "bf16" not in text32
    for op in ("conv_general_dilated", "dot_general"):
        assert re.search(rf"bf16\[[^\]]*\] = {op}", text16), op


# ----------------------------------------------------------------------------- Rainbow


@functools.lru_cache(maxsize=None)
def _rainbow_states():
    """{dtype: RainbowState} of an MLP-torso Rainbow (the conv torsos' bf16 outputs are tested
    with the encoders): one init (float32 parameters), checked to equal the bf16 config's init in
    structure and dtypes."""
    spec = jax.ShapeDtypeStruct((1, 4), jnp.float32)
    cfg = {d: rainbow.RainbowConfig(torso="mlp", head_hidden=32, compute_dtype=d)
           for d in ("float32", "bfloat16")}
    state = jax.jit(lambda k: rainbow.init(k, spec, 3, cfg["float32"]))(KEY)
    shapes16 = jax.eval_shape(lambda k: rainbow.init(k, spec, 3, cfg["bfloat16"]), KEY)
    _same_structure_and_dtypes(shapes16, state)
    _all_float32(shapes16, "init")
    return {"float32": state, "bfloat16": state.replace(config=cfg["bfloat16"])}


def test_rainbow_bf16_logits_are_float32_and_near_float32():
    states = _rainbow_states()
    obs = jax.random.normal(KEY, (3, 1, 4))
    out = {}
    for d, s in states.items():
        logits = jax.jit(lambda o, k, s=s: rainbow.apply_network(s, s.params, o, k))(
            obs, jax.random.PRNGKey(3))
        out[d] = (logits, rainbow.q_values(s.config, logits))
    (l32, q32), (l16, q16) = out["float32"], out["bfloat16"]
    assert l16.dtype == q16.dtype == jnp.float32 and l16.shape == (3, 3, 51)
    assert 0 < rel_err(l16, l32) < REL
    assert rel_err(jax.nn.softmax(l16), jax.nn.softmax(l32)) < REL
    assert rel_err(q16, q32) < REL


def test_one_bf16_rainbow_update_stays_float32_and_lands_near_float32():
    states = _rainbow_states()
    b = 16
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    batch = Batch(obs=jax.random.normal(k1, (b, 1, 4)), action=jax.random.randint(k2, (b,), 0, 3),
                  reward=jax.random.normal(k3, (b,)), discount=jnp.full(b, 0.97),
                  next_obs=jax.random.normal(k2, (b, 1, 4)), env=jnp.zeros(b, jnp.int32),
                  slot=jnp.zeros(b, jnp.int32))
    update = jax.jit(rainbow.update)
    res = {d: update(s, batch, jnp.ones(b), KEY) for d, s in states.items()}
    (n32, m32, p32), (n16, m16, p16) = res["float32"], res["bfloat16"]
    _all_float32((n16.params, n16.target_params, n16.opt_state), "state")
    assert p16.dtype == jnp.float32 and 0 < rel_err(p16, p32) < REL
    for name, value in m16.items():
        assert value.dtype == jnp.float32 and np.isfinite(float(value)), name
    assert abs(float(m16["loss"]) - float(m32["loss"])) < REL * abs(float(m32["loss"]))
    s0 = states["float32"].params
    d32 = jax.tree.map(lambda a, b: a - b, n32.params, s0)
    d16 = jax.tree.map(lambda a, b: a - b, n16.params, s0)
    assert cosine(d16, d32) > COS, cosine(d16, d32)


# ----------------------------------------------------------------------------- bad input, flags


def test_other_compute_dtypes_are_refused_in_one_line_naming_the_choices():
    for make in (lambda: sac.SACConfig(compute_dtype="float16"),
                 lambda: rainbow.RainbowConfig(compute_dtype="float16")):
        with pytest.raises(ValueError, match=r"^compute_dtype must be one of float32, bfloat16, "
                                             r"got 'float16'$") as err:
            make()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="set by compute_dtype"):
        sac.SACConfig(encoder_kwargs=(("dtype", "bfloat16"),))
    with pytest.raises(ValueError, match="set by compute_dtype"):
        rainbow.RainbowConfig(torso_kwargs=(("dtype", "bfloat16"),))
    with pytest.raises(ValueError, match="^compute dtype must be one of float32, bfloat16, "
                                         "got 'float16'$"):
        make_encoder("flare", dtype="float16")


@pytest.mark.parametrize("table,preset,section", [(presets.SAC_PRESETS, "flare_paper", "sac"),
                                                  (presets.SAC_PRESETS, "state", "sac"),
                                                  (presets.RAINBOW_PRESETS, "atari", "rainbow")])
def test_compute_dtype_is_a_launcher_flag(table, preset, section):
    """The launchers' flags are `config_flags.define_flags(preset)` (experiments/cli.py)."""
    cfg = table[preset]
    fv = flags.FlagValues()
    config_flags.define_flags(cfg, fv)
    assert fv["compute_dtype"].default == "float32"
    assert list(fv["compute_dtype"].parser.enum_values) == ["float32", "bfloat16"]
    fv(["prog", "--compute_dtype=bfloat16"])
    assert getattr(config_flags.from_flags(cfg, fv), section).compute_dtype == "bfloat16"
    fresh = flags.FlagValues()
    config_flags.define_flags(cfg, fresh)
    with pytest.raises(flags.IllegalFlagValueError):
        fresh(["prog", "--compute_dtype=float16"])
