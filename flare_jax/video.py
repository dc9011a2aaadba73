"""Evaluation videos: frames of one episode -> an annotated MP4 and a TensorBoard frame strip.

The run loop (`flare_jax.loop`, `RunConfig.video_every`) plays one deterministic evaluation
episode of the run's first seed on an env of `Trainer.make_video_env` and hands its frames to
this module. What a frame is depends on the run:

- DMC from pixels: the env's observation frame (the last render of the agent step, the size the
  agent sees), upscaled;
- DMC from states: envpool's state DMC envs do not render, so the video env is a `DMCRenderEnv`
  on dm_control itself (same task, flattened state, action repeat and action rescaling as
  `flare_jax.envs.dmc.DMCEnv`), rendered at `RENDER_HEIGHT` x `RENDER_WIDTH` from the task's
  camera through EGL once per agent step;
- Atari: the 84 x 84 grey observation frame as RGB, upscaled;
- CartPole (Rainbow's vector task): no renderer exists; the picture is drawn schematically from
  the state (cart position, pole angle) by `draw_cartpole`.

`ObservationVideoEnv` wraps an env whose observation is (or draws) the picture. Frames are
upscaled by an integer factor, nearest neighbour (`upscale`: the short side becomes at least
`MIN_SIDE` px), annotated (`annotate`: text in the top-left corner), padded with black at the
bottom and right to a multiple of `MACRO_BLOCK` = 16 px (`pad_to_block`; the writer then gets
`macro_block_size=1`, so ffmpeg never rescales) and written as H.264 yuv420p at `FPS` frames per
second, one video frame per agent step (`write_mp4`).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from flare_jax.envs import dmc_tasks
from flare_jax.envs.dmc import TimeStep
from flare_jax.envs.lifetime import EnvLifetime

FPS = 30                   # video frames (agent steps) per second
MACRO_BLOCK = 16           # frames are padded to multiples of this (H.264 macro blocks)
MIN_SIDE = 240             # upscale small frames until the short side is at least this, px
RENDER_HEIGHT, RENDER_WIDTH = 240, 320     # dm_control renders of state runs, px
STRIP_FRAMES = 8           # frames in the TensorBoard strip of an episode


# ---------------------------------------------------------------------------------- frames

def to_rgb(frame: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 1] or [H, W, 3] uint8 -> [H, W, 3] uint8 (grey repeated)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"a video frame must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3):
        raise ValueError(f"a video frame must be [H, W], [H, W, 1] or [H, W, 3], got "
                         f"{list(frame.shape)}")
    return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame


def upscale_factor(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """The integer factor that makes the short side of a frame at least `min_side` px (>= 1)."""
    return max(1, -(-min_side // max(1, min(height, width))))


def upscale(frame: np.ndarray, factor: Optional[int] = None) -> np.ndarray:
    """[H, W, C] -> [H * f, W * f, C], nearest neighbour; f: `upscale_factor` unless given."""
    factor = upscale_factor(*frame.shape[:2]) if factor is None else int(factor)
    if factor == 1:
        return frame
    return np.repeat(np.repeat(frame, factor, axis=0), factor, axis=1)


def _font(size: int):
    from PIL import ImageFont  # pylint: disable=g-import-not-at-top
    try:
        return ImageFont.load_default(size=size)    # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def annotate(frame: np.ndarray, lines: Sequence[str], font_size: Optional[int] = None) -> np.ndarray:
    """A copy of [H, W, 3] uint8 `frame` with `lines` of white text on a black box in the
    top-left corner (PIL's default font, `font_size` px; default: H / 20, at least 10)."""
    from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
    frame = to_rgb(frame)
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    font = _font(font_size or max(10, frame.shape[0] // 20))
    text = "\n".join(lines)
    left, top, right, bottom = draw.multiline_textbbox((3, 2), text, font=font)
    draw.rectangle((0, 0, min(right + 3, frame.shape[1] - 1), min(bottom + 3, frame.shape[0] - 1)),
                   fill=(0, 0, 0))
    draw.multiline_text((3, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def pad_to_block(frame: np.ndarray, block: int = MACRO_BLOCK) -> np.ndarray:
    """[H, W, C] -> [ceil(H / block) * block, ceil(W / block) * block, C], black at the bottom
    and right (the picture keeps its pixels and position)."""
    h, w = frame.shape[:2]
    ph, pw = -h % block, -w % block
    if not ph and not pw:
        return frame
    return np.pad(frame, ((0, ph), (0, pw), (0, 0)))


def padded_size(height: int, width: int, block: int = MACRO_BLOCK) -> tuple[int, int]:
    """The (H, W) of a frame in the written video (`pad_to_block`)."""
    return -(-height // block) * block, -(-width // block) * block


def write_mp4(path: str, frames: Sequence[np.ndarray], fps: int = FPS) -> tuple[int, int, int]:
    """Writes [H, W, 3] uint8 frames (all the same size) to `path` as H.264 MP4 at `fps`.

    Frames are padded to multiples of `MACRO_BLOCK` (`pad_to_block`) and the writer gets
    `macro_block_size=1` (no rescaling by imageio). The file appears complete or not at all (a
    hidden partial file is renamed at the end). Returns (frames, H, W) of the video.
    """
    import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
    if not frames:
        raise ValueError("write_mp4 needs at least one frame")
    shape = np.shape(frames[0])
    if any(np.shape(f) != shape for f in frames):
        raise ValueError(f"all frames of a video must have the shape of the first, {list(shape)}")
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f".{os.path.splitext(name)[0]}.partial.mp4")
    with warnings.catch_warnings():
        # imageio-ffmpeg starts ffmpeg in a subprocess; JAX warns on every fork, but the child
        # executes ffmpeg at once (no JAX state is used in it)
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        writer = imageio.get_writer(partial, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    pixelformat="yuv420p", macro_block_size=1,
                                    ffmpeg_log_level="error")
        try:
            for f in frames:
                writer.append_data(pad_to_block(to_rgb(f)))
        finally:
            writer.close()
    os.replace(partial, path)
    h, w = padded_size(*shape[:2])
    return len(frames), h, w


def frame_strip(frames: Sequence[np.ndarray], n: int = STRIP_FRAMES) -> np.ndarray:
    """`n` frames evenly spaced over the episode (first and last included; all of them if
    fewer), side by side: [H, k * W, 3] uint8, k = min(n, len(frames))."""
    if not frames:
        raise ValueError("frame_strip needs at least one frame")
    idx = np.unique(np.round(np.linspace(0, len(frames) - 1, min(n, len(frames)))).astype(int))
    return np.concatenate([to_rgb(frames[i]) for i in idx], axis=1)


def draw_cartpole(state: np.ndarray, height: int = RENDER_HEIGHT, width: int = RENDER_WIDTH) -> np.ndarray:
    """A schematic picture [height, width, 3] uint8 of a gym CartPole state [x, x_dot, theta,
    theta_dot] (metres, radians; theta 0 = upright, > 0 leaning towards +x): the track spans
    gym's bounds x in [-2.4, 2.4] (marked), the cart a box, the pole 1 m long (gym's 2 x 0.5)."""
    from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
    x, theta = float(state[0]), float(state[2])
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    scale = width / (2 * 2.4 * 1.1)                 # px per metre, margins of 10 %
    ground = int(height * 0.7)
    cx = width / 2 + x * scale
    for bound in (-2.4, 2.4):
        bx = width / 2 + bound * scale
        draw.line((bx, ground - 8, bx, ground + 8), fill=(200, 0, 0), width=2)
    draw.line((0, ground, width, ground), fill=(0, 0, 0), width=1)
    cw, ch = 0.5 * scale, 0.3 * scale
    draw.rectangle((cx - cw / 2, ground - ch, cx + cw / 2, ground), fill=(40, 40, 40))
    axle = (cx, ground - ch * 0.75)
    pole = 1.0 * scale
    tip = (axle[0] + np.sin(theta) * pole, axle[1] - np.cos(theta) * pole)
    draw.line((axle, tip), fill=(202, 152, 101), width=max(3, int(0.1 * scale)))
    r = max(2, int(0.04 * scale))
    draw.ellipse((axle[0] - r, axle[1] - r, axle[0] + r, axle[1] + r), fill=(129, 132, 203))
    return np.asarray(image)


# ---------------------------------------------------------------------------------- video envs

class ObservationVideoEnv:
    """An env of N = 1 whose picture is its observation: `render()` is `picture(frame)` of the
    newest frame (identity for DMC pixels, `to_rgb` for Atari, `draw_cartpole` for CartPole).
    reset/step/close and the attributes are the wrapped env's."""

    def __init__(self, env, picture: Callable[[np.ndarray], np.ndarray], kind: str):
        if env.num_envs != 1:
            raise ValueError(f"a video env has one env, got num_envs={env.num_envs}")
        self.env, self.picture, self.kind = env, picture, kind
        self._frame = None

    def __getattr__(self, name):      # the wrapped env's attributes (frame_shape, action_dim, ...)
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    def reset(self):
        ts = self.env.reset()
        self._frame = ts.frame[0]
        return ts

    def step(self, action):
        ts = self.env.step(action)
        self._frame = ts.frame[0]
        return ts

    def render(self) -> np.ndarray:
        """[H, W, 3] uint8 of the newest frame."""
        if self._frame is None:
            raise RuntimeError("call reset() before render()")
        return to_rgb(self.picture(self._frame))

    def close(self):
        self.env.close()


def _task_name(spec: dmc_tasks.TaskSpec) -> str:
    return spec.name[len(spec.domain) + 1:]


class DMCRenderEnv(EnvLifetime):
    """One DMC episode env on dm_control itself, for the videos of state runs (envpool's state
    envs do not render).

    The same TimeStep as `DMCEnv` with N = 1 (frame [1, D] float32 in `dmc_tasks.state_keys`
    order, reward summed over the action repeat, auto-reset after `last`), the same action
    repeat, time limit and action rescaling ([-1, 1] to the actuator range); the physics is
    dm_control's (`suite.load(domain, task, task_kwargs={"random": seed})`), so its episodes are
    not envpool's for the same seed, but the observation layout and dynamics are (tests:
    tests/test_video.py). `render()` draws the current physics state, `[height, width, 3]`
    uint8, from the task's camera through EGL (`rendering.preload_egl` runs first).

    Args:
      task: a name in `dmc_tasks.TASKS`.
      seed: dm_control's task seed.
      obs: "full" or "position" (`dmc_tasks.position_indices`), as DMCEnv.
      action_repeat: env steps per agent step (None: the task's).
      max_episode_steps: time limit in env steps (None: the task's 1000).
      height, width: the render size, px.
    """
    num_envs = 1
    pixels = False
    kind = "rendered by dm_control"

    def __init__(self, task: str, seed: int = 0, obs: str = "full", action_repeat: Optional[int] = None,
                 max_episode_steps: Optional[int] = None, height: int = RENDER_HEIGHT,
                 width: int = RENDER_WIDTH):
        from flare_jax.envs.dmc import OBS_CHOICES  # pylint: disable=g-import-not-at-top
        from flare_jax.envs.rendering import preload_egl  # pylint: disable=g-import-not-at-top
        self.task = dmc_tasks.get_task(task)
        if obs not in OBS_CHOICES:
            raise ValueError(f"obs must be one of {OBS_CHOICES}, got {obs!r}")
        self.obs = obs
        self.action_repeat = int(action_repeat or self.task.action_repeat)
        if self.action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.max_episode_steps = max_episode_steps
        self.height, self.width = int(height), int(width)
        preload_egl()       # MUJOCO_GL=egl and libEGL before dm_control picks its GL backend
        from dm_control import suite  # pylint: disable=g-import-not-at-top
        self._env = suite.load(self.task.domain, _task_name(self.task),
                               task_kwargs={"random": int(seed)})
        self._keys = dmc_tasks.state_keys(self.task.name)
        self._select = (dmc_tasks.position_indices(self.task.name) if obs == "position" else None)
        dim = dmc_tasks.state_dim(self.task.name) if self._select is None else len(self._select)
        self.frame_shape, self.frame_dtype = (dim,), np.dtype(np.float32)
        spec = self._env.action_spec()
        self.action_dim = int(np.prod(spec.shape))
        self.env_action_low = np.broadcast_to(np.asarray(spec.minimum, np.float64), (self.action_dim,))
        self.env_action_high = np.broadcast_to(np.asarray(spec.maximum, np.float64), (self.action_dim,))
        self._needs_reset, self._return, self._t = True, 0.0, 0
        self._mark_open()

    def flatten(self, observation) -> np.ndarray:
        """dm_control's observation dict -> [D] float32 in `dmc_tasks.state_keys` order."""
        parts = []
        for key, size in self._keys:
            value = np.asarray(observation[key], np.float64).reshape(-1)
            if value.size != size:
                raise RuntimeError(f"dm_control {self.task.name} observation {key!r} has "
                                   f"{value.size} entries, the layout expects {size}")
            parts.append(value)
        state = np.concatenate(parts).astype(np.float32)
        return state if self._select is None else state[self._select]

    def _timestep(self, frame, reward, first, last) -> TimeStep:
        return TimeStep(frame=frame[None], reward=np.array([reward], np.float32),
                        discount=np.ones(1, np.float32), first=np.array([first]),
                        last=np.array([last]), episode_return=np.array([self._return], np.float32))

    def reset(self) -> TimeStep:
        """A new episode: first=True, reward 0."""
        self._check_open()
        ts = self._env.reset()
        self._needs_reset, self._return, self._t = False, 0.0, 0
        return self._timestep(self.flatten(ts.observation), 0.0, True, False)

    def step(self, action) -> TimeStep:
        """One agent step; action [1, A] in [-1, 1] (ignored after `last`: a new episode)."""
        self._check_open()
        if self._needs_reset:
            return self.reset()
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (self.action_dim,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be [1, {self.action_dim}] finite floats in [-1, 1], "
                             f"got {list(np.shape(action))}")
        action = self.env_action_low + (np.clip(action, -1, 1) + 1.0) * 0.5 * (
            self.env_action_high - self.env_action_low)
        reward, last, ts = 0.0, False, None
        for _ in range(self.action_repeat):
            ts = self._env.step(action)
            self._t += 1
            reward += float(ts.reward or 0.0)
            last = ts.last() or (self.max_episode_steps is not None and self._t >= self.max_episode_steps)
            if last:
                break
        self._return += reward
        self._needs_reset = last
        return self._timestep(self.flatten(ts.observation), reward, False, last)

    def render(self) -> np.ndarray:
        """[height, width, 3] uint8: the current physics state from the task's camera."""
        self._check_open()
        return np.asarray(self._env.physics.render(self.height, self.width,
                                                   camera_id=self.task.camera), np.uint8)

    def close(self):
        """Frees the physics and its render contexts; further reset/step/render calls raise."""
        if not self._closed:
            self._closed = True
            env, self._env = self._env, None
            if env is not None:
                env.physics.free()
