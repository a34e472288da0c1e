"""`klingjax-export`: a trained workdir (or one stage's Orbax checkpoint) -> a diffusers folder.

    klingjax-export --checkpoint workdirs/demo --out exports/demo            # whole pipeline
    klingjax-export --checkpoint workdirs/demo/dit --step 1500 --ema --out exports/dit --dtype bfloat16
    klingjax-export --checkpoint workdirs/demo --out exports/demo --max_shard_size 2GB --verify

Writes `transformer/` (WanTransformer3DModel), `vae/` (AutoencoderKLWan, with the DiT's latent normalisation
as `latents_mean`/`latents_std`), `text_encoder/` + `tokenizer/` (the frozen MiniLM as a transformers
BertModel), `scheduler/` (FlowMatchEulerDiscreteScheduler with the sampling shift), `model_index.json`
(WanPipeline; masked-video DiTs: WanImageToVideoPipeline, see dit_map.PIPELINES) and `klingjax_export.json`
(source, step, sampling settings). Safetensors only. Parameters stream one tensor at a time from the checkpoint
into size-limited shards; everything is written into a temporary sibling folder that is renamed to `--out` only
when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging as pylogging
import os
import shutil
import time
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from klingjax.export import dit_map, lora_map, vae_map
from klingjax.export.checkpoint_source import (
    ArchitectureError,
    OrbaxLeaves,
    StageCheckpoint,
    check_architecture,
    find_checkpoints,
    limit_malloc_arenas,
)
from klingjax.export.param_map import Entry, to_torch, torch_axes
from klingjax.export.safetensors_io import ShardedWriter, TensorSpec, parse_size
from klingjax.layout import load_workdir_config
from klingjax.train import trainable

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
WEIGHTS_PREFIX = "diffusion_pytorch_model"  # diffusers' weight file name
TEXT_ENCODER_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MINILM_DIM = 384


def read_entry(leaves: OrbaxLeaves, prefix: str, e: Entry) -> np.ndarray:
    """One tensor (one layer of a stacked leaf), read chunk by chunk straight into torch layout."""
    return leaves.read((prefix, *e.path), e.layer, axes=torch_axes(e.layout)).reshape(e.torch_shape)


def write_weights(leaves: OrbaxLeaves, prefix: str, entries: Sequence[Entry], folder: str, dtype: np.dtype,
                  max_shard_bytes: int, file_prefix: str = WEIGHTS_PREFIX,
                  read: Callable[[Entry], np.ndarray] | None = None) -> int:
    """Stream the `prefix` ("model" or "ema") params of a checkpoint into safetensors shards; returns bytes.

    read: entry -> torch-layout array (default `read_entry`; the DiT's fuses CHANNEL_CONCAT's patch kernels).
    """
    read = read or functools.partial(read_entry, leaves, prefix)
    specs = [TensorSpec(e.name, e.torch_shape, dtype) for e in entries]
    writer = ShardedWriter(folder, file_prefix, specs, max_shard_bytes)
    for e in entries:
        writer.write(e.name, read(e).astype(dtype, copy=False))
    writer.close()
    return sum(s.nbytes for s in specs)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


class ParamSource:
    """Where each DiT param of a stage checkpoint is read: the checkpoint itself, or, for a fine-tune (LoRA / frozen
    subset: `base.json` in its stage dir), the params it did not train from its base (recursively, fingerprint
    checked)."""

    def __init__(self, ckpt: StageCheckpoint, prefix: str):
        self.leaves, self.prefix = OrbaxLeaves(ckpt.state_dir), prefix
        stage_dir = os.path.dirname(ckpt.directory)
        self.info = trainable.read_base(stage_dir)
        self.base = None
        if self.info is not None:
            _, (base,) = find_checkpoints(self.info["checkpoint"], self.info["step"])
            trainable.check_base(self.info, stage_dir, base.state_dir)
            self.base = ParamSource(base, "ema" if self.info["use_ema"] else "model")

    def source(self, path: tuple[str, ...]) -> tuple[OrbaxLeaves, str]:
        if self.info is None or trainable.path_name(path) in self.info["trained"]:
            return self.leaves, self.prefix
        return self.base.source(path)

    def has(self, path: tuple[str, ...]) -> bool:
        leaves, prefix = self.source(path)
        return (prefix, *path) in set(leaves.paths)

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        leaves, prefix = self.source(path)
        return leaves.shape((prefix, *path))

    def read(self, path: tuple[str, ...], layer: int | None = None, axes=None) -> np.ndarray:
        leaves, prefix = self.source(path)
        return leaves.read((prefix, *path), layer, axes=axes)


def _export_dit(exp, ckpt: StageCheckpoint, folder: str, prefix: str, dtype, max_shard_bytes: int, *,
                lora_folder: str, merge_lora: bool = False) -> dict:
    from klingjax.layout import dit_model_config

    src = ParamSource(ckpt, prefix)
    text_key = ("condition_embedder", "text_embedder", "linear_1", "kernel")
    if not src.has(text_key):
        raise ArchitectureError(f"{src.source(text_key)[0].state_dir} is not a WanDiT checkpoint (it has no "
                                f"{'.'.join(text_key)})")
    cfg = dit_model_config(exp, src.shape(text_key)[0])  # text width comes from the text encoder used
    if src.info is None:
        check_architecture(src.leaves, prefix, dit_map.abstract_dit(cfg), "WanDiT")
    base_cfg = dataclasses.replace(cfg, lora=None)  # the transformer's own weights; LoRA factors go to lora_folder
    os.makedirs(folder)
    _write_json(os.path.join(folder, "config.json"), dit_map.dit_to_diffusers_config(base_cfg))
    lora_scale = cfg.lora.scale if cfg.lora is not None else 0.0

    def read(e: Entry) -> np.ndarray:
        if e.path == dit_map.PATCH_KERNEL:
            # The patch kernel (small) is read whole: CHANNEL_CONCAT fuses it with `cond_kernel` (dit_map.patch_rows).
            names = [p for p in (dit_map.PATCH_KERNEL, dit_map.COND_KERNEL) if src.has(p)]
            params = dit_map.to_diffusers_params(base_cfg, {p: src.read(p) for p in names})
            return to_torch(params[dit_map.PATCH_KERNEL], e.layout)
        a_path = (*e.path[:-1], "lora_a")
        if merge_lora and e.path[-1] == "kernel" and trainable.path_name(a_path) in lora_leaves:
            kernel = src.read(e.path, e.layer).astype(np.float32)  # (in, out) in klingjax layout
            a, b = src.read(a_path, e.layer), src.read((*e.path[:-1], "lora_b"), e.layer)
            merged = kernel + (a.astype(np.float64) @ b.astype(np.float64) * lora_scale).astype(np.float32)
            return to_torch(merged, e.layout).reshape(e.torch_shape)
        leaves, pre = src.source(e.path)
        return read_entry(leaves, pre, e)

    lora_leaves = set()
    if cfg.lora is not None:
        lora_leaves = {trainable.path_name(p) for p, _ in
                       nnx.to_flat_state(nnx.state(dit_map.abstract_dit(cfg), nnx.LoRAParam))}
    size = write_weights(None, prefix, dit_map.dit_entries(base_cfg), folder, dtype, max_shard_bytes, read=read)
    out = {"text_dim": cfg.text_dim, "masked_video": cfg.conditions.masked_video.value, "bytes": size}
    if src.info is not None:
        out["base"] = {k: src.info[k] for k in ("checkpoint", "step", "use_ema", "sha256", "mode")}
    if cfg.lora is not None:
        if merge_lora:
            out["lora"] = "merged into the transformer weights"
        else:
            out["lora"] = lora_map.write_lora(lora_folder, cfg, lambda path, layer: src.read(path, layer),
                                              dtype=dtype)
    return out


def _export_vae(exp, workdir: str, ckpt: StageCheckpoint, folder: str, prefix: str, dtype,
                max_shard_bytes: int) -> dict:
    from klingjax.layout import load_latent_stats, vae_config

    leaves = OrbaxLeaves(ckpt.state_dir)
    cfg = vae_config(exp)
    check_architecture(leaves, prefix, vae_map.abstract_vae(cfg), "CausalVAE")
    try:
        mean, std = load_latent_stats(workdir)
    except FileNotFoundError:
        logging.warning("no latent stats in %s (cache stage not run): exporting latents_mean=0, latents_std=1",
                        workdir)
        mean, std = None, None
    os.makedirs(folder)
    _write_json(os.path.join(folder, "config.json"), vae_map.vae_to_diffusers_config(cfg, mean, std))
    size = write_weights(leaves, prefix, vae_map.vae_entries(cfg), folder, dtype, max_shard_bytes)
    return {"bytes": size}


def _export_text_encoder(out: str) -> bool:
    """Copy the frozen MiniLM (already transformers' BertModel format) and its tokenizer; False if unavailable."""
    from klingjax.models.text_encoders import minilm_dir

    try:
        src = minilm_dir()
    except ModuleNotFoundError as e:
        logging.warning("text encoder not exported: %s", e)
        return False
    for sub, files in (("text_encoder", TEXT_ENCODER_FILES), ("tokenizer", TOKENIZER_FILES)):
        os.makedirs(os.path.join(out, sub))
        for name in files:
            shutil.copyfile(os.path.join(src, name), os.path.join(out, sub, name))
    return True


def _sampling_settings(exp) -> dict:
    from klingjax.layout import train_shift

    s = exp.sample
    return {"num_inference_steps": s.num_steps, "guidance_scale": s.cfg_scale, "negative_prompt": s.negative_prompt,
            "sampler": s.sampler.value, "shift": s.shift if s.shift > 0 else train_shift(exp),
            "max_sequence_length": exp.text_max_len}


def _pipeline_files(out: str, exp, has_text_encoder: bool, pipeline: dit_map.Pipeline) -> dict:
    """scheduler/, model_index.json for the DiT's `pipeline` (dit_map.PIPELINES); returns the sampling settings."""
    if pipeline.image_components and exp.sample.visual_cfg_scale != 1.0:
        logging.warning("sample.visual_cfg_scale=%s is not exported: %s has only text guidance (guidance_scale)",
                        exp.sample.visual_cfg_scale, pipeline.class_name)
    sampling = _sampling_settings(exp)
    os.makedirs(os.path.join(out, "scheduler"))
    _write_json(os.path.join(out, "scheduler", "scheduler_config.json"), {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": dit_map.DIFFUSERS_VERSION,
        "num_train_timesteps": 1000, "shift": sampling["shift"], "use_dynamic_shifting": False,
    })
    text = (["transformers", "BertModel"], ["transformers", "BertTokenizerFast"]) if has_text_encoder else (
        [None, None], [None, None])
    index = {
        "_class_name": pipeline.class_name, "_diffusers_version": dit_map.DIFFUSERS_VERSION,
        "boundary_ratio": None, "expand_timesteps": pipeline.expand_timesteps,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": text[0], "tokenizer": text[1],
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if pipeline.image_components:  # no CLIP image encoder: the transformer has image_dim=None (Wan 2.2 style)
        index.update(image_encoder=[None, None], image_processor=[None, None])
    _write_json(os.path.join(out, "model_index.json"), dict(sorted(index.items())))
    return sampling


def export_checkpoint(checkpoint: str, out: str, *, step: int | None = None, ema: bool = False,
                      dtype: str = "float32", max_shard_size: str | int = "5GB", merge_lora: bool = False) -> dict:
    """Export a workdir / stage checkpoint to the diffusers folder `out`; returns a summary dict.

    A LoRA fine-tune writes its base's transformer weights (plus any params it trained in full) to `transformer/`
    and its factors to `lora/pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(out + "/lora")`), or, with
    `merge_lora`, the merged weights to `transformer/` and no LoRA file.
    """
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise FileExistsError(f"--out {out} already exists; choose a new folder (an export never overwrites)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    workdir, ckpts = find_checkpoints(checkpoint, step)
    exp = load_workdir_config(workdir)
    prefix = "ema" if ema else "model"
    stages = {c.stage: c for c in ckpts}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}-{int(time.time())}"
    os.makedirs(tmp)
    t0 = time.time()
    summary = {"source": workdir, "params": prefix, "dtype": dtype, "max_shard_bytes": max_shard_bytes,
               "steps": {s: c.step for s, c in stages.items()}, "components": {}}
    try:
        if "distill" in stages:  # a distilled student (its stage dir given): a trajectory student is a plain Wan DiT
            if exp.distill.method.value != "trajectory":
                raise ValueError(f"{checkpoint}: a {exp.distill.method.value} student has a jump-length embedding "
                                 "diffusers' WanTransformer3DModel lacks; only trajectory students export")
            stages["dit"] = stages.pop("distill")
        if "dit" in stages:
            summary["components"]["transformer"] = _export_dit(
                exp, stages["dit"], os.path.join(tmp, "transformer"), prefix, DTYPES[dtype], max_shard_bytes,
                lora_folder=os.path.join(tmp, "lora"), merge_lora=merge_lora)
        if "vae" in stages:
            summary["components"]["vae"] = _export_vae(
                exp, workdir, stages["vae"], os.path.join(tmp, "vae"), prefix, DTYPES[dtype], max_shard_bytes)
        if len(stages) == 2:
            from klingjax.layout import dit_model_config

            text_dim = summary["components"]["transformer"]["text_dim"]
            pipeline = dit_map.check_pipeline(dit_model_config(exp, text_dim))
            has_text = text_dim == MINILM_DIM and _export_text_encoder(tmp)
            summary["components"]["text_encoder"] = has_text
            summary["sampling"] = _pipeline_files(tmp, exp, has_text, pipeline)
        _write_json(os.path.join(tmp, "klingjax_export.json"), summary)
        os.rename(tmp, out)  # atomic on one filesystem: `out` appears only when complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("exported %s -> %s in %.1fs", workdir, out, time.time() - t0)
    return summary


class QuietLibraries(pylogging.Filter):
    """Drop INFO records from Orbax (several per array); keep warnings and errors."""

    def filter(self, record) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def setup_cli_logging() -> None:
    """INFO logs to stderr through absl's handler, without Orbax's per-file chatter."""
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(QuietLibraries())
    logging.set_verbosity(logging.INFO)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    parser = argparse.ArgumentParser(prog="klingjax-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="workdir, stage dir (<workdir>/dit) or one step's dir")
    parser.add_argument("--out", required=True, help="new folder to write (must not exist)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest; the DiT's step "
                        "when --checkpoint is a workdir)")
    parser.add_argument("--ema", action="store_true", help="export the EMA params instead of the raw params")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    parser.add_argument("--merge_lora", action="store_true", help="a LoRA fine-tune: write the merged weights to "
                        "transformer/ instead of the base's weights + lora/pytorch_lora_weights.safetensors")
    parser.add_argument("--verify", action="store_true", help="run diffusers and klingjax on the same random "
                        "inputs and print the max abs difference per component (needs torch)")
    args = parser.parse_args(argv)
    limit_malloc_arenas()
    setup_cli_logging()
    if args.verify:
        from klingjax.export.verify import require_torch

        require_torch()  # fail before the (possibly long) export
    try:
        summary = export_checkpoint(args.checkpoint, args.out, step=args.step, ema=args.ema, dtype=args.dtype,
                                    max_shard_size=args.max_shard_size, merge_lora=args.merge_lora)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"klingjax-export: error: {e}\n")
    logging.info("components: %s", json.dumps(summary["components"]))
    if args.verify:
        from klingjax.export.verify import format_report, verify_export

        report = verify_export(args.out)
        logging.info("verify (max abs diff, diffusers vs klingjax, same random inputs):\n%s", format_report(report))
        if any(v["max_abs_diff"] > v["tolerance"] for v in report.values()):
            parser.exit(1, "klingjax-export: verification failed\n")


if __name__ == "__main__":
    main()
