"""Per-task evaluation (klingjax/eval/task_metrics.py, task_eval.py): metrics on clips whose answer is known, the
condition builders, and the driver end to end with a stand-in generator (`FakeGenerator`: a lossless toy VAE)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from data_pipelines.make_synthetic import write_synthetic_dataset
from experiments import demo
from klingjax.config import to_experiment
from klingjax.data.synthetic import SyntheticSpec, generate_clip, sprite_height
from klingjax.eval import cli, evaluate, task_eval
from klingjax.eval import task_metrics as tm
from klingjax.measures import PSNR_CAP

SPEC = SyntheticSpec(num_frames=9)  # one object, static camera, 32x32
TF, S, PATCH = 4, 4, (1, 2, 2)  # the demo VAE's temporal / spatial factors and the demo DiT's patch
GRID = (3, 8, 8)


@pytest.fixture(scope="module")
def clips():
    clips = [generate_clip(SPEC, 7, i) for i in range(12)]
    return np.stack([c.frames for c in clips]), [c.caption for c in clips], [c.meta for c in clips]


def _words(caption: str, spec: SyntheticSpec) -> tuple[list[str], list[str]]:
    """The colour and shape words of a caption, in order (captions are "a {colour} {shape} ..." phrases)."""
    words = caption.replace(",", " ").split()
    return [w for w in words if w in dict(spec.colours)], [w for w in words if w in spec.shapes]


# ----------------------------------------------------------------------------- metrics


def test_pixel_mask_covers_the_latent_frames_and_blocks():
    mask = np.zeros(GRID, bool)
    mask[0, 0, 0] = mask[2, 1, 1] = True
    px = tm.pixel_mask(mask, 9, TF, S)  # (9, 32, 32)
    assert px.shape == (9, 32, 32) and px.sum() == 16 + 4 * 16
    assert px[0, :4, :4].all() and px[5:9, 4:8, 4:8].all() and not px[1:5].any()
    key = tm.pixel_mask(mask, 9, TF, S, key_frames_only=True)
    assert key[8, 4:8, 4:8].all() and not key[5:8].any() and key.sum() == 32
    assert tm.given_key_frames(np.ones(GRID, bool) & (np.arange(3) != 1)[:, None, None], TF) == [0, 8]


def test_psnr_metrics_cap_on_ground_truth_and_see_damage_only_where_measured(clips):
    real = clips[0]
    assert (tm.frame_psnr(real, real, [0, 8]) == PSNR_CAP).all()
    damaged = real.copy()
    damaged[:, :, 16:] = 255 - damaged[:, :, 16:]  # bottom half inverted
    top = np.zeros(real.shape[:4], bool)
    top[:, :, :16] = True
    assert (tm.masked_psnr(damaged, real, top) == PSNR_CAP).all()
    assert (tm.masked_psnr(damaged, real, ~top) < 15).all() and (tm.frame_psnr(damaged, real, [0]) < 20).all()
    assert np.isnan(tm.masked_psnr(real, real, np.zeros_like(top))).all()


def test_centroid_error_is_zero_on_ground_truth_and_measures_a_shift(clips):
    real, _, metas = clips
    assert tm.centroid_error(real, metas, SPEC, [0, 4, 8]) < 0.3
    shifted = np.roll(real, 3, axis=3)  # 3 px to the right (sprites stay inside: margins and speed clamp)
    assert 2.7 < tm.centroid_error(shifted, metas, SPEC, [0, 4, 8]) < 3.3
    blank = np.broadcast_to(real[:, :, :1, :1], real.shape)  # background only: nothing to find
    assert np.isnan(tm.centroid_error(blank, metas, SPEC, [0]))


def test_speed_error_is_zero_on_ground_truth_and_sees_a_half_speed_clip(clips):
    real, _, metas = clips
    new = list(range(1, 9))
    assert tm.speed_error(real, metas, SPEC, new) < 0.05
    slow = real[:, [0, 1, 1, 2, 2, 3, 3, 4, 4]]  # half speed, in steps
    expected = np.mean([np.hypot(*m["objects"][0]["screen_velocity"]) / 2 for m in metas])
    assert tm.speed_error(slow, metas, SPEC, new) == pytest.approx(expected, abs=0.1)
    assert expected > 0.25


def test_seam_flicker_is_one_on_ground_truth_and_flags_a_pasted_jump(clips):
    real = clips[0]
    new = list(range(1, 9))
    assert np.mean(tm.seam_flicker(real, 1, new)) < 1.2
    jump = real.copy()
    jump[:, 1:] = np.clip(jump[:, 1:].astype(int) + 30, 0, 255).astype(np.uint8)  # new part brighter
    assert (tm.seam_flicker(jump, 1, new) > 1.2).all()
    backward = real[:, ::-1]  # the seam of a suffix: new frames 0..7, given frame 8
    assert np.mean(tm.seam_flicker(backward, 8, list(range(8)))) < 1.2


def test_seam_ratio_is_one_on_ground_truth_and_flags_a_pasted_region(clips):
    real, _, metas = clips
    inner = np.zeros(real.shape[:4], bool)
    inner[:, :, 8:24, 8:24] = True  # the outpainting box: sprites cross it
    assert np.nanmean(tm.seam_ratio(real, inner)) < 1.2
    other = np.roll(real, 1, axis=0)  # another clip's content pasted inside the box
    pasted = np.where(inner[..., None], other, real)
    assert np.nanmean(tm.seam_ratio(pasted, inner)) > 1.5
    assert np.isnan(tm.seam_ratio(real, np.ones_like(inner))).all()  # no boundary


def test_adherence_is_full_on_ground_truth_and_zero_for_another_sprite(clips):
    real, captions, metas = clips
    acc = tm.adherence(real, metas, SPEC)
    assert acc["colour_shape"] == acc["direction"] == acc["all"] == 1.0
    rng = np.random.default_rng(0)
    targets = [task_eval.recolour(c, m, SPEC, rng)[1] for c, m in zip(captions, metas)]
    assert tm.adherence(real, targets, SPEC)["colour_shape"] == 0.0


# ----------------------------------------------------------------------------- conditions


def test_trajectory_box_covers_the_whole_trajectory_and_is_token_aligned(clips):
    _, _, metas = clips
    for meta in metas:
        obj = meta["objects"][0]
        top, bottom, left, right = task_eval.trajectory_box(obj, 9, S, GRID, PATCH)
        assert all(v % 2 == 0 for v in (top, bottom, left, right)) and 0 <= top < bottom <= 8 and 0 <= left < right <= 8
        t = np.arange(9)[:, None]
        corner = np.asarray(obj["start"]) + t * np.asarray(obj["screen_velocity"])  # (T, 2) top-left px
        far = corner + [sprite_height(obj["shape"], obj["size"]), obj["size"]]
        assert (corner.min(0) >= [S * top, S * left]).all() and (far.max(0) <= [S * bottom, S * right]).all()
        assert (bottom - top) * (right - left) < 64  # not the whole frame: something is given


def test_recolour_changes_colour_and_shape_in_the_same_vocabulary():
    spec = dataclasses.replace(SPEC, p_two_objects=1.0, p_camera_pan=0.5)
    for i in range(20):
        clip = generate_clip(spec, 3, i)
        prompt, target = task_eval.recolour(clip.caption, clip.meta, spec, np.random.default_rng(i))
        old, new = clip.meta["objects"][0], target["objects"][0]
        assert new["colour"] != old["colour"] and new["shape"] != old["shape"]
        assert new["colour"] not in {o["colour"] for o in clip.meta["objects"]}
        colours, shapes = _words(prompt, spec)
        old_colours, old_shapes = _words(clip.caption, spec)
        assert colours == [new["colour"], *old_colours[1:]] and shapes == [new["shape"], *old_shapes[1:]]
        assert prompt.replace(f"{new['colour']} {new['shape']}", "X") == clip.caption.replace(
            f"{old['colour']} {old['shape']}", "X")  # direction, background and camera kept
        assert target["objects"][1:] == clip.meta["objects"][1:]


def test_conditions_are_the_table_patterns_on_tokens(clips):
    _, captions, metas = clips
    masks = {task: task_eval.build_condition(task, captions, metas, SPEC, GRID, PATCH, S).mask
             for task in task_eval.TASK_METRICS}
    assert masks["t2v"] is None
    for task, frames in (("i2v", [0]), ("prefix", [0]), ("flf2v", [0, 2]), ("keyframes", [0, 2]),
                         ("suffix", [2])):
        assert masks[task].shape == (12, *GRID)
        assert masks[task].all((0, 2, 3)).tolist() == [j in frames for j in range(3)], task
    assert task_eval.keyframe_indices(5) == [0, 2, 4] and task_eval.keyframe_indices(4) == [0, 2, 3]
    assert masks["outpaint"][0, 0].tolist() == [[2 <= y < 6 and 2 <= x < 6 for x in range(8)] for y in range(8)]
    inpaint = task_eval.build_condition("inpaint", captions, metas, SPEC, GRID, PATCH, S)
    assert inpaint.captions != captions and inpaint.mask.any() and not inpaint.mask.all()
    blocks = inpaint.mask.reshape(12, 3, 4, 2, 4, 2)  # (N, t, H, ph, W, pw): each token wholly given or not
    assert (blocks.all((3, 5)) == blocks.any((3, 5))).all()


# ----------------------------------------------------------------------------- driver


class FakeGenerator:
    """Stands in for `VideoGenerator`: a lossless toy VAE (each latent position holds its 4-frame group's 4x4 pixel
    blocks; decoding rounds to 8 grey levels, so reconstruction is close, not exact) and a "model" that generates
    the real clips' latents wherever it is free to: the ceiling of every task, and the unchanged sprite in inpaint."""

    def __init__(self, real: np.ndarray):
        self.real = real

    def encode(self, videos, *, batch_size=16):
        v = np.concatenate([np.repeat(videos[:, :1], TF, 1), videos[:, 1:]], 1)  # (N, 4t, H, W, 3)
        n, ft, h, w, _ = v.shape
        z = v.reshape(n, ft // TF, TF, h // S, S, w // S, S, 3).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        return z.reshape(n, ft // TF, h // S, w // S, -1).astype(np.float32) / 127.5 - 1.0  # (N, t, h, w, 192)

    def encode_frames(self, videos, *, batch_size=16):
        keys = videos[:, ::TF]  # key frames 0, 4, 8
        return self.encode(np.concatenate([keys[:, :1], np.repeat(keys[:, 1:], TF, 1)], 1))

    def decode(self, latents, *, batch_size=16):
        n, t, h, w, _ = latents.shape
        v = latents.reshape(n, t, h, w, TF, S, S, 3).transpose(0, 1, 4, 2, 5, 3, 6, 7)  # (N, t, 4, h, S, w, S, 3)
        v = v.reshape(n, t * TF, h * S, w * S, 3)
        v = np.round((v[:, TF - 1:] + 1.0) * 127.5 / 8) * 8  # group 0 holds frame 0 only
        return np.clip(v, 0, 255).astype(np.uint8)

    def __call__(self, captions, key, *, batch_size=16, given=None, given_mask=None, **kwargs):
        real = self.real[:len(captions)]
        if given is None:
            return real
        return self.decode(np.where(given_mask[..., None], given, self.encode(real)))


def _experiment(tasks: dict):
    c = demo.get_config("runlocal")  # 9 frames of 32x32, patch (1, 2, 2), demo VAE: latents (3, 8, 8)
    c.eval.num_clips, c.eval.fvd, c.sample.num_samples = 3, False, 1
    exp = to_experiment(c)
    return dataclasses.replace(exp, dit=dataclasses.replace(exp.dit, tasks=tasks))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = _experiment({}).data
    spec = SyntheticSpec(num_frames=d.num_frames, height=d.height, width=d.width, heldout_fraction=d.heldout_fraction,
                         size_range=tuple(d.sprite_size), speed_range=tuple(d.speed_range))
    out = str(tmp_path_factory.mktemp("synth") / "data")
    write_synthetic_dataset(out, spec, 0, 2, 3, 1)
    return out


def test_evaluate_tasks_end_to_end_with_a_fake_generator(data_dir, tmp_path):
    exp = _experiment({name: 1.0 for name in task_eval.TASK_METRICS} | {"suffix": 0.0})
    real, _, _ = evaluate.load_eval_clips(exp, data_dir, 3)
    out = str(tmp_path / "tasks")
    m = task_eval.evaluate_tasks(exp, FakeGenerator(real), data_dir=data_dir, out_dir=out)
    assert {k.split("/")[0] for k in m} == {"t2v", "i2v", "flf2v", "keyframes", "extension", "inpaint", "outpaint"}
    assert m["t2v/all_acc"] == 1.0 and m["i2v/colour_shape_acc"] == 1.0 and m["i2v/direction_acc"] == 1.0
    assert 30 < m["i2v/first_frame_psnr_ceiling"] < PSNR_CAP and m["i2v/first_frame_psnr_gap"] == 0.0
    assert m["flf2v/key_frame_psnr_gap"] == 0.0 and m["keyframes/centroid_err_px"] < 0.5
    assert m["extension/speed_err_px"] < 0.3 and m["extension/direction_acc"] == 1.0
    assert m["inpaint/outside_psnr_gap"] == 0.0 and m["outpaint/inside_psnr_gap"] == 0.0
    assert m["inpaint/inside_acc"] == 0.0  # the fake keeps the real sprite: the prompt's colour + shape are absent
    card = open(os.path.join(out, task_eval.CARD)).read()
    assert "| i2v | colour_shape_acc | 1 | >= 95% | MET |" in card
    assert "| inpaint | inside_acc | 0 | >= 85% | NOT MET |" in card
    saved = json.load(open(os.path.join(out, task_eval.METRICS_JSON)))
    assert saved["metrics"] == m and saved["goals"]["inpaint/inside_acc"]["status"] == "NOT MET"
    for png in [task_eval.PLOT] + [f"grid_{n}.png" for n in ("i2v", "extension", "inpaint", "t2v")]:
        assert open(os.path.join(out, png), "rb").read(4) == b"\x89PNG"


def test_klingjax_eval_tasks_flag_runs_the_task_eval_of_a_checkpoint(data_dir, tmp_path, monkeypatch):
    exp = _experiment({"t2v": 1.0, "i2v": 1.0})
    real, _, _ = evaluate.load_eval_clips(exp, data_dir, 3)
    monkeypatch.setattr("klingjax.eval.generate.load_workdir_generator", lambda workdir: (exp, FakeGenerator(real)))
    out = tmp_path / "out"
    result = cli.main(["--checkpoint", "wd", "--dataset", data_dir, "--out", str(out), "--tasks", "--limit", "2"])
    assert sorted({k.split("/")[0] for k in result["metrics"]}) == ["i2v", "t2v"]
    result = cli.main(["--checkpoint", "wd", "--dataset", data_dir, "--out", str(out), "--tasks", "i2v"])
    assert {k.split("/")[0] for k in result["metrics"]} == {"i2v"} and os.path.exists(result["card"])
    with pytest.raises(SystemExit):
        cli.main(["--generated", str(out), "--out", str(out), "--tasks"])


def test_in_loop_eval_adds_the_task_card_when_the_model_has_tasks(data_dir, tmp_path):
    exp = _experiment({"t2v": 1.0, "i2v": 1.0})
    real, _, _ = evaluate.load_eval_clips(exp, data_dir, 3)
    got = evaluate.evaluate(exp, FakeGenerator(real), data_dir=data_dir, out_dir=str(tmp_path))
    assert got["adherence_all_acc"] == 1.0 and got["i2v/first_frame_psnr_gap"] == 0.0
    report = open(tmp_path / "report.md").read()
    assert "Task evaluation" in report and "| i2v | first_frame_psnr_gap | 0 |" in report
    assert os.path.exists(tmp_path / "eval" / "tasks" / task_eval.CARD)


class _HashTextEncoder:
    """Texts -> fixed pseudo-random hidden states (B, L, 16), one token per word (as test_generate.py's)."""

    dim = 16

    def encode(self, texts, max_len):
        hidden, mask = np.zeros((len(texts), max_len, self.dim), np.float32), np.zeros((len(texts), max_len), bool)
        for i, text in enumerate(texts):
            for j, word in enumerate(text.split()[:max_len]):
                hidden[i, j] = np.random.default_rng(list(word.encode())).standard_normal(self.dim)
                mask[i, j] = True
        return hidden, mask


@pytest.mark.slow
def test_evaluate_tasks_drives_the_real_generator(data_dir, tmp_path):
    """The driver against `VideoGenerator` itself (random demo-sized models, masked video on, 2 sampling steps)."""
    from flax import nnx

    from klingjax import layout
    from klingjax.config import SampleConfig
    from klingjax.eval.generate import VideoGenerator
    from klingjax.models.conditions import MaskedVideo
    from klingjax.models.dit import WanDiT
    from klingjax.models.vae import CausalVAE

    exp = _experiment({"i2v": 1.0, "inpaint": 1.0})
    exp = dataclasses.replace(exp, eval=dataclasses.replace(exp.eval, batch_size=2))
    cfg = layout.dit_model_config(exp, _HashTextEncoder.dim)
    cfg = dataclasses.replace(cfg, conditions=dataclasses.replace(cfg.conditions,
                                                                   masked_video=MaskedVideo.PER_TOKEN_TIMESTEPS))
    latent = layout.latent_grid(exp)  # (3, 8, 8, 8)
    gen = VideoGenerator(dit=WanDiT(cfg, rngs=nnx.Rngs(0)), vae=CausalVAE(layout.vae_config(exp), rngs=nnx.Rngs(1)),
                         text_encoder=_HashTextEncoder(), latent_shape=latent,
                         latent_mean=np.zeros(latent[-1], np.float32), latent_std=np.ones(latent[-1], np.float32),
                         sample=SampleConfig(num_steps=2, cfg_scale=2.0), text_max_len=12, shift=3.0)
    m = task_eval.evaluate_tasks(exp, gen, data_dir=data_dir, out_dir=str(tmp_path), num_clips=2)
    assert {k.split("/")[0] for k in m} == {"i2v", "inpaint"} and all(np.isfinite(v) for v in m.values())
    assert m["i2v/first_frame_psnr_gap"] == 0.0  # latent frame 0 is kept exact and a causal decoder reads it alone
    assert os.path.exists(tmp_path / task_eval.CARD)
