"""LoRA export (klingjax.export.lora_map): the PEFT key map, scales folded into lora_B, the written file, and
(torch marker) parity of a tiny WanDiT + LoRA with diffusers' WanTransformer3DModel after `pipe.load_lora_weights`."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from klingjax.export import dit_map, lora_map
from klingjax.export.param_map import to_torch
from klingjax.export.safetensors_io import SafetensorsFolder
from klingjax.models.dit import dit_config
from klingjax.models.layers.lora import DEFAULT_TARGETS, LoRAConfig

RANK, ALPHA = 4, 8.0
TARGETS = (*DEFAULT_TARGETS, "condition_embedder/time_proj")  # stacked block layers and one unstacked layer
TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=24)


def tiny_cfg(**lora):
    return dit_config("XS", **TINY, lora=LoRAConfig(**{"rank": RANK, "alpha": ALPHA, "targets": TARGETS, **lora}))


def tiny_model(cfg, seed=0):
    """A concrete tiny WanDiT with random params (no init run: eager init costs ~10 s): kernels and LoRA factors
    N(0, 1/fan_in) (lora_b non-zero), norm scales 1 + 0.1 N(0, 1), everything else 0.1 N(0, 1); outputs stay O(1)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(dit_map.abstract_dit(cfg))
    for path, var in nnx.to_flat_state(state):
        x = rng.standard_normal(var.shape)
        if path[-1] in ("kernel", "lora_a", "lora_b"):
            x = x / np.sqrt(var.shape[-2])
        else:
            x = 0.1 * x + (path[-1] == "scale")
        var.set_value(jnp.asarray(x, var.dtype))
    return nnx.merge(graphdef, state)


def test_entries_cover_every_lora_leaf_once():
    cfg = dit_config("XS", num_layers=2, in_channels=4, out_channels=4, lora=LoRAConfig(rank=RANK, alpha=ALPHA))
    entries = lora_map.lora_entries(cfg)
    names = [e.name for e in entries]
    assert len(set(names)) == len(names)
    leaves = {tuple(str(p) for p in path): v.shape
              for path, v in nnx.to_flat_state(nnx.state(dit_map.abstract_dit(cfg), nnx.LoRAParam))}
    want = sorted((path, i) for path, shape in leaves.items() for i in range(shape[0]))  # all stacked (blocks)
    assert sorted((e.path, e.layer) for e in entries) == want
    # 2 attentions x 4 projections + 2 FFN layers, per block, A and B each
    assert len(entries) == 2 * cfg.num_layers * (2 * 4 + 2)
    by_name = {e.name: e for e in entries}
    d, f = cfg.dim, cfg.ffn_dim
    expected = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": ((RANK, d), 1.0),
        "transformer.blocks.1.attn1.to_q.lora_B.weight": ((d, RANK), ALPHA / RANK),
        "transformer.blocks.1.attn2.to_out.0.lora_A.weight": ((RANK, d), 1.0),
        "transformer.blocks.0.attn2.to_k.lora_B.weight": ((d, RANK), ALPHA / RANK),
        "transformer.blocks.0.ffn.net.0.proj.lora_A.weight": ((RANK, d), 1.0),
        "transformer.blocks.0.ffn.net.0.proj.lora_B.weight": ((f, RANK), ALPHA / RANK),
        "transformer.blocks.1.ffn.net.2.lora_A.weight": ((RANK, f), 1.0),
        "transformer.blocks.1.ffn.net.2.lora_B.weight": ((d, RANK), ALPHA / RANK),
    }
    for name, (shape, scale) in expected.items():
        assert (by_name[name].torch_shape, by_name[name].scale) == (shape, scale), name
    # Every module name is a base kernel's export name (the same table as the transformer's weights).
    kernels = {e.name for e in dit_map.dit_entries(dataclasses.replace(cfg, lora=None))}
    assert all(f"{e.module}.weight" in kernels and e.name.startswith(f"transformer.{e.module}.lora_") for e in entries)

    with pytest.raises(ValueError, match="no LoRA"):
        lora_map.lora_entries(dataclasses.replace(cfg, lora=None))


