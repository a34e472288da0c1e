"""`klingjax-generate`: one clip from a trained work dir, from text and optionally images or a video.

    klingjax-generate --checkpoint workdirs/kling --prompt "a red circle moves left" --out t2v.mp4
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --image first.png [--last_image last.png] --out i2v.mp4
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --keyframe 0:a.png --keyframe 8:b.png --out k.gif
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --video clip.mp4 --extend 2 [--prepend 2] --out x.mp4
    klingjax-generate --checkpoint workdirs/long_video --prompt "..." --duration 120 --context_noise 0.05 --out 2m.mp4
    klingjax-generate --checkpoint workdirs/long_video --prompt "..." --video clip.mp4 --extend 5 --times 24 --out x.mp4
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --video clip.mp4 --mask mask.png --out inpaint.mp4
    klingjax-generate --checkpoint workdirs/kling --prompt "..." --image a.png --outpaint 8,0,8,0 --out wide.mp4
    klingjax-generate --checkpoint workdirs/camera --prompt "..." --camera pan_left:0.5,zoom_in:0.02 --out cam.mp4
    klingjax-generate --checkpoint workdirs/camera --prompt "..." --camera_path path.json --out cam.mp4
    klingjax-generate --checkpoint workdirs/demo --prompt "..." --student --out fast.mp4    # the distilled student
    klingjax-generate --checkpoint workdirs/demo --prompt "..." --preview --out t2v.mp4     # t2v.preview.mp4 first

Every input is read and checked against the model grid (klingjax/eval/conditioning.py) before anything is compiled,
so a bad flag fails fast with its name in the message; the clip is written to a temporary name and renamed, so a
failed run leaves no partial file. Images and videos of another size are resized and centre-cropped (a warning).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from absl import logging

from klingjax import layout
from klingjax.diffusion.samplers import Sampler
from klingjax.eval import conditioning as cond
from klingjax.eval import media, rollout
from klingjax.eval.generate_requests import (  # noqa: F401 - re-exported: the CLI's input API
    WRITERS,
    Request,
    _fit,
    check_flags,
    check_student,
    plan,
    read_clip,
    read_image,
    read_mask,
)

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


RUNNERS = {"text": _run_text, "frames": _run_frames, "clip": _run_clip, "prepend": _run_prepend}


def generate(gen, req: Request, args: argparse.Namespace) -> Iterator[np.ndarray]:
    """The clip of `req` with a loaded VideoGenerator (reshaped to the request's grid), as uint8 (n, H, W, 3) chunks
    in order: one for a single sample, chunk after chunk for a rollout (--extend, --duration: constant memory)."""
    import jax

    shape = (*req.geom.latent, gen.latent_shape[-1])
    steps = args.steps or gen.sample.num_steps
    if gen.latent_shape != shape or gen.sample.num_steps != steps:  # a new sampler for this grid / step count
        gen = dataclasses.replace(gen, latent_shape=shape, sample=dataclasses.replace(gen.sample, num_steps=steps))
    key = jax.random.key(args.seed)
    kwargs = dict(negative_prompt=args.negative_prompt, text_scale=args.cfg, visual_scale=args.visual_cfg)
    if req.mode in ("extend", "long"):
        total = req.total if req.mode == "long" else len(req.pixels) + sum(req.chunks)
        start = None if req.pixels is None else req.pixels[None]
        config = rollout.RolloutConfig(context=req.context, context_noise=args.context_noise, anchor=args.anchor,
                                       decode=args.decode)
        for frames, _ in rollout.rollout(gen, [args.prompt], key, total, start=start, config=config, fps=req.fps,
                                         **kwargs):
            yield frames[0]
        return

    def sample(given, mask, chunk):
        return gen([args.prompt], jax.random.fold_in(key, chunk), batch_size=1, given=given,
                   given_mask=None if mask is None else mask[None],
                   camera=None if req.camera is None else req.camera[None], **kwargs)[0]

    yield RUNNERS[req.mode](gen, req, sample)


def write_chunks(path: str, chunks: Iterator[np.ndarray], fps: float) -> int:
    """Write a clip arriving in chunks: an mp4 streams (memory constant in its length), a gif is collected first.
    The file appears atomically when the last chunk is in; returns the frame count."""
    if os.path.splitext(path)[1].lower() == ".mp4":
        count = 0
        with media.mp4_stream(path, fps) as write:
            for frames in chunks:
                write(frames)
                count += len(frames)
        return count
    frames = np.concatenate(list(chunks))
    write_atomic(path, frames, fps)
    return len(frames)


def write_atomic(path: str, frames: np.ndarray, fps: float) -> None:
    """Write the clip to a temporary file next to `path`, then rename it into place."""
    with media.atomic_path(path) as tmp:
        WRITERS[os.path.splitext(path)[1].lower()](tmp, frames, fps)


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
    p.add_argument("--times", type=int, help="repeat --extend this many times (e.g. --extend 5 --times 24: 2 more "
                   "minutes), streamed chunk by chunk into the mp4")
    p.add_argument("--duration", type=float, help="seconds of a long video from text (or --image), generated chunk "
                   "by chunk, each extending the last (klingjax/eval/rollout.py)")
    p.add_argument("--context_frames", type=int, help="latent frames given per extension chunk (default 1 for "
                   "--extend / --prepend, 2 for --duration)")
    p.add_argument("--context_noise", type=float, default=0.0, help="anti-drift: re-noise each chunk's context "
                   "latents to this level (a model trained with dit.context_noise; e.g. 0.05)")
    p.add_argument("--anchor", choices=rollout.ANCHORS, default="none", help="anti-drift: 'colour' matches each "
                   "chunk's colour statistics to the first chunk's; 'colour_smooth' ramps that correction across each "
                   "chunk (no jump at seams)")
    p.add_argument("--decode", choices=rollout.DECODES, default="chunk", help="anti-seam: 'stream' decodes only "
                   "each chunk's new latents with one causal decoder carried across chunks")
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
    p.add_argument("--student", action="store_true", help="sample the work dir's distilled few-step student")
    p.add_argument("--preview", action="store_true", help="first write a few-step preview to OUT's name + "
                   "'.preview' (the student if the work dir has one, else the teacher at --preview_steps with unipc), "
                   "then the full-quality clip")
    p.add_argument("--preview_steps", type=int, default=4, help="steps of a teacher preview (default 4)")
    return p.parse_args(argv)


def preview_path(out: str) -> str:
    """OUT's preview file: clip.mp4 -> clip.preview.mp4."""
    stem, ext = os.path.splitext(out)
    return f"{stem}.preview{ext}"


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
    has_student = check_student(args, exp)
    if loader is None:
        from klingjax.eval.generate import load_workdir_generator as loader
    if args.preview and not args.student:  # a quick look first: the student, or the teacher in a few unipc steps
        start = time.time()
        if has_student:
            _, gen = loader(args.checkpoint, student=True)
            chunks = generate(gen, req, _student_args(args))
        else:
            _, gen = loader(args.checkpoint)
            gen = dataclasses.replace(gen, sample=dataclasses.replace(gen.sample, sampler=Sampler.UNIPC))
            chunks = generate(gen, req, _with(args, steps=args.preview_steps))
        write_chunks(preview_path(args.out), chunks, req.fps)
        logging.info("klingjax-generate: preview (%s) in %.1fs: %s", "student" if has_student else
                     f"teacher, {args.preview_steps} unipc steps", time.time() - start, preview_path(args.out))
    start = time.time()
    _, gen = loader(args.checkpoint, student=True) if args.student else loader(args.checkpoint)
    count = write_chunks(args.out, generate(gen, req, args), req.fps)
    logging.info("klingjax-generate: wrote %d frames of %dx%d to %s in %.1fs", count, req.geom.height,
                 req.geom.width, args.out, time.time() - start)
    return args.out


def _with(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _student_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags of a student preview: its own steps, guidance folded in."""
    return _with(args, steps=None, cfg=None, visual_cfg=None, negative_prompt=None)


def run() -> None:
    """Console-script entry point (`klingjax-generate`): input errors exit with their message."""
    logging.set_verbosity(logging.INFO)
    try:
        print(main())
    except ValueError as e:
        raise SystemExit(f"klingjax-generate: {e}") from None


if __name__ == "__main__":
    run()
