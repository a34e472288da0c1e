"""klingjax-export / klingjax-import on fake trained workdirs: layout, values, round trip, errors, atomic writes,
bounded memory. No torch needed: the files are checked with the reference `safetensors` reader."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from export_fixtures import TEXT_DIM, make_workdir, random_state
from flax import nnx
from safetensors.numpy import load_file

from klingjax import layout
from klingjax.export import dit_map, export
from klingjax.export.checkpoint_source import ArchitectureError
from klingjax.export.export import export_checkpoint
from klingjax.export.importer import import_diffusers
from klingjax.export.safetensors_io import SafetensorsFolder
from klingjax.layout import load_workdir_config
from klingjax.models.dit import WanDiT, dit_config
from klingjax.train.checkpoint import restore_params


def _leaf(state, *path):
    node = state
    for p in path:
        node = node[p]
    return np.asarray(node.get_value() if isinstance(node, nnx.Variable) else node)


def test_exported_folder_is_a_wan_pipeline_with_the_checkpoint_values(fake_workdir, tmp_path):
    workdir, saved = fake_workdir
    out = tmp_path / "out"
    summary = export_checkpoint(workdir, str(out), ema=True)
    assert summary["steps"] == {"dit": 6, "vae": 6}
    for name in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                 "vae/config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "klingjax_export.json"):
        assert (out / name).is_file(), name
    assert not any(f.endswith((".bin", ".pt", ".pth")) for _, _, fs in os.walk(out) for f in fs)
    index = json.load(open(out / "model_index.json"))
    assert index["_class_name"] == "WanPipeline" and index["text_encoder"] == ["transformers", "BertModel"]
    exp = load_workdir_config(workdir)
    sched = json.load(open(out / "scheduler/scheduler_config.json"))
    assert sched["shift"] == pytest.approx(layout.train_shift(exp))
    vae_cfg = json.load(open(out / "vae/config.json"))
    stats = json.load(open(os.path.join(workdir, "latents", "latent_stats.json")))
    np.testing.assert_allclose(vae_cfg["latents_mean"], stats["mean"])
    dit = load_file(str(out / "transformer/diffusion_pytorch_model.safetensors"))
    ema = saved["dit"][6]["ema"]
    to_q = _leaf(ema, "blocks", "attn1", "to_q", "kernel")  # (layers, in, out)
    np.testing.assert_array_equal(dit["blocks.1.attn1.to_q.weight"], to_q[1].T)
    np.testing.assert_array_equal(dit["patch_embedding.weight"],
                                  _leaf(ema, "patch_embedding", "kernel").transpose(4, 3, 0, 1, 2))
    vae = load_file(str(out / "vae/diffusion_pytorch_model.safetensors"))
    gamma = _leaf(saved["vae"][6]["ema"], "decoder", "norm_out", "gamma")
    np.testing.assert_array_equal(vae["decoder.norm_out.gamma"], gamma.reshape(-1, 1, 1, 1))


def test_round_trip_klingjax_diffusers_klingjax_is_bit_exact(fake_workdir, tmp_path):
    workdir, saved = fake_workdir
    export_checkpoint(workdir, str(tmp_path / "exported"), step=3)  # raw params; DiT step 3, VAE latest (6)
    result = import_diffusers(str(tmp_path / "exported"), str(tmp_path / "imported"))
    assert result["stages"] == ["dit", "vae"]
    exp = load_workdir_config(workdir)
    for stage, step, model in (("dit", 3, dit_map.abstract_dit(layout.dit_model_config(exp, TEXT_DIM))),
                               ("vae", 6, None)):
        if model is None:
            from klingjax.export.vae_map import abstract_vae

            model = abstract_vae(layout.vae_config(exp))
        got = restore_params(str(tmp_path / "imported" / stage), model)
        want = saved[stage][step]["model"]
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    # The imported workdir restores like a trained one (Trainer state, latent stats, config).
    mean, std = layout.load_latent_stats(str(tmp_path / "imported"))
    np.testing.assert_allclose(mean, json.load(open(os.path.join(workdir, "latents", "latent_stats.json")))["mean"],
                               rtol=1e-6)
    again = tmp_path / "again"
    export_checkpoint(str(tmp_path / "imported"), str(again))
    for sub in ("transformer", "vae"):
        a = (tmp_path / "exported" / sub / "diffusion_pytorch_model.safetensors").read_bytes()
        assert a == (again / sub / "diffusion_pytorch_model.safetensors").read_bytes(), sub


def test_bfloat16_export(fake_workdir, tmp_path):
    workdir, saved = fake_workdir
    export_checkpoint(os.path.join(workdir, "dit", "checkpoints", "6"), str(tmp_path / "bf16"), dtype="bfloat16")
    w = SafetensorsFolder(str(tmp_path / "bf16" / "transformer"), "diffusion_pytorch_model").get("proj_out.weight")
    want = _leaf(saved["dit"][6]["model"], "proj_out", "kernel").T.astype(ml_dtypes.bfloat16)
    assert w.dtype == ml_dtypes.bfloat16 and np.array_equal(w.view(np.uint16), want.view(np.uint16))


def test_bad_inputs_fail_clearly_and_leave_nothing(fake_workdir, tmp_path, capsys):
    workdir, _ = fake_workdir
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_checkpoint(workdir, str(existing))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 4 .* available steps: \[3, 6\]"):
        export_checkpoint(workdir, str(tmp_path / "a"), step=4)
    with pytest.raises(SystemExit) as e:  # the CLI turns these into exit code 2 and one line
        export.main(["--checkpoint", workdir, "--out", str(tmp_path / "b"), "--step", "99"])
    assert e.value.code == 2 and "available steps" in capsys.readouterr().err
    # Another architecture: the workdir's config says a wider DiT than the checkpoint holds.
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    cfg = json.load(open(other / "config.json"))
    cfg["dit"]["model_overrides"]["dim"] = 64
    json.dump(cfg, open(other / "config.json", "w"))
    with pytest.raises(ArchitectureError, match=r"(?s)WanDiT its.*to_k.kernel: checkpoint \(2, 32, 32\), config \(2"):
        export_checkpoint(str(other), str(tmp_path / "c"))
    with pytest.raises(FileExistsError):
        import_diffusers(str(tmp_path), str(existing))
    with pytest.raises(FileNotFoundError, match="neither transformer/ nor vae/"):
        import_diffusers(str(tmp_path), str(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path)) == ["exists", "other"]  # no partial outputs, no temp dirs


def test_failure_mid_export_leaves_no_output(fake_workdir, tmp_path, monkeypatch):
    workdir, _ = fake_workdir
    real = export.write_weights
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:  # the transformer is written, the VAE fails
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "write_weights", failing)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(workdir, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == [] and ".tmp-" in calls[0]  # written in a temp dir, removed on failure


def test_streaming_export_memory_stays_below_two_shards(tmp_path):
    """A DiT checkpoint 16x the shard size (chunked <= 1 MB by Orbax, as a sharded pod checkpoint is)
    exports with peak RSS growth under 2 shards."""
    cfg = dit_config("S", dim=256, ffn_dim=1024, num_heads=4, num_layers=16, in_channels=8, out_channels=8,
                     text_dim=TEXT_DIM)
    state = {"model": random_state(nnx.state(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))), 0)}
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    shard = 4 * 2**20
    assert total >= 10 * shard
    work = make_workdir(str(tmp_path / "w"), steps=(1,))[0]  # small random VAE; the DiT is replaced below
    config = json.load(open(os.path.join(work, "config.json")))
    config["dit"]["model_overrides"] = {"dim": 256, "ffn_dim": 1024, "num_heads": 4, "num_layers": 16}
    json.dump(config, open(os.path.join(work, "config.json"), "w"))
    shutil.rmtree(os.path.join(work, "dit"))
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=2**20), state)
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        os.path.join(work, "dit", "checkpoints", "1", "state"), args=ocp.args.StandardSave(state, save_args=save_args))
    # A fresh process (as the CLI runs), warmed up on the small VAE; then the peak-RSS counter is reset.
    code = (
        "import sys; from klingjax.export.checkpoint_source import limit_malloc_arenas; limit_malloc_arenas()\n"
        "from klingjax.export.export import export_checkpoint\n"
        "def kib(f): return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f)][0]\n"
        "export_checkpoint(sys.argv[1] + '/vae', sys.argv[2] + '/warm')\n"
        "open('/proc/self/clear_refs', 'w').write('5'); before = kib('VmRSS')\n"
        f"export_checkpoint(sys.argv[1] + '/dit', sys.argv[2] + '/big', max_shard_size={shard})\n"
        "print('GROWTH', (kib('VmHWM') - before) * 1024)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, work, str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    growth = int(run.stdout.split("GROWTH")[1])
    files = os.listdir(tmp_path / "big" / "transformer")
    assert len([f for f in files if f.endswith(".safetensors")]) >= 10
    print(f"export of {total / 2**20:.0f} MiB in {shard / 2**20:.0f} MiB shards: peak RSS +{growth / 2**20:.1f} MiB")
    assert growth < 2 * shard, f"peak RSS grew by {growth / 2**20:.1f} MiB for {shard / 2**20:.0f} MiB shards"
