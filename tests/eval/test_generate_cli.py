"""`klingjax-generate` end to end on a kling runlocal work dir: every flag writes a clip of the right length and
size, the given first frame comes back exactly (up to the file format), extension adds what was asked, and every bad
input fails with the flag's name before a generator is loaded, leaving no file.

The work dir holds init-scale random params saved by the train loop's Checkpointer: loading, encoding, sampling and
writing run as on a trained one (training it would add ~90 s; nothing here depends on the params' values).
One generator is loaded and reused by every test (`loader`), so each sampler shape compiles once.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageSequence

from experiments import demo
from klingjax.config import SampleConfig, config_from_dataclass, to_experiment
from klingjax.eval import generate_cli, media
from klingjax.measures import psnr


def _smooth(h: int, w: int, flip: bool = False) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 128)], -1).astype(np.uint8)
    return img[::-1].copy() if flip else img


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Input files of another size than the model's 32x32 (48x64: resized and cropped)."""
    root = tmp_path_factory.mktemp("inputs")
    img = _smooth(48, 64)
    files = {"first": root / "first.png", "last": root / "last.png", "clip": root / "clip.mp4",
             "short": root / "short.mp4", "mask": root / "mask.png", "mask_mp4": root / "mask.mp4",
             "mask_tall": root / "mask_tall.png", "bad": root / "bad.png"}
    Image.fromarray(img).save(files["first"])
    Image.fromarray(_smooth(48, 64, flip=True)).save(files["last"])
    clip = np.stack([np.roll(img, 2 * i, axis=1) for i in range(12)])  # (12, 48, 64, 3)
    media.write_mp4(files["clip"], clip, fps=8)
    media.write_mp4(files["short"], clip[:3], fps=8)
    mask = np.zeros((48, 64, 3), np.uint8)
    mask[12:36, 16:48] = 255
    Image.fromarray(mask).save(files["mask"])
    media.write_mp4(files["mask_mp4"], np.stack([np.roll(mask, 4 * i, axis=1) for i in range(9)]), fps=8)
    Image.fromarray(mask[:, :20]).save(files["mask_tall"])  # 48x20: not the video's aspect
    files["bad"].write_text("not an image")
    return {k: str(v) for k, v in files.items()}


def _generate(workdir, loader, out, *flags) -> str:
    return generate_cli.main(["--checkpoint", workdir, "--prompt", "a red circle moves left", "--out", str(out),
                              *flags], loader=loader)


def _read(path: str) -> np.ndarray:
    """uint8 (T, H, W, 3) of an mp4 or (losslessly palettised) gif."""
    if path.endswith(".gif"):
        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    return media.read_video(path)


