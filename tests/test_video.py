"""Evaluation videos (flare_jax/video.py and `RunConfig.video_every` in the run loop): the MP4
writer, the annotation, the pictures of every kind of run, the dm_control renderer of state runs
against envpool's state layout, and tiny SAC / Rainbow runs that write videos without changing
their evaluations."""
import csv
import glob
import io
import os
import struct
import warnings

import imageio.v2 as imageio
import numpy as np
import pytest

from agents import rainbow_train, sac, sac_train
from flare_jax import config_flags, loop, video
from flare_jax.envs import dmc_tasks
from flare_jax.envs.dmc import DMCEnv


def _decode(path):
    """([H, W, 3] uint8 frames, fps) of a video file."""
    with warnings.catch_warnings():   # JAX warns on the fork of ffmpeg's subprocess
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            return [np.asarray(f) for f in reader], reader.get_meta_data()["fps"]
        finally:
            reader.close()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _tb_images(tb_dir, tag):
    """[(step, (H, W, C))] of the image summaries `tag` in the event files of `tb_dir`."""
    from PIL import Image
    from tensorboardX.proto import event_pb2
    out = []
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.tag == tag and v.HasField("image"):
                    png = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
                    assert png.shape == (v.image.height, v.image.width, v.image.colorspace)
                    out.append((event.step, png.shape))
    return out


# ------------------------------------------------------------------ frames and files

def test_mp4_decodes_to_its_frames_padded_to_macro_blocks(tmp_path):
    rng = np.random.default_rng(0)
    # 50 x 70 is no multiple of 16: padded with black to 64 x 80 at the bottom and right
    frames = [np.full((50, 70, 3), 40 + 25 * i, np.uint8) for i in range(7)]
    for f in frames:
        f[10:30, 10:40] = rng.integers(0, 255, 3, dtype=np.uint8)   # a patch of one colour
    path = str(tmp_path / "v" / "clip.mp4")
    assert video.write_mp4(path, frames, fps=video.FPS) == (7, 64, 80)
    assert os.listdir(tmp_path / "v") == ["clip.mp4"]             # no partial file left
    decoded, fps = _decode(path)
    assert len(decoded) == 7 and fps == video.FPS
    assert all(d.shape == (64, 80, 3) for d in decoded)
    for f, d in zip(frames, decoded):
        assert np.abs(d[:50, :70].astype(int) - f).mean() < 6       # lossy, but the picture
        assert d[52:, :].max() < 20 and d[:, 72:].max() < 20          # the padding is black
    assert np.mean(decoded[6][:50, :70]) > np.mean(decoded[0][:50, :70]) + 100
    with pytest.raises(ValueError, match="the shape of the first"):
        video.write_mp4(path, [frames[0], frames[0][:40]])


def test_annotate_draws_in_the_corner_and_nowhere_else():
    frame = np.full((240, 320, 3), 128, np.uint8)
    out = video.annotate(frame, ["cartpole_swingup  eval at 2,400 env steps", "step 120  return 345.6"])
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert (frame == 128).all()                                      # the input is not changed
    changed = np.argwhere((out != frame).any(-1))
    assert len(changed) > 500
    top, left = changed.min(0)
    bottom, right = changed.max(0)
    assert top == 0 and left == 0 and bottom < 60 and right < 300    # the corner box only
    assert (out[bottom + 1:] == 128).all() and (out[:, right + 1:] == 128).all()
    box = out[:bottom + 1, :right + 1]
    assert (box > 200).all(-1).sum() > 200 and (box < 10).all(-1).mean() > 0.5   # white on black
    grey = video.annotate(np.zeros((84, 84), np.uint8), ["step 1"])  # grey frames become RGB
    assert grey.shape == (84, 84, 3)


def test_upscale_rgb_and_frame_strip():
    grey = np.arange(84 * 84, dtype=np.uint32).reshape(84, 84).astype(np.uint8)
    big = video.upscale(video.to_rgb(grey))
    assert big.shape == (252, 252, 3)                                # x3: short side >= 240
    np.testing.assert_array_equal(big[::3, ::3, 1], grey)
    np.testing.assert_array_equal(big[2::3, 1::3, 0], grey)          # nearest neighbour
    assert video.upscale(np.zeros((240, 320, 3), np.uint8)).shape == (240, 320, 3)
    assert video.padded_size(252, 252) == (256, 256) and video.padded_size(324, 324) == (336, 336)
    frames = [np.full((10, 12, 3), i, np.uint8) for i in range(20)]
    strip = video.frame_strip(frames)
    assert strip.shape == (10, 12 * video.STRIP_FRAMES, 3)
    assert strip[0, 0, 0] == 0 and strip[0, -1, 0] == 19              # first and last frame
    assert video.frame_strip(frames[:3]).shape == (10, 36, 3)
    with pytest.raises(ValueError, match="uint8"):
        video.to_rgb(np.zeros((4, 4), np.float32))


