"""State-space variants (paper section 4): features against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.encoders import make_encoder


def _history():
    # 2 samples, T=4 positions of size 2, oldest first: s_{t-3}, s_{t-2}, s_{t-1}, s_t
    return jnp.array([[[0.0, 1.0], [1.0, 3.0], [3.0, 6.0], [6.0, 10.0]],
                      [[5.0, 5.0], [4.0, 5.0], [4.0, 7.0], [1.0, 7.0]]])


def _features(name, x):
    enc = make_encoder(name, num_frames=x.shape[-2])
    params = enc.init(jax.random.PRNGKey(0), x)
    return np.asarray(enc.apply(params, x))


def test_state_flare_is_the_current_position_and_three_offsets_newest_first():
    x = _history()
    expected = np.array([
        # s_t,        s_t - s_{t-1},  s_{t-1} - s_{t-2},  s_{t-2} - s_{t-3}
        [6.0, 10.0,   3.0, 4.0,       2.0, 3.0,           1.0, 2.0],
        [1.0, 7.0,   -3.0, 0.0,       0.0, 2.0,          -1.0, 0.0]])
    np.testing.assert_array_equal(_features("state_flare", x), expected)


def test_state_stack_is_the_positions_newest_first():
    x = _history()
    expected = np.array([[6.0, 10.0, 3.0, 6.0, 1.0, 3.0, 0.0, 1.0],
                         [1.0, 7.0, 4.0, 7.0, 4.0, 5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(_features("state_stack", x), expected)


@pytest.mark.parametrize("name", ["state_full", "state_position"])
def test_single_frame_variants_pass_the_current_vector_through(name):
    x = _history()[:, -1:, :]
    np.testing.assert_array_equal(_features(name, x), np.asarray(x[:, 0]))


def test_recurrent_keeps_s_t_and_matches_the_offsets_size():
    x = _history()
    out = _features("state_recurrent", x)
    assert out.shape == (2, 8)  # (s_t, h_t) with h of size (T-1)*P, as state-Flare's offsets
    np.testing.assert_array_equal(out[:, :2], np.asarray(x[:, -1]))