# name -> (flags with {input} placeholders, frames, (H, W)); the video has 12 frames, the data 8 fps.
CASES = {
    "text": ([], 9, (32, 32)),
    "image": (["--image", "{first}"], 9, (32, 32)),
    # Guidance scales are static in the compiled sampler: the config's (4, 1), so nothing recompiles.
    "first_last": (["--image", "{first}", "--last_image", "{last}", "--seed", "3", "--cfg", "4"], 9, (32, 32)),
    "keyframes": (["--keyframe", "0:{first}", "--keyframe", "5:{last}", "--visual_cfg", "1"], 9, (32, 32)),
    "extend": (["--video", "{clip}", "--extend", "1.5"], 12 + 12, (32, 32)),
    "extend_fps": (["--video", "{clip}", "--extend", "1", "--fps", "4"], 12 + 4, (32, 32)),
    "prepend": (["--video", "{clip}", "--prepend", "1", "--context_frames", "2"], 12 + 8, (32, 32)),
    "extend_times": (["--video", "{clip}", "--extend", "0.5", "--times", "3"], 12 + 12, (32, 32)),
    "duration": (["--duration", "3"], 24, (32, 32)),  # 9 + 4 + 4 + 4 + 3 frames: context 2 of 3 latent frames
    "duration_image_antidrift": (["--image", "{first}", "--duration", "2", "--context_noise", "0.05", "--anchor",
                                  "colour", "--decode", "stream"], 16, (32, 32)),
    "duration_stream": (["--duration", "2", "--decode", "stream"], 16, (32, 32)),
    "inpaint": (["--video", "{clip}", "--mask", "{mask}", "--negative_prompt", "blurry"], 9, (32, 32)),
    "inpaint_per_frame": (["--video", "{clip}", "--mask", "{mask_mp4}"], 9, (32, 32)),
    "outpaint_video": (["--video", "{clip}", "--outpaint", "8,0,8,0"], 9, (32, 32)),
    "outpaint_image": (["--image", "{first}", "--outpaint", "8,8,8,8"], 9, (32, 32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_flag_writes_a_clip_of_the_right_length_and_size(workdir, loader, inputs, tmp_path, name):
    flags, frames, size = CASES[name]
    out = tmp_path / "sub" / f"{name}.{'gif' if name == 'keyframes' else 'mp4'}"
    assert _generate(workdir, loader, out, *[f.format(**inputs) for f in flags]) == str(out)
    video = _read(str(out))
    assert video.shape == (frames, *size, 3)
    assert os.listdir(out.parent) == [out.name]  # no temporary file left behind


@dataclasses.dataclass(frozen=True)
class ShapeOnlyGenerator:
    """Stands in for VideoGenerator where only the grid matters: grey clips of its latent grid; records each call's
    (latent_shape, num_steps)."""

    latent_shape: tuple[int, int, int, int]
    sample: SampleConfig
    calls: list

    def __call__(self, captions, key, **kwargs):
        self.calls.append((self.latent_shape, self.sample.num_steps))
        t, h, w, _ = self.latent_shape
        return np.full((len(captions), 1 + 4 * (t - 1), 4 * h, 4 * w, 3), 128, np.uint8)


def test_num_frames_size_and_steps_build_a_generator_for_that_grid(workdir, tmp_path):
    """The trained 9x32x32 generator is rebuilt for 5 frames of 16x32 with 3 steps (a fake: compiling a sampler for
    another grid costs ~20 s and shows nothing more)."""
    calls = []
    fake = ShapeOnlyGenerator((3, 8, 8, 8), SampleConfig(num_steps=2), calls)
    out = _generate(workdir, lambda _: (None, fake), tmp_path / "x.mp4", "--num_frames", "5", "--size", "16x32",
                    "--steps", "3")
    assert _read(out).shape == (5, 16, 32, 3) and calls == [((2, 4, 8, 8), 3)]
    _generate(workdir, lambda _: (None, fake), tmp_path / "y.mp4")  # the trained grid: used as it is
    assert calls[-1] == ((3, 8, 8, 8), 2)


@dataclasses.dataclass(frozen=True)
class SamplerRecordingGenerator(ShapeOnlyGenerator):
    """Records (num_steps, sampler) of each call."""

    def __call__(self, captions, key, **kwargs):
        self.calls.append((self.sample.num_steps, self.sample.sampler.value))
        return _grey(self.latent_shape, len(captions))


def _grey(latent_shape, n):
    t, h, w, _ = latent_shape
    return np.full((n, 1 + 4 * (t - 1), 4 * h, 4 * w, 3), 128, np.uint8)


def test_preview_writes_a_few_step_clip_first_then_the_full_one(workdir, tmp_path):
    """Without a student the preview is the teacher at --preview_steps with unipc; the full clip follows."""
    calls = []
    fake = SamplerRecordingGenerator((3, 8, 8, 8), SampleConfig(num_steps=25), calls)

    def loader(_, student=False):
        assert not student  # this work dir has no distilled student
        return None, fake

    out = _generate(workdir, loader, tmp_path / "x.mp4", "--preview", "--preview_steps", "3")
    assert sorted(os.listdir(tmp_path)) == ["x.mp4", "x.preview.mp4"] and out == str(tmp_path / "x.mp4")
    assert calls == [(3, "unipc"), (25, "euler")]


def test_given_first_frame_comes_back(workdir, loader, inputs, tmp_path):
    """--image: output frame 0 is the VAE reconstruction of the image (the given latents stay exact); a text-only
    clip of the same seed is far from it. gif: mp4's 4:2:0 chroma alone costs ~8 dB on 32x32 frames."""
    _, gen = loader(workdir)
    image = generate_cli._fit(generate_cli.read_image(inputs["first"], "--image"), 32, 32, "--image")
    recon = gen.decode(gen.encode_frames(image[None], batch_size=1), batch_size=1)[0, 0].astype(np.float64)
    scores = {}
    for name, flags in (("i2v", ["--image", inputs["first"]]), ("t2v", [])):
        video = _read(_generate(workdir, loader, tmp_path / f"{name}.gif", *flags)).astype(np.float64)
        scores[name] = float(psnr(video[0], recon, data_range=255.0))
    assert scores["i2v"] > 25.0 and scores["t2v"] < scores["i2v"] - 8.0, scores


def test_extension_keeps_the_original_video(workdir, loader, inputs, tmp_path):
    original = generate_cli._fit(media.read_video(inputs["clip"]), 32, 32, "--video").astype(np.float64)
    video = _read(_generate(workdir, loader, tmp_path / "x.gif", "--video", inputs["clip"], "--extend", "0.5"))
    assert len(video) == 12 + 4
    assert psnr(video[:12].astype(np.float64), original, data_range=255.0).mean() > 25.0  # the input, resized


def _fails_to_load(workdir):
    raise AssertionError("a generator was loaded for a bad input")


# flags -> a fragment of the error (each names the flag); checked before any generator is built.
BAD = [
    (["--image", "{bad}"], "--image {bad}: cannot read the image"),
    (["--video", "{clip}", "--mask", "{mask_tall}"], "--mask {mask_tall} is 48x20, not the aspect of the --video"),
    (["--video", "{short}", "--extend", "1", "--context_frames", "2"], "--video has 3 frames, fewer than the 5"),
    (["--video", "{short}", "--mask", "{mask}"], "--video {short} has 3 frames"),
    (["--keyframe", "9:{first}"], "--keyframe 9 is out of range"),
    (["--keyframe", "{first}"], "--keyframe"),
    (["--image", "{first}", "--keyframe", "1:{last}"], "--keyframe 1:{last} and --image both give latent frame 0"),
    (["--mask", "{mask}"], "--mask needs --video"),
    (["--extend", "1"], "--extend needs --video"),
    (["--video", "{clip}"], "--video needs exactly one of"),
    (["--video", "{clip}", "--extend", "1", "--prepend", "1"], "--video needs exactly one of"),
    (["--video", "{clip}", "--image", "{first}", "--mask", "{mask}"], "--video cannot be combined with --image"),
    (["--outpaint", "8,0,8,0"], "--outpaint needs --video or --image"),
    (["--image", "{first}", "--outpaint", "20,0,20,0"], "--outpaint 20,0,20,0 leaves no inner box"),
    (["--image", "{first}", "--context_frames", "2"], "--context_frames applies to --extend / --prepend / --duration"),
    (["--times", "3"], "--times 3: a count >= 1 of --extend steps"),
    (["--video", "{clip}", "--extend", "1", "--times", "0"], "--times 0: a count >= 1"),
    (["--context_noise", "0.1"], "--context_noise: anti-drift settings of rollouts"),
    (["--anchor", "colour", "--image", "{first}"], "--anchor: anti-drift settings of rollouts"),
    (["--duration", "10", "--context_noise", "1.5"], "--context_noise 1.5 must be in"),
    (["--duration", "0"], "--duration 0.0 must be > 0"),
    (["--duration", "10", "--video", "{clip}"],
     "--duration (a rollout from text or --image) cannot be combined with --video"),
    (["--duration", "10", "--last_image", "{last}", "--image", "{first}"], "cannot be combined with --last_image"),
    (["--duration", "10", "--context_frames", "3"], "--context_frames 3 must be in 1..2"),
    (["--video", "{clip}", "--extend", "1", "--context_frames", "3"], "--context_frames 3 must be in 1..2"),
    (["--num_frames", "8"], "--num_frames 8 must be 1 + 4 * k"),
    (["--size", "20x32"], "--size 20x32 must be a multiple of 8x8"),
    (["--size", "big"], "--size 'big' must be HxW"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--student"], "--student: {workdir} has no distilled student"),
    (["--student", "--cfg", "2", "--negative_prompt", "x"], "--cfg, --negative_prompt: a distilled student has its "
                                                             "guidance folded in"),
    (["--preview_steps", "0"], "--preview_steps 0 must be >= 1"),
    (["--video", "{clip}", "--extend", "1", "--fps", "0"], "--fps 0.0 must be > 0"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_inputs_name_the_flag_and_write_nothing(workdir, inputs, tmp_path, flags, message):
    out = tmp_path / "out.mp4"
    with pytest.raises(ValueError) as err:
        _generate(workdir, _fails_to_load, out, *[f.format(**inputs) for f in flags])
    assert message.format(**inputs, workdir=workdir) in str(err.value)
    assert not os.listdir(tmp_path)


def test_checkpoint_and_out_errors(workdir, inputs, tmp_path):
    text_only = tmp_path / "t2v"  # a demo work dir: its DiT has no masked-video conditioning
    text_only.mkdir()
    (text_only / "config.json").write_text(config_from_dataclass(to_experiment(demo.get_config("runlocal"))).to_json())
    for checkpoint, flags, message in [
            (str(text_only), ["--image", inputs["first"]], "--image: the DiT of"),
            (str(tmp_path / "missing"), [], "--checkpoint:"),
            (workdir, ["--out", str(tmp_path / "x.avi")], "--out")]:
        with pytest.raises(ValueError, match=message):
            generate_cli.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "x.mp4"), *flags],
                              loader=_fails_to_load)
    assert sorted(os.listdir(tmp_path)) == ["t2v"]
    with pytest.raises(SystemExit):  # argparse: a required flag missing
        generate_cli.main(["--out", str(tmp_path / "x.mp4")])


def test_run_exits_with_the_message(monkeypatch, inputs, tmp_path):
    monkeypatch.setattr(sys, "argv", ["klingjax-generate", "--checkpoint", str(tmp_path), "--mask", inputs["mask"],
                                      "--out", str(tmp_path / "x.mp4")])
    with pytest.raises(SystemExit, match="klingjax-generate: --mask needs --video"):
        generate_cli.run()


def test_a_failed_write_leaves_no_file(monkeypatch, tmp_path):
    def broken(path, frames, fps):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setitem(generate_cli.WRITERS, ".mp4", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_cli.write_atomic(str(tmp_path / "x.mp4"), np.zeros((1, 8, 8, 3), np.uint8), 8.0)
    assert not os.listdir(tmp_path)
    generate_cli.write_atomic(str(tmp_path / "y.gif"), np.zeros((1, 8, 8, 3), np.uint8), 8.0)
    assert os.listdir(tmp_path) == ["y.gif"] and os.stat(tmp_path / "y.gif").st_mode & 0o044  # readable by others
