"""`klingjax-generate`: one clip from a trained work dir, from text and optionally images or a video.

    klingjax-generate --checkpoint workdirs/kling --prompt "a red circle moves left" --out t2v.mp4
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --image first.png [--last_image last.png] --out i2v.mp4
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --keyframe 0:a.png --keyframe 8:b.png --out k.gif
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --video clip.mp4 --extend 2 [--prepend 2] --out x.mp4
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --video clip.mp4 --mask mask.png --out inpaint.mp4
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --image a.png --outpaint 8,0,8,0 --out wide.mp4
    klingjax-generate --checkpoint workdirs/camera --prompt "..." --camera pan_left:0.5,zoom_in:0.02 --out cam.mp4
    klingjax-generate --checkpoint workdirs/camera --prompt "..." --camera_path path.json --out cam.mp4

Every input is read and checked against the model grid (klingjax/eval/conditioning.py) before anything is compiled,
so a bad flag fails fast with its name in the message; the clip is written to a temporary name and renamed, so a
failed run leaves no partial file. Images and videos of another size are resized and centre-cropped (a warning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Sequence

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
    around `pixels`, the whole input video).
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
    if args.context_frames is not None and args.extend is None and args.prepend is None:
        raise ValueError("--context_frames applies to --extend / --prepend only")


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
    camera = _camera(args, dit, geom)
    if args.video is not None:
        req = _video_request(args, geom, fps)
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
        chunks = cond.plan_chunks(geom, context, seconds, fps, len(source), flag=f"--{mode}")
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


# ---------------------------------------------------------------------------------------------------
# Generating
# ---------------------------------------------------------------------------------------------------

Sample = Callable[[np.ndarray | None, np.ndarray | None, int], np.ndarray]  # (given, mask, chunk) -> (T, H, W, 3)


def _given(gen, z: np.ndarray, frames: Sequence[int]) -> np.ndarray:
    """(1, t, h, w, C) zeros with latent frames `frames` set to z (1, len(frames), h, w, C)."""
    out = np.zeros((1, *gen.latent_shape), np.float32)
    out[:, list(frames)] = z
    return out


def _run_text(gen, req: Request, sample: Sample) -> np.ndarray:
    return sample(None, None, 0)


def _run_frames(gen, req: Request, sample: Sample) -> np.ndarray:
    z = gen.encode_frames(req.pixels[:, None], batch_size=1)  # (n, 1, h, w, C): each image encoded alone
    return sample(_given(gen, z[:, 0][None], req.frames), req.given, 0)


def _run_clip(gen, req: Request, sample: Sample) -> np.ndarray:
    return sample(gen.encode(req.pixels[None], batch_size=1), req.given, 0)  # the clip encoded whole


def _run_extend(gen, req: Request, sample: Sample) -> np.ndarray:
    """Chunks forwards: the last context frames so far, encoded whole (causal), are each chunk's prefix."""
    k, need = req.context, req.geom.context_pixels(req.context)
    video = req.pixels
    for i, n in enumerate(req.chunks):
        z = gen.encode(video[None, -need:], batch_size=1)  # (1, k, h, w, C)
        out = sample(_given(gen, z, range(k)), cond.frames_given(req.geom, range(k)), i)
        video = np.concatenate([video, out[need:need + n]])
        logging.info("--extend: chunk %d/%d, %d frames", i + 1, len(req.chunks), len(video))
    return video


def _run_prepend(gen, req: Request, sample: Sample) -> np.ndarray:
    """Chunks backwards: the first context frames so far, key frames encoded alone, are each chunk's suffix."""
    t = req.geom.latent[0]
    k, need, num_frames = req.context, req.geom.context_pixels(req.context), req.geom.num_frames
    video = req.pixels
    for i, n in enumerate(req.chunks):
        z = gen.encode_frames(video[None, :need], batch_size=1)  # (1, k, h, w, C)
        out = sample(_given(gen, z, range(t - k, t)), cond.frames_given(req.geom, range(t - k, t)), i)
        video = np.concatenate([out[num_frames - need - n:num_frames - need], video])
        logging.info("--prepend: chunk %d/%d, %d frames", i + 1, len(req.chunks), len(video))
    return video


RUNNERS = {"text": _run_text, "frames": _run_frames, "clip": _run_clip, "extend": _run_extend,
           "prepend": _run_prepend}


