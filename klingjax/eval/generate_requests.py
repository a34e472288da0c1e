"""The inputs of `klingjax-generate` read and checked before any model is built (klingjax/eval/generate_cli.py):
flag combinations, images / videos / masks resized to the model grid, camera paths, and the `Request` they make.
Every error is a ValueError naming the flag."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
from absl import logging
from PIL import Image

from klingjax import layout
from klingjax.data.sampling import resize_crop
from klingjax.data.synthetic import camera as camera_lib
from klingjax.eval import conditioning as cond
from klingjax.eval import media
from klingjax.models.conditions import CameraCondition, MaskedVideo

WRITERS = {".mp4": media.write_mp4, ".gif": media.write_gif}
DEFAULT_FPS = 8.0  # the synthetic data's rate, when the work dir's dataset has no manifest
VISUAL_FLAGS = ("image", "last_image", "keyframe", "video", "mask", "outpaint", "extend", "prepend")


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate, in pixels on the model grid, checked before the generator loads.

    mode: "text" | "frames" (images given at latent frames `frames`, encoded alone) | "clip" (a clip encoded whole,
    `given` positions kept: inpaint / outpaint) | "extend" | "prepend" (chunks of new frames, `chunks` per chunk,
    around `pixels`, the whole input video) | "long" (--duration: a rollout of `total` frames from text, or from
    --image in `pixels`).
    """

    mode: str
    geom: cond.Geometry
    fps: float
    pixels: np.ndarray | None = None  # frames: (n, H, W, 3); clip: (T, H, W, 3); extend / prepend: (T_in, H, W, 3)
    frames: tuple[int, ...] = ()  # latent frames of `pixels` (mode "frames")
    given: np.ndarray | None = None  # (t, h, w) bool
    context: int = 1  # latent frames given per extension chunk
    chunks: tuple[int, ...] = ()
    camera: np.ndarray | None = None  # (t, 4) camera path per latent frame (--camera / --camera_path)
    total: int = 0  # mode "long" (--duration): frames of the whole video, from text or from --image (`pixels`)


# ---------------------------------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------------------------------


def _fit(frames: np.ndarray, height: int, width: int, what: str) -> np.ndarray:
    """uint8 (T, h, w, 3) resized and centre-cropped to (height, width), with a warning when it changes."""
    if frames.shape[1:3] != (height, width):
        logging.warning("%s is %dx%d; resized and centre-cropped to %dx%d", what, *frames.shape[1:3], height, width)
    return resize_crop(frames, height, width)


def read_image(path: str, flag: str) -> np.ndarray:
    """An image file -> uint8 (1, H, W, 3)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))[None]
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot read the image ({e})") from None


def read_clip(path: str, flag: str) -> np.ndarray:
    """A video file -> uint8 (T, H, W, 3); an image counts as a 1-frame clip."""
    if os.path.splitext(path)[1].lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
        return read_image(path, flag)
    try:
        frames = media.read_video(path)
    except Exception as e:  # noqa: BLE001 -- PyAV raises many types; all mean "unreadable"
        raise ValueError(f"{flag} {path}: cannot read the video ({e})") from None
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"{flag} {path}: no frames")
    return frames


def read_mask(path: str, source_hw: tuple[int, int], geom: cond.Geometry) -> np.ndarray:
    """mask.png (every frame) or mask.mp4 (per frame), white = regenerate -> bool (H, W) or (T, H, W) on the grid.

    It must have the aspect of the --video it masks; it is resized and cropped as that video is.
    """
    frames = read_clip(path, "--mask")
    (h, w), (vh, vw) = frames.shape[1:3], source_hw
    if abs(h * vw - w * vh) > 0.01 * h * vw:
        raise ValueError(f"--mask {path} is {h}x{w}, not the aspect of the --video ({vh}x{vw})")
    if len(frames) > 1 and len(frames) < geom.num_frames:
        raise ValueError(f"--mask {path} has {len(frames)} frames; a per-frame mask needs {geom.num_frames}")
    grey = resize_crop(frames[: geom.num_frames], geom.height, geom.width).mean(axis=-1)  # (T, H, W)
    return grey[0] > 127 if len(frames) == 1 else grey > 127


def dataset_fps(exp, workdir: str) -> float:
    """The frame rate of the work dir's dataset (its manifest), else DEFAULT_FPS."""
    path = os.path.join(layout.data_dir(exp, workdir), "manifest.json")
    try:
        with open(path) as f:
            return float(json.load(f)["spec"]["fps"])
    except (OSError, KeyError, ValueError):
        return DEFAULT_FPS