def test_state_dict_folds_scale_into_b_and_writes_the_file(tmp_path):
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    sd = lora_map.lora_from_model(model)
    assert len(sd) == len(lora_map.lora_entries(cfg)) == 2 * (cfg.num_layers * 10 + 1)
    a, b = model.blocks.attn1.to_q.lora_a[...], model.blocks.attn1.to_q.lora_b[...]
    np.testing.assert_array_equal(sd["transformer.blocks.1.attn1.to_q.lora_A.weight"], np.asarray(a[1]).T)
    np.testing.assert_array_equal(sd["transformer.blocks.1.attn1.to_q.lora_B.weight"], np.asarray(b[1]).T * 2.0)
    tp = model.condition_embedder.time_proj
    np.testing.assert_array_equal(sd["transformer.condition_embedder.time_proj.lora_B.weight"],
                                  np.asarray(tp.lora_b[...]).T * 2.0)
    # B @ A (torch) is the klingjax delta (a @ b * scale).T of every adapted layer.
    modules = {(e.path[:-1], e.layer): e.module for e in lora_map.lora_entries(cfg)}
    for path, layer in lora_map._lora_layers(model):
        delta = np.asarray(layer.lora_a[...]) @ np.asarray(layer.lora_b[...]) * layer.lora_scale
        for i in range(delta.shape[0]) if delta.ndim == 3 else (None,):
            module = modules.pop((path, i))
            got = sd[f"transformer.{module}.lora_B.weight"] @ sd[f"transformer.{module}.lora_A.weight"]
            np.testing.assert_allclose(got, to_torch(delta if i is None else delta[i], lora_map.Layout.LINEAR),
                                       rtol=1e-5, atol=1e-6)
    assert not modules  # every adapted layer of the model is an entry

    read = lora_map.model_reader(model)
    assert lora_map.lora_state_dict(cfg, read).keys() == sd.keys()
    summary = lora_map.write_lora(str(tmp_path / "lora"), cfg, read)
    assert summary["tensors"] == len(sd)
    assert sorted(os.listdir(tmp_path / "lora")) == ["lora_config.json", "pytorch_lora_weights.safetensors"]
    written = SafetensorsFolder(str(tmp_path / "lora"), "pytorch_lora_weights")
    assert set(written.keys()) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(np.asarray(written.get(k)), v)
    with open(tmp_path / "lora" / "lora_config.json") as f:
        config = json.load(f)
    assert (config["rank"], config["alpha"], config["targets"]) == (RANK, ALPHA, list(TARGETS))
    assert len(config["target_modules"]) == len(sd) // 2 and "blocks.0.attn1.to_out.0" in config["target_modules"]

    lora_map.write_lora(str(tmp_path / "bf16"), cfg, read, dtype=ml_dtypes.bfloat16)
    bf16 = SafetensorsFolder(str(tmp_path / "bf16"), "pytorch_lora_weights")
    k = "transformer.blocks.0.ffn.net.2.lora_B.weight"
    got = np.asarray(bf16.get(k))
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, sd[k].astype(ml_dtypes.bfloat16))


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers + PEFT (torch marker)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_diffusers_load_lora_weights_matches_klingjax(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from klingjax.models.conditions import Conditions

    cfg = tiny_cfg()
    model = tiny_model(cfg)
    base_cfg = dataclasses.replace(cfg, lora=None)
    params = dit_map.flat_params(model)
    base_sd = {e.name: torch.tensor(to_torch(params[e.path] if e.layer is None else params[e.path][e.layer], e.layout))
               for e in dit_map.dit_entries(base_cfg)}
    kw = {k: v for k, v in dit_map.dit_to_diffusers_config(base_cfg).items() if not k.startswith("_")}

    def transformer():
        ref = diffusers.WanTransformer3DModel(**kw)
        ref.load_state_dict(base_sd, strict=True)
        return ref.eval()

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 3, 8, 4, 4)).astype(np.float32)
    t, text = np.array([50.0, 900.0], np.float32), rng.standard_normal((2, 6, cfg.text_dim)).astype(np.float32)

    def run(ref):
        with torch.no_grad():
            return ref(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(t), torch.from_numpy(text),
                       return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()

    # The module names are diffusers' own Linear layers.
    ref = transformer()
    modules = dict(ref.named_modules())
    entries = lora_map.lora_entries(cfg)
    assert all(isinstance(modules.get(e.module), torch.nn.Linear) for e in entries)
    base_out = run(ref)

    # What a user does: pipe.load_lora_weights(folder) on the pipeline holding the exported transformer.
    folder = str(tmp_path / "lora")
    lora_map.write_lora(folder, cfg, lora_map.model_reader(model))
    assert set(diffusers.WanPipeline.lora_state_dict(folder)) == {e.name for e in entries}  # no key conversion
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(folder)
    from peft.tuners.lora import LoraLayer

    adapted = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {e.module for e in entries}
    want = run(pipe.transformer)

    with jax.default_matmul_precision("highest"):
        got = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(latents), jnp.asarray(t),
                                                      Conditions(jnp.asarray(text))))
    diff, lora_effect = float(np.abs(got - want).max()), float(np.abs(want - base_out).max())
    print(f"DiT + LoRA max abs diff {diff:.2e} (LoRA changes the output by up to {lora_effect:.2e})")
    assert diff <= 1e-4
    assert lora_effect > 1e-2  # the LoRA really applied

    # The transformer-level loader with the in-memory state dict gives the same model.
    ref2 = transformer()
    ref2.load_lora_adapter({k: torch.from_numpy(v) for k, v in lora_map.lora_from_model(model).items()},
                           prefix="transformer")
    np.testing.assert_allclose(run(ref2), want, rtol=0, atol=1e-6)