def generate(gen, req: Request, args: argparse.Namespace) -> np.ndarray:
    """The clip of `req` (uint8 (T', H, W, 3)) with a loaded VideoGenerator, reshaped to the request's grid."""
    import jax

    shape = (*req.geom.latent, gen.latent_shape[-1])
    steps = args.steps or gen.sample.num_steps
    if gen.latent_shape != shape or gen.sample.num_steps != steps:  # a new sampler for this grid / step count
        gen = dataclasses.replace(gen, latent_shape=shape, sample=dataclasses.replace(gen.sample, num_steps=steps))
    key = jax.random.key(args.seed)

    def sample(given, mask, chunk):
        return gen([args.prompt], jax.random.fold_in(key, chunk), batch_size=1, negative_prompt=args.negative_prompt,
                   given=given, given_mask=None if mask is None else mask[None], text_scale=args.cfg,
                   visual_scale=args.visual_cfg, camera=None if req.camera is None else req.camera[None])[0]

    return RUNNERS[req.mode](gen, req, sample)


def write_atomic(path: str, frames: np.ndarray, fps: float) -> None:
    """Write the clip to a temporary file next to `path`, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1].lower()
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="." + os.path.basename(path) + ".", dir=folder)
    os.close(fd)
    try:
        WRITERS[suffix](tmp, frames, fps)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open() would have made
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags of `klingjax-generate`."""
    p = argparse.ArgumentParser(prog="klingjax-generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a klingjax-train work dir")
    p.add_argument("--out", required=True, help="output clip, .mp4 or .gif")
    p.add_argument("--prompt", default="", help="what to generate")
    p.add_argument("--negative_prompt", default=None, help="what to steer away from (default: the config's)")
    p.add_argument("--image", help="first frame (image-to-video)")
    p.add_argument("--last_image", help="last frame")
    p.add_argument("--keyframe", action="append", default=[], metavar="FRAME:IMAGE",
                   help="an image at a pixel frame (0 or a multiple of the VAE's temporal factor); repeatable")
    p.add_argument("--video", help="input clip for --extend / --prepend / --mask / --outpaint")
    p.add_argument("--extend", type=float, help="seconds to add after --video")
    p.add_argument("--prepend", type=float, help="seconds to add before --video")
    p.add_argument("--context_frames", type=int, help="latent frames given per extension chunk (default 1)")
    p.add_argument("--mask", help="mask.png (every frame) or mask.mp4 (per frame); white = regenerate")
    p.add_argument("--outpaint", metavar="L,T,R,B", help="pixel borders to generate around --video / --image")
    p.add_argument("--camera", metavar="MOVE:VALUE,...", help="camera moves for a DiT with a camera adapter: "
                   "pan_left|pan_right|pan_up|pan_down:px_per_frame, zoom_in|zoom_out:scale_change_per_frame (0.02 = "
                   "2%%), roll_cw|roll_ccw:rad_per_frame; combine with commas (klingjax/data/synthetic/camera.py)")
    p.add_argument("--camera_path", help="JSON list of per-frame [oy, ox, log_scale, roll] rows (one per output "
                   "frame, row 0 zero), or {\"path\": [...]}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's)")
    p.add_argument("--cfg", type=float, help="text guidance scale (default: the config's)")
    p.add_argument("--visual_cfg", type=float, help="guidance scale of the visual condition (default: the config's)")
    p.add_argument("--num_frames", type=int, help="frames per clip (1 + 4k; default: the training clips')")
    p.add_argument("--size", metavar="HxW", help="frame size (default: the training clips')")
    p.add_argument("--fps", type=float, help="frame rate of --extend / --prepend and of the output (default: data's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, loader: Callable | None = None) -> str:
    """Parse flags, check every input, generate and write the clip; returns its path.

    `loader(workdir) -> (exp, VideoGenerator)` defaults to `load_workdir_generator` (tests pass a cached one).
    """
    args = parse_args(argv)
    check_flags(args)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    try:
        exp = layout.load_workdir_config(args.checkpoint)
    except FileNotFoundError as e:
        raise ValueError(f"--checkpoint: {e}") from None
    req = plan(args, exp)
    if loader is None:
        from klingjax.eval.generate import load_workdir_generator as loader
    _, gen = loader(args.checkpoint)
    frames = generate(gen, req, args)
    write_atomic(args.out, frames, req.fps)
    logging.info("klingjax-generate: wrote %d frames of %dx%d to %s", *frames.shape[:3], args.out)
    return args.out


def run() -> None:
    """Console-script entry point (`klingjax-generate`): input errors exit with their message."""
    logging.set_verbosity(logging.INFO)
    try:
        print(main())
    except ValueError as e:
        raise SystemExit(f"klingjax-generate: {e}") from None


if __name__ == "__main__":
    run()