# ---------------------------------------------------------------------------------------------------
# Checking flags (no model is built)
# ---------------------------------------------------------------------------------------------------


def check_flags(args: argparse.Namespace) -> None:
    """Conflicting or incomplete flag combinations -> ValueError naming them."""
    if os.path.splitext(args.out)[1].lower() not in WRITERS:
        raise ValueError(f"--out {args.out} must end in {' or '.join(WRITERS)}")
    if args.duration is not None:
        if not args.duration > 0:
            raise ValueError(f"--duration {args.duration} must be > 0 seconds")
        if clash := [f"--{n}" for n in ("video", "last_image", "keyframe", "outpaint", "camera", "camera_path")
                     if getattr(args, n) not in (None, [])]:
            raise ValueError(f"--duration (a rollout from text or --image) cannot be combined with {', '.join(clash)}"
                             "; extend a video with --video --extend S [--times N]")
    video_ops = [f"--{n}" for n in ("extend", "prepend", "mask", "outpaint") if getattr(args, n) is not None]
    images = [f"--{n}" for n in ("image", "last_image", "keyframe") if getattr(args, n)]
    if args.video is None:
        if needs := [f for f in video_ops if f != "--outpaint"]:
            raise ValueError(f"{', '.join(needs)} needs --video")
        if args.outpaint is not None and (args.image is None or args.last_image or args.keyframe):
            raise ValueError("--outpaint needs --video or --image (alone, without --last_image / --keyframe)")
    else:
        if images:
            raise ValueError(f"--video cannot be combined with {', '.join(images)}")
        if len(video_ops) != 1:
            raise ValueError(f"--video needs exactly one of --extend, --prepend, --mask, --outpaint; got "
                             f"{video_ops or 'none'}")
    if args.context_frames is not None and args.extend is None and args.prepend is None and args.duration is None:
        raise ValueError("--context_frames applies to --extend / --prepend / --duration only")
    if args.times is not None and (args.extend is None or args.times < 1):
        raise ValueError(f"--times {args.times}: a count >= 1 of --extend steps (it needs --extend)")
    rollout_flags = [f for f, on in (("--context_noise", args.context_noise), ("--anchor", args.anchor != "none"),
                                     ("--decode", args.decode != "chunk")) if on]
    if rollout_flags and args.extend is None and args.duration is None:
        raise ValueError(f"{', '.join(rollout_flags)}: anti-drift settings of rollouts (--extend or --duration)")
    if not 0.0 <= args.context_noise < 1.0:
        raise ValueError(f"--context_noise {args.context_noise} must be in [0, 1)")
    if args.student and (folded := [f"--{n}" for n in ("cfg", "visual_cfg", "negative_prompt")
                                    if getattr(args, n) is not None]):
        raise ValueError(f"{', '.join(folded)}: a distilled student has its guidance folded in (it samples with one "
                         "model evaluation per step); drop the flag or generate with the teacher")
    if args.preview_steps < 1:
        raise ValueError(f"--preview_steps {args.preview_steps} must be >= 1")