def test_cartpole_picture_follows_the_state():
    upright = video.draw_cartpole(np.array([0.0, 0.0, 0.0, 0.0]))
    assert upright.shape == (video.RENDER_HEIGHT, video.RENDER_WIDTH, 3)
    moved = video.draw_cartpole(np.array([1.5, 0.0, 0.0, 0.0]))
    leaning = video.draw_cartpole(np.array([0.0, 0.0, 0.2, 0.0]))

    def dark_columns(img):
        return np.flatnonzero((img[:int(img.shape[0] * 0.7) - 2] < 80).all(-1).any(0))
    assert dark_columns(moved).mean() > dark_columns(upright).mean() + 60   # the cart moved right
    # the pole leans towards +x: its top part moves right
    pole = lambda img: np.flatnonzero((np.abs(img[100:110].astype(int) - (202, 152, 101)).sum(-1) < 30).any(0))  # noqa: E731
    assert pole(leaning).mean() > pole(upright).mean() + 5


# ------------------------------------------------------------------ video envs

def test_dm_control_renderer_has_envpool_state_layout_and_dynamics():
    # every task: dm_control's own observation keys, in order, are the layout's
    for name, spec in dmc_tasks.TASKS.items():
        env = video.DMCRenderEnv(name, seed=0)
        obs = env._env.reset().observation
        assert [(k, int(np.size(v))) for k, v in obs.items()] == dmc_tasks.state_keys(name), name
        assert env.frame_shape == (dmc_tasks.state_dim(name),)
        env.close()
    # cartpole_swingup against envpool (DMCEnv): the seeds cannot be matched (different RNGs),
    # but both start near the same resting state (noise 0.01) and follow the same dynamics, so
    # a layout, action-repeat or rescaling mismatch shows as a difference of order 1
    ours = video.DMCRenderEnv("cartpole_swingup", seed=3)
    ref = DMCEnv("cartpole_swingup", num_envs=1, seed=3)
    a, b = ours.reset(), ref.reset()
    assert a.frame.shape == b.frame.shape == (1, 5) and a.frame.dtype == b.frame.dtype
    np.testing.assert_allclose(a.frame, b.frame, atol=0.05)
    assert a.frame[0, 1] < -0.99                                    # cos(angle): pole down
    for _ in range(5):
        a, b = ours.step(np.full((1, 1), 0.5, np.float32)), ref.step(np.full((1, 1), 0.5, np.float32))
        np.testing.assert_allclose(a.frame, b.frame, atol=0.1)
        np.testing.assert_allclose(a.reward, b.reward, atol=0.02)
    assert abs(a.frame[0, 3]) > 1.0                                  # the cart did move
    picture = ours.render()
    assert picture.shape == (video.RENDER_HEIGHT, video.RENDER_WIDTH, 3) and picture.std() > 5
    ref.close()
    ours.close()
    # position-only states, the time limit and the auto-reset as DMCEnv's
    env = video.DMCRenderEnv("cartpole_swingup", seed=1, obs="position", max_episode_steps=16)
    assert env.reset().frame.shape == (1, len(dmc_tasks.position_indices("cartpole_swingup")))
    steps = [env.step(np.zeros((1, 1), np.float32)) for _ in range(3)]
    assert [bool(t.last[0]) for t in steps] == [False, True, False] and bool(steps[2].first[0])
    assert steps[1].episode_return[0] == pytest.approx(steps[0].reward[0] + steps[1].reward[0])
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.render()


def test_trainers_video_envs_give_pictures():
    pix = sac_train.TrainConfig(task="cartpole_swingup", pixels=True, max_episode_steps=16,
                                run=loop.RunConfig(seeds=(2,), video_every=1))
    env = sac_train.SACTrainer.make_video_env(pix)
    ts = env.reset()
    assert ts.frame.shape == (1, 108, 108, 3)
    np.testing.assert_array_equal(env.render(), ts.frame[0])        # the agent's own frame
    env.close()
    atari = rainbow_train.RainbowTrainConfig(game="pong", run=loop.RunConfig(video_every=1))
    env = rainbow_train.RainbowTrainer.make_video_env(atari)
    ts = env.step(np.zeros(1, np.int32)) if env.reset() is not None else None
    picture = env.render()
    assert picture.shape == (84, 84, 3) and (picture == ts.frame[0][..., None]).all()
    assert video.upscale(picture).shape == (252, 252, 3)
    env.close()


