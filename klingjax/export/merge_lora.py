"""`klingjax-merge-lora`: fold a LoRA fine-tune into its base -> a plain work dir (no LoRA, no base pointer).

    klingjax-merge-lora --workdir workdirs/lora_pink --out workdirs/lora_pink_merged [--step 1500]

Reads the fine-tune's DiT (raw params and EMA: the base's frozen params + the trained factors), merges every LoRA
branch into its kernel (kernel += lora_a @ lora_b * alpha / rank, in float32) and writes `--out` as a klingjax-train
work dir: `config.json` (the fine-tune's, with `dit.trainable` back to full, no `init_from`, and the VAE taken from the
fine-tune's VAE work dir), `dit/checkpoints/<step>` (merged params and EMA, a fresh optimizer state, as
`klingjax-import` writes) and `latents/latent_stats.json`. Generation, evaluation, export and `init_from` then read it
like any trained model, at the speed of the base architecture. Written into a temporary sibling folder renamed to
`--out` when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging
from flax import nnx

from klingjax import layout
from klingjax.config import config_from_dataclass, to_experiment
from klingjax.export.checkpoint_source import find_checkpoints
from klingjax.export.export import ParamSource, setup_cli_logging
from klingjax.models.dit import WanDiT
from klingjax.models.layers.lora import merge_lora
from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import get_rules
from klingjax.train.checkpoint import Checkpointer, restore_model
from klingjax.train.optim import make_optimizer
from klingjax.train.state import Trainer

TEXT_KERNEL = ("condition_embedder", "text_embedder", "linear_1", "kernel")


def merge_workdir(workdir: str, out: str, *, step: int | None = None) -> dict:
    """Merge the LoRA DiT of `workdir` into its base and write the work dir `out`; returns a summary."""
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise FileExistsError(f"--out {out} already exists; choose a new folder")
    exp = layout.load_workdir_config(workdir)
    if exp.dit.trainable.mode.value != "lora":
        raise ValueError(f"{workdir} is not a LoRA fine-tune (dit.trainable.mode is {exp.dit.trainable.mode.value})")
    _, (ckpt,) = find_checkpoints(layout.stage_dir(workdir, "dit"), step)
    text_dim = ParamSource(ckpt, "model").shape(TEXT_KERNEL)[0]
    cfg = layout.dit_model_config(exp, text_dim)
    mesh = make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
    rules = get_rules(exp.dit.sharding, "dit")
    models = {}
    for use_ema in (False, True):
        model = restore_model(lambda rngs: WanDiT(cfg, rngs=rngs), ckpt.directory, mesh=mesh, rules=rules,
                              use_ema=use_ema, step=ckpt.step)
        merged = merge_lora(model)
        models[use_ema] = model
    merged_exp = to_experiment(_merged_config(exp, workdir))
    base_cfg = layout.dit_model_config(merged_exp, text_dim)
    plain = {}
    for use_ema, model in models.items():  # the same params in the base architecture (no LoRA attributes)
        target = nnx.eval_shape(lambda: WanDiT(base_cfg, rngs=nnx.Rngs(0)))
        graphdef, _ = nnx.split(target)
        plain[use_ema] = nnx.merge(graphdef, nnx.state(model, nnx.Param))
    tmp = f"{out}.tmp-{os.getpid()}-{int(time.time())}"
    os.makedirs(os.path.join(tmp, "latents"))
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config_from_dataclass(merged_exp).to_json(indent=2))
        shutil.copy(os.path.join(layout.latent_dir(workdir), "latent_stats.json"), os.path.join(tmp, "latents"))
        trainer = Trainer(plain[False], make_optimizer(merged_exp.dit.optim, merged_exp.dit.steps))
        nnx.update(trainer.ema, nnx.state(plain[True], nnx.Param))
        saver = Checkpointer(layout.checkpoint_dir(tmp, "dit"), async_save=False)
        saver.save(ckpt.step, nnx.state(trainer), {}, force=True)
        saver.close()
        summary = {"source": os.path.abspath(workdir), "step": ckpt.step, "merged_layers": len(merged),
                   "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)}}
        with open(os.path.join(tmp, "merged_lora.json"), "w") as f:
            json.dump(summary, f, indent=2)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("merged %d LoRA layers of %s (step %d) -> %s", len(merged), workdir, ckpt.step, out)
    return summary


def _merged_config(exp, workdir: str) -> ml_collections.ConfigDict:
    """The fine-tune's config as a full-training one: no LoRA, no base, the VAE from the fine-tune's VAE work dir."""
    c = config_from_dataclass(exp)
    c.dit.trainable.mode = "full"
    c.dit.trainable.params = ()
    c.dit.init_from = ""
    c.vae.from_workdir = os.path.abspath(layout.vae_workdir(exp, workdir))
    c.stages = tuple(s for s in exp.stages if s != "vae")
    return c


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    parser = argparse.ArgumentParser(prog="klingjax-merge-lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the LoRA fine-tune's klingjax-train work dir")
    parser.add_argument("--out", required=True, help="new work dir to write (must not exist)")
    parser.add_argument("--step", type=int, default=None, help="the fine-tune's checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    setup_cli_logging()
    try:
        summary = merge_workdir(args.workdir, args.out, step=args.step)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"klingjax-merge-lora: error: {e}\n")
    logging.info("%s", json.dumps(summary))


if __name__ == "__main__":
    main()