def check_student(args: argparse.Namespace, exp) -> bool:
    """Whether the work dir has a distilled student (raises for --student without one, or at a step count a
    trajectory student was not trained for)."""
    has = os.path.isdir(layout.checkpoint_dir(args.checkpoint, "distill"))
    if args.student and not has:
        raise ValueError(f"--student: {args.checkpoint} has no distilled student (no distill/checkpoints); run the "
                         "distill stage (experiments/distill.py) first")
    trained = exp.distill.student_steps
    if args.student and args.steps and exp.distill.method.value == "trajectory" and args.steps != trained[0]:
        raise ValueError(f"--steps {args.steps}: this trajectory student samples on the {trained[0]}-step grid it was "
                         "trained for (a shortcut or mean_flow student takes any count)")
    return has


def plan(args: argparse.Namespace, exp) -> Request:
    """Read and check every input against the model grid of `exp` -> the Request (raises ValueError naming flags)."""
    vae = layout.vae_config(exp)
    dit = layout.dit_model_config(exp, text_dim=1)  # the text width does not matter for the grid
    height, width = cond.parse_size(args.size) if args.size else (exp.data.height, exp.data.width)
    num_frames = exp.data.num_frames if args.num_frames is None else args.num_frames
    geom = cond.Geometry(num_frames, height, width, vae.temporal_factor,
                         vae.spatial_factor, tuple(dit.patch_size))
    fps = args.fps if args.fps is not None else dataset_fps(exp, args.checkpoint)
    if not fps > 0:
        raise ValueError(f"--fps {fps} must be > 0")
    visual = [f"--{n}" for n in VISUAL_FLAGS if getattr(args, n) not in (None, [])]
    if visual and dit.conditions.masked_video is MaskedVideo.OFF:
        raise ValueError(f"{', '.join(visual)}: the DiT of {args.checkpoint} has no masked-video conditioning "
                         "(conditions.masked_video=off); it generates from text only")
    if args.duration is not None and dit.conditions.masked_video is MaskedVideo.OFF:
        raise ValueError(f"--duration: the DiT of {args.checkpoint} has no masked-video conditioning "
                         "(conditions.masked_video=off); a rollout extends chunk after chunk from given frames")
    if args.context_noise > 0 and dit.conditions.masked_video is not MaskedVideo.PER_TOKEN_TIMESTEPS:
        raise ValueError(f"--context_noise: the DiT of {args.checkpoint} cannot be told the noise level of its given "
                         "latents (it needs conditions.masked_video=per_token_timesteps, trained with "
                         "dit.context_noise; experiments/long_video.py)")
    camera = _camera(args, dit, geom)
    if args.video is not None:
        req = _video_request(args, geom, fps)
    elif args.duration is not None:
        req = _long_request(args, geom, fps)
    elif not visual:
        req = Request("text", geom, fps)
    else:
        req = _frames_request(args, geom, fps)
    if camera is not None and req.mode in ("extend", "prepend"):
        raise ValueError("--camera / --camera_path: camera paths of --extend / --prepend chunks are not supported yet")
    return dataclasses.replace(req, camera=camera)


def _camera(args: argparse.Namespace, dit, geom: cond.Geometry) -> np.ndarray | None:
    """The camera path per latent frame (t, 4) of --camera / --camera_path (camera.py's convention), or None."""
    if args.camera is None and args.camera_path is None:
        return None
    if args.camera is not None and args.camera_path is not None:
        raise ValueError("give --camera or --camera_path, not both")
    flag = "--camera" if args.camera is not None else "--camera_path"
    if dit.conditions.camera is CameraCondition.OFF:
        raise ValueError(f"{flag}: the DiT of {args.checkpoint} has no camera adapter (conditions.camera=off); name "
                         "the move in the prompt instead (e.g. '..., the camera pans left')")
    try:
        if args.camera is not None:
            path = camera_lib.camera_path(camera_lib.parse_moves(args.camera), geom.num_frames)
        else:
            with open(args.camera_path) as f:
                rows = json.load(f)
            path = camera_lib.check_path(rows.get("path") if isinstance(rows, dict) else rows, geom.num_frames)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{flag}: {e}") from None
    return path[camera_lib.latent_frame_rows(geom.num_frames, geom.temporal_factor)].astype(np.float32)


