"""`make run`: the default experiment.

Until the state-space study lands (issue 4), this is a short real end-to-end check of the
encoders: render frames of DMC cartpole_swingup with envpool (108x108, camera 0), encode 3-frame
stacks with each pixel encoder, take a gradient step's worth of forward+backward, and check the
Flare stop-gradient on the real frames. It prints what it did and how long each part took.
"""
from __future__ import annotations

import time

from absl import app, flags

import flare_jax
from flare_jax.envs.rendering import preload_egl

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "stacks per encoder call")
flags.DEFINE_integer("steps", 12, "environment steps rendered per env")


def main(argv):
    del argv
    preload_egl()
    import envpool  # pylint: disable=g-import-not-at-top
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flare_jax.encoders import make_encoder

    print(f"flare_jax {flare_jax.__version__}: jax {jax.__version__} on {jax.default_backend()}, "
          f"fast CPU conv path {'on' if flare_jax.FAST_CPU_CONV else 'off'}")
    t0 = time.perf_counter()
    env = envpool.make_dm("CartpoleSwingup-v1", num_envs=2, from_pixels=True, render_height=108,
                          render_width=108, render_camera_id=0, seed=0)
    frames = [env.reset().observation.pixels]
    rng = np.random.default_rng(0)
    for _ in range(FLAGS.steps - 1):
        act = rng.uniform(-1, 1, size=(2, 1))
        frames.append(env.step(act, np.arange(2)).observation.pixels)
    pix = np.stack(frames, 1).transpose(0, 1, 3, 4, 2)      # [env, step, H, W, C] uint8
    print(f"rendered {pix.shape[0]}x{pix.shape[1]} frames of {pix.shape[2]}x{pix.shape[3]} px "
          f"(mean pixel {pix.mean():.1f}) in {time.perf_counter() - t0:.1f}s")
    # Sliding 3-frame stacks, oldest first.
    stacks = np.stack([pix[:, i:i + 3] for i in range(pix.shape[1] - 2)], 1).reshape(-1, 3, 108, 108, 3)
    batch = jnp.asarray(stacks[:FLAGS.batch])
    key = jax.random.PRNGKey(0)
    for name in ("flare", "frame_stack", "pixel_flow", "latent_stack", "recurrent"):
        enc = make_encoder(name, num_frames=3)
        params = jax.jit(enc.init)(key, batch)
        n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        loss = lambda p, x: jnp.sum(enc.apply(p, x) ** 2)  # noqa: E731
        step = jax.jit(jax.value_and_grad(loss))
        t = time.perf_counter()
        val, grads = jax.block_until_ready(step(params, batch))
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        val, grads = jax.block_until_ready(step(params, batch))
        run_ms = (time.perf_counter() - t) * 1e3
        feats = jax.jit(enc.apply)(params, batch)
        gnorm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
        print(f"  {name:13s} features {tuple(feats.shape)} params {n_params:>10,d} "
              f"fwd+bwd {run_ms:7.1f} ms (compile {compile_s:.1f}s) grad-norm {gnorm:.3g}")
        assert np.isfinite(gnorm) and gnorm > 0
    flare = make_encoder("flare")
    params = jax.jit(flare.init)(key, batch)
    weights = jnp.arange(1.0, 65.0)
    gx = jax.grad(lambda x: jnp.sum(flare.apply(params, x) * weights))(batch.astype(jnp.float32))
    oldest, newest = float(jnp.abs(gx[:, 0]).max()), float(jnp.abs(gx[:, -1]).max())
    print(f"Flare d(features)/d(pixels): oldest frame max |grad| = {oldest}, newest = {newest:.3g}")
    assert oldest == 0.0 and newest > 0.0
    print(f"encoder check passed in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    from flare_jax.runtime import reexec_with_tcmalloc
    reexec_with_tcmalloc("experiments.default_run")
    app.run(main)
