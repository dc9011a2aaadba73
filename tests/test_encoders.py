"""Pins the encoder functions of reference.md sections 1 and 4: shapes, stop-gradient, weight
sharing, order sensitivity, parameter counts, init, transforms and input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.encoders import ENCODERS, delta_orthogonal, make_encoder

KEY = jax.random.PRNGKey(0)
PIXEL = ["flare", "frame_stack", "pixel_flow", "latent_stack", "recurrent"]
SMALL = (3, 24, 24, 3)     # T, H, W, C: small frames keep the tests fast


def _pixels(shape, key=KEY, dtype=jnp.uint8):
    x = jax.random.randint(key, shape, 0, 256)
    return x.astype(dtype)


def _init(enc, x):
    return enc.init(KEY, x)


@pytest.mark.parametrize("name", PIXEL)
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32])
def test_pixel_encoder_shapes_and_dtypes(name, dtype):
    enc = make_encoder(name, num_frames=3, feature_dim=16)
    x = _pixels((2, 5) + SMALL, dtype=dtype)                  # two leading batch dims
    params = _init(enc, x)
    y = enc.apply(params, x)
    assert y.shape == (2, 5, 16) and y.dtype == jnp.float32
    single = enc.apply(params, x[0, 0])                        # unbatched [T, H, W, C]
    assert single.shape == (16,)
    np.testing.assert_allclose(single, y[0, 0], rtol=1e-5, atol=1e-5)


def test_uint8_and_float_pixels_give_the_same_features():
    enc = make_encoder("flare", feature_dim=8)
    x = _pixels((2,) + SMALL)
    params = _init(enc, x)
    np.testing.assert_allclose(enc.apply(params, x), enc.apply(params, x.astype(jnp.float32)),
                               rtol=1e-6, atol=1e-6)


def _input_grad(name, frames=3, **cfg):
    enc = make_encoder(name, num_frames=frames, feature_dim=8, **cfg)
    x = _pixels((2, frames) + SMALL[1:]).astype(jnp.float32)
    params = _init(enc, x)
    g = jax.grad(lambda x: jnp.sum(enc.apply(params, x) * jnp.arange(1.0, 9.0)))(x)
    return np.asarray(g)


def test_flare_gradient_wrt_oldest_frame_is_exactly_zero():
    g = _input_grad("flare")
    assert np.all(g[:, 0] == 0.0), "oldest frame must reach the output only through stop_gradient"
    assert np.abs(g[:, -1]).max() > 0.0
    assert np.abs(g[:, 1]).max() > 0.0


def test_flare_gradient_wrt_oldest_frame_is_zero_for_five_frames():
    g = _input_grad("flare", frames=5)
    assert np.all(g[:, 0] == 0.0) and np.abs(g[:, 1:]).max() > 0.0


def test_latent_stack_gradient_wrt_oldest_frame_is_not_zero():
    g = _input_grad("latent_stack")
    assert np.abs(g[:, 0]).max() > 0.0


def test_flare_stop_gradient_is_on_the_subtrahend_only():
    """Without the stop-gradient the flow z_2 - z_1 would send gradient to frame 1; check that
    the flow term is what carries frame-2 gradient (z_2 enters twice: latent and flow)."""
    from flare_jax.encoders import latent_flow
    z = jnp.arange(12.0).reshape(3, 4)
    jac = jax.jacobian(lambda z: latent_flow(z, time_axis=0))(z)   # [4, 4, 3, 4]
    # output rows: z2, z3, z2 - sg(z1), z3 - sg(z2)
    assert np.all(jac[2, :, 0] == 0) and np.all(jac[3, :, 1] == 0)   # no grad to subtrahends
    np.testing.assert_array_equal(jac[2, :, 1], np.eye(4))             # +1 to the minuend
    np.testing.assert_array_equal(latent_flow(z, 0)[2:], z[1:] - z[:-1])


@pytest.mark.parametrize("name,shape", [("flare", (2,) + SMALL), ("atari_flare", (2, 4, 84, 84, 1))])
def test_detaching_the_oldest_frame_keeps_values_and_parameter_gradients(name, shape):
    """Flare encodes z_1 under stop_gradient (no conv backward for it): the features and the
    gradients of every parameter equal those of the same encoder without the detach."""
    enc = make_encoder(name, feature_dim=8) if name == "flare" else make_encoder(name)
    assert enc.detached_frames == 1
    no_detach = type("NoDetach", (type(enc),), {"detached_frames": 0})
    plain = no_detach(**{f: getattr(enc, f) for f in enc.__dataclass_fields__
                         if f not in ("parent", "name")})
    x = _pixels(shape)
    params = _init(enc, x)
    w = jax.random.normal(jax.random.PRNGKey(3), enc.apply(params, x).shape)

    def grads(e):
        return jax.value_and_grad(lambda p: jnp.sum(e.apply(p, x) * w))(params)

    np.testing.assert_allclose(enc.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-5)
    (_, g), (_, g_ref) = grads(enc), grads(plain)
    conv_grads = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        # float32 summation order differs (fewer frames per conv call): tolerance ~ the scale
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * (np.abs(b).max() + 1e-3),
                                   err_msg=jax.tree_util.keystr(path))
        conv_grads += "conv" in jax.tree_util.keystr(path) and np.abs(a).max() > 0
    assert conv_grads > 0


@pytest.mark.parametrize("name", ["flare", "latent_stack", "recurrent"])
def test_per_frame_weights_are_shared(name):
    """Encoding frames one by one equals the batched per-frame latents."""
    enc = make_encoder(name, feature_dim=8)
    x = _pixels((2,) + SMALL)
    params = _init(enc, x)
    batched = enc.apply(params, x, method=enc.per_frame_latents)          # [2, T, h, w, c]
    for t in range(3):
        one = enc.apply(params, x[:, t:t + 1].repeat(3, axis=1), method=enc.per_frame_latents)[:, 0]
        np.testing.assert_allclose(one, batched[:, t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PIXEL + ["atari_flare", "atari_baseline"])
def test_reversing_frame_order_changes_output(name):
    atari = name.startswith("atari")
    enc = make_encoder(name, num_frames=4 if atari else 3)
    x = _pixels((2, 4, 84, 84, 1) if atari else (2,) + SMALL)
    params = _init(enc, x)
    y, y_rev = enc.apply(params, x), enc.apply(params, x[:, ::-1])
    assert np.abs(np.asarray(y - y_rev)).max() > 1e-4


def _shapes(name, x_shape, **cfg):
    enc = make_encoder(name, **cfg)
    x = jax.ShapeDtypeStruct(x_shape, jnp.uint8)
    return jax.tree.map(lambda a: a.shape, jax.eval_shape(enc.init, KEY, x))["params"]


def test_parameter_counts_match_the_reference():
    flare = _shapes("flare", (1, 3, 108, 108, 3))
    assert flare["projection"]["dense"]["kernel"] == (282_752, 64)
    assert flare["convs"]["conv_0"]["kernel"] == (3, 3, 3, 32)
    assert [flare["convs"][f"conv_{i}"]["kernel"] for i in range(1, 4)] == [(3, 3, 32, 32)] * 3
    rad = _shapes("frame_stack", (1, 3, 108, 108, 3))
    assert rad["projection"]["dense"]["kernel"] == (70_688, 64)
    assert rad["convs"]["conv_0"]["kernel"] == (3, 3, 9, 32)
    af = _shapes("atari_flare", (1, 4, 84, 84, 1))
    assert af["projection"]["dense"]["kernel"] == (9408, 256)
    assert [af["convs"][f"conv_{i}"]["kernel"] for i in range(3)] == [
        (8, 8, 1, 16), (4, 4, 16, 32), (3, 3, 32, 32)]
    ab = _shapes("atari_baseline", (1, 4, 84, 84, 1))
    assert ab["projection"]["dense"]["kernel"] == (9408, 256)
    assert [ab["convs"][f"conv_{i}"]["kernel"] for i in range(3)] == [
        (8, 8, 4, 16), (4, 4, 16, 32), (3, 3, 32, 192)]


def test_flare_is_configurable():
    p = _shapes("flare", (1, 5, 84, 84, 3), num_frames=5, num_layers=2, num_filters=16,
                strides=(2, 2), feature_dim=50)
    # 84 -> 41 -> 20; 2T-2 = 8 fused maps of 20x20x16
    assert p["projection"]["dense"]["kernel"] == (8 * 20 * 20 * 16, 50)
    assert set(p["convs"]) == {"conv_0", "conv_1"}


def test_atari_flare_has_no_relu_after_last_conv():
    enc = make_encoder("atari_flare")
    x = _pixels((4, 4, 84, 84, 1))
    params = _init(enc, x)
    h = enc.apply(params, x, method=enc.trunk)
    assert h.shape == (4, 9408)
    latents = np.asarray(h[:, :3 * 1568])
    assert (latents < 0).any(), "last Atari Flare conv must be linear (no ReLU)"
    base = make_encoder("atari_baseline")
    hb = base.apply(_init(base, x), x, method=base.trunk)
    assert hb.shape == (4, 9408) and (np.asarray(hb) >= 0).all()


def test_reference_initialisation():
    enc = make_encoder("flare")
    params = _init(enc, _pixels((1,) + SMALL))["params"]
    k = np.asarray(params["convs"]["conv_1"]["kernel"])      # [3, 3, 32, 32]
    mask = np.ones((3, 3), bool)
    mask[1, 1] = False
    assert np.all(k[mask] == 0.0)
    centre = k[1, 1]
    np.testing.assert_allclose(centre.T @ centre, 2.0 * np.eye(32), atol=1e-5)  # gain sqrt(2)
    first = np.asarray(params["convs"]["conv_0"]["kernel"])[1, 1]    # [3, 32]: orthonormal rows
    np.testing.assert_allclose(first @ first.T, 2.0 * np.eye(3), atol=1e-5)
    dense = np.asarray(params["projection"]["dense"]["kernel"])      # [K, 64], gain 1
    np.testing.assert_allclose(dense.T @ dense, np.eye(64), atol=1e-4)
    assert all(np.all(np.asarray(params["convs"][c]["bias"]) == 0) for c in params["convs"])
    ln = params["projection"]["layer_norm"]
    assert np.all(np.asarray(ln["scale"]) == 1) and np.all(np.asarray(ln["bias"]) == 0)


def test_delta_orthogonal_rejects_non_conv_shapes():
    with pytest.raises(ValueError, match="kh, kw, in, out"):
        delta_orthogonal()(KEY, (4, 4))


def test_layer_norm_output_and_no_tanh():
    enc = make_encoder("flare", feature_dim=32)
    x = _pixels((4,) + SMALL)
    params = _init(enc, x)
    y = np.asarray(enc.apply(params, x))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-4)     # LN with scale 1, offset 0
    np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-2)
    assert np.abs(y).max() > 1.0, "no tanh after the LayerNorm"


@pytest.mark.parametrize("name", ["flare", "frame_stack", "atari_flare", "state_flare"])
def test_jit_and_vmap(name):
    atari = name.startswith("atari")
    enc = make_encoder(name)
    if name.startswith("state"):
        x = jax.random.normal(KEY, (3, 2, 4, 5))
    else:
        x = _pixels((3, 2, 4, 84, 84, 1) if atari else (3, 2) + SMALL)
    params = _init(enc, x[0])
    eager = enc.apply(params, x)
    jitted = jax.jit(enc.apply)(params, x)
    vmapped = jax.vmap(enc.apply, in_axes=(None, 0))(params, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(vmapped, eager, rtol=1e-4, atol=1e-4)
    # vmap over parameters (seeds) too
    ps = jax.vmap(lambda k: enc.init(k, x[0]))(jax.random.split(KEY, 2))
    ys = jax.jit(jax.vmap(enc.apply, in_axes=(0, None), axis_size=2))(ps, x[0])
    assert ys.shape == (2,) + eager.shape[1:]


def test_trunk_head_split_recomposes():
    enc = make_encoder("flare", feature_dim=8)
    x = _pixels((2,) + SMALL)
    params = _init(enc, x)
    h = enc.apply(params, x, method=enc.trunk)
    assert h.shape == (2, 4 * 5 * 5 * 32)   # 2T-2 = 4 maps; 24 -> 11 -> 9 -> 7 -> 5 px
    np.testing.assert_allclose(enc.apply(params, h, method=enc.head), enc.apply(params, x),
                               rtol=1e-6, atol=1e-6)


def test_unknown_encoder_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_encoder("flair")
    for name in ENCODERS:
        assert name in str(err.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="valid options: .*feature_dim"):
        make_encoder("flare", feature_size=64)


def test_flare_with_one_frame_is_rejected():
    enc = make_encoder("flare", num_frames=1)
    with pytest.raises(ValueError, match="num_frames >= 2"):
        enc.init(KEY, _pixels((2, 1, 24, 24, 3)))


@pytest.mark.parametrize("shape", [(24, 24, 3), (3, 24, 24), (2, 24, 24, 3)])
def test_wrong_rank_or_frame_count_is_rejected(shape):
    enc = make_encoder("flare", num_frames=3)
    with pytest.raises(ValueError, match=r"\[\.\.\., T, H, W, C\]"):
        enc.init(KEY, jnp.zeros(shape, jnp.uint8))


def test_too_small_frames_are_rejected():
    enc = make_encoder("flare")
    with pytest.raises(ValueError, match="too small"):
        enc.init(KEY, jnp.zeros((1, 3, 9, 9, 3), jnp.uint8))


def test_bad_strides_are_rejected():
    enc = make_encoder("flare", strides=(2, 1))
    with pytest.raises(ValueError, match="num_layers=4"):
        enc.init(KEY, _pixels((1,) + SMALL))