def _long_request(args: argparse.Namespace, geom: cond.Geometry, fps: float) -> Request:
    """--duration [--image]: a rollout of duration * fps frames (the first chunk from text or from the image)."""
    context = 2 if args.context_frames is None else args.context_frames
    cond.plan_chunks(geom, context, args.duration, fps, geom.context_pixels(context), flag="--duration")  # checks
    pixels = None if args.image is None else _fit(read_image(args.image, "--image"), geom.height, geom.width, "--image")
    return Request("long", geom, fps, pixels, context=context, total=max(1, round(args.duration * fps)))


def _frames_request(args: argparse.Namespace, geom: cond.Geometry, fps: float) -> Request:
    """--image / --last_image / --keyframe (one latent mask), or --image --outpaint."""
    t = geom.latent[0]
    wanted = [(0, args.image, "--image")] if args.image else []
    if args.last_image:
        wanted.append((t - 1, args.last_image, "--last_image"))
    for text in args.keyframe:
        index, path = cond.parse_keyframe(text)
        j, key = cond.snap_key_frame(index, geom)
        if key != index:
            logging.warning("--keyframe %d is not a key frame (0 or a multiple of %d); using frame %d", index,
                            geom.temporal_factor, key)
        wanted.append((j, path, f"--keyframe {text}"))
    taken = {}
    for j, _, flag in wanted:
        if j in taken:
            raise ValueError(f"{flag} and {taken[j]} both give latent frame {j} (pixel frame {geom.key_frame(j)})")
        taken[j] = flag
    if args.outpaint is not None:
        box = cond.outpaint_box(geom, cond.parse_borders(args.outpaint))
        given = cond.box_given(geom, box) & cond.frames_given(geom, [0])
        content = _fit(read_image(args.image, "--image"), box[1] - box[0], box[3] - box[2], "--image")
        return Request("frames", geom, fps, cond.place_in_box(content, box, geom.height, geom.width), (0,), given)
    pixels = np.concatenate([_fit(read_image(path, flag.split()[0]), geom.height, geom.width, flag)
                             for _, path, flag in wanted])  # (n, H, W, 3)
    frames = tuple(j for j, _, _ in wanted)
    return Request("frames", geom, fps, pixels, frames, cond.frames_given(geom, frames))


def _video_request(args: argparse.Namespace, geom: cond.Geometry, fps: float) -> Request:
    """--video with --extend / --prepend / --mask / --outpaint."""
    source = read_clip(args.video, "--video")
    if args.extend is not None or args.prepend is not None:
        mode, seconds = ("extend", args.extend) if args.extend is not None else ("prepend", args.prepend)
        context = 1 if args.context_frames is None else args.context_frames
        times = args.times or 1 if mode == "extend" else 1
        chunks = cond.plan_chunks(geom, context, seconds * times, fps, len(source), flag=f"--{mode}")
        pixels = _fit(source, geom.height, geom.width, "--video")
        return Request(mode, geom, fps, pixels, context=context, chunks=tuple(chunks))
    if len(source) < geom.num_frames:
        raise ValueError(f"--video {args.video} has {len(source)} frames; --mask / --outpaint need --num_frames "
                         f"{geom.num_frames}")
    clip = source[: geom.num_frames]
    if args.mask is not None:
        given = cond.pixel_mask_to_given(read_mask(args.mask, source.shape[1:3], geom), geom)
        if given.all():
            logging.warning("--mask %s has no white pixel over a whole token: nothing is regenerated", args.mask)
        return Request("clip", geom, fps, _fit(clip, geom.height, geom.width, "--video"), given=given)
    box = cond.outpaint_box(geom, cond.parse_borders(args.outpaint))
    content = _fit(clip, box[1] - box[0], box[3] - box[2], "--video")
    return Request("clip", geom, fps, cond.place_in_box(content, box, geom.height, geom.width),
                   given=cond.box_given(geom, box))