# ------------------------------------------------------------------ runs

def _state_config(out_dir, **run):
    return sac_train.TrainConfig(
        task="cartpole_swingup", pixels=False, env_steps=8 * 45, init_steps=20, eval_every=15,
        eval_episodes=2, batch_size=32, replay_capacity=500, max_episode_steps=160,
        sac=sac.SACConfig(encoder="state_full", hidden_dim=32, augmentation="none"),
        run=loop.RunConfig(seeds=(0, 1), out_dir=str(out_dir), tensorboard=True, **run))


def test_state_sac_run_writes_videos_and_the_same_evaluations(tmp_path):
    lines = []
    # 3 evaluations (120, 240, 360 env steps); --video_every=2: the 2nd and the final one
    with_video = sac_train.train(_state_config(tmp_path / "on", video_every=2), log=lines.append)
    assert with_video.status == "finished"
    videos = tmp_path / "on" / "seed_0" / "videos"
    assert sorted(os.listdir(videos)) == ["eval_240.mp4", "eval_360.mp4"]
    assert not (tmp_path / "on" / "seed_1" / "videos").exists()      # the first seed only
    for name in os.listdir(videos):
        frames, _ = _decode(str(videos / name))
        # an episode of 160 env steps at action repeat 8: 20 agent steps + the reset frame
        assert len(frames) == 160 // 8 + 1
        assert frames[0].shape == (video.RENDER_HEIGHT, video.RENDER_WIDTH, 3)
    said = [l for l in lines if "] video at" in l]
    assert len(said) == 2 and "21 frames of 320x240 px" in said[0] and "eval_240.mp4" in said[0]
    assert _tb_images(str(tmp_path / "on" / "seed_0" / "tb"), "eval/video") == [
        (240, (240, 320 * video.STRIP_FRAMES, 3)), (360, (240, 320 * video.STRIP_FRAMES, 3))]
    # the same run without videos evaluates identically (the video has its own env and key)
    without = sac_train.train(_state_config(tmp_path / "off"), log=None)
    assert not (tmp_path / "off" / "seed_0" / "videos").exists()
    for seed in (0, 1):
        on, off = (_rows(tmp_path / d / f"seed_{seed}" / "eval.csv") for d in ("on", "off"))
        assert [(r["step"], r["return_mean"], r["return_std"]) for r in on] == \
               [(r["step"], r["return_mean"], r["return_std"]) for r in off]
    assert with_video.evals == without.evals
    # a resume may change the video settings
    loop.check_resume(str(tmp_path / "on"), "sac", config_flags.replace(
        with_video.config, video_every=5, video_max_steps=10), sac_train.SACTrainer.resumable)


@pytest.mark.slow      # (~80 s; the state-SAC video test covers the recording in the default suite)
def test_rainbow_cartpole_run_writes_schematic_videos(tmp_path):
    from tests.test_rainbow_train import cartpole_config
    lines = []
    cfg = config_flags.replace(cartpole_config(str(tmp_path), seeds=(0,)), frames=400,
                               eval_every_frames=200, video_every=1, video_max_steps=12)
    res = rainbow_train.train(cfg, log=lines.append)
    assert res.status == "finished"
    videos = tmp_path / "seed_0" / "videos"
    assert sorted(os.listdir(videos)) == ["eval_200.mp4", "eval_400.mp4"]   # frames
    said = [l for l in lines if "] video at" in l]
    assert len(said) == 2 and all("drawn schematically" in l for l in said)
    for line in said:
        frames, _ = _decode(line.split(" -> ")[1].split(" (")[0])
        assert f"{len(frames)} frames of 320x240 px" in line
        assert 2 <= len(frames) <= 12 + 1                            # capped at 12 agent steps
        assert frames[0].shape == (240, 320, 3)


def test_bad_video_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^video_every must be >= 0 evaluations \(0: no videos\), got -1$"):
        loop.RunConfig(video_every=-1)
    with pytest.raises(ValueError, match="^video_max_steps must be >= 1"):
        loop.RunConfig(video_max_steps=0)
    with pytest.raises(ValueError, match="no pictures for 'Acrobot-v1'.*CartPole-v1"):
        rainbow_train.RainbowTrainConfig(game="Acrobot-v1", rainbow=rainbow_train.rainbow.RainbowConfig(
            torso="mlp"), run=loop.RunConfig(video_every=1))
    # the settings are launcher flags (from RunConfig) and may change on resume
    for name in ("video_every", "video_max_steps"):
        assert name in config_flags.fields_flat(sac_train.TrainConfig)
        assert name in config_flags.fields_flat(rainbow_train.RainbowTrainConfig)
        assert name in loop.RUN_RESUMABLE
