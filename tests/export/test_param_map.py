"""Parameter maps: every klingjax param maps exactly once onto diffusers' exact state-dict names and shapes
(recorded from diffusers 0.42.1 in diffusers_state_dict_shapes.json), layouts invert, configs translate."""

import dataclasses
import json
import os

import numpy as np
import pytest

from klingjax.export import dit_map, vae_map
from klingjax.export.param_map import Layout, Rule, expand, from_torch, param_shapes, to_torch, torch_shape
from klingjax.models.dit import AttentionLayout, TextAttention, dit_config
from klingjax.models.vae import VAE_VARIANTS

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "diffusers_state_dict_shapes.json")))
DIT = dit_config("XS", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=24)
# Attention in the encoder's down blocks too, 2D and 3D downsampling: every VAE rule is exercised.
VAE = dataclasses.replace(VAE_VARIANTS["tiny"], attn_scales=(1.0,), num_res_blocks=2,
                          temporal_downsample=(False, True, True), dim_mult=(1, 2, 2, 2))


@pytest.mark.parametrize("which", ["dit", "vae"])
def test_map_covers_every_param_once_with_diffusers_names_and_shapes(which):
    if which == "dit":
        entries, shapes, golden = dit_map.dit_entries(DIT), param_shapes(dit_map.abstract_dit(DIT)), \
            GOLDEN["WanTransformer3DModel"]
    else:
        entries, shapes, golden = vae_map.vae_entries(VAE), param_shapes(vae_map.abstract_vae(VAE)), \
            GOLDEN["AutoencoderKLWan"]
    # Each klingjax param (each layer of a stacked one) appears exactly once ...
    covered = [(e.path, e.layer) for e in entries]
    expected = [(p, i) for p, s in shapes.items() for i in ((None,) if p[0] != "blocks" else range(s[0]))]
    assert sorted(covered, key=str) == sorted(expected, key=str)
    # ... and the tensors are exactly diffusers' state dict.
    assert {e.name: list(e.torch_shape) for e in entries} == golden
    assert sum(e.size for e in entries) == sum(np.prod(s) for s in shapes.values())


def test_layouts_invert_and_move_axes():
    rng = np.random.default_rng(0)
    cases = {Layout.SAME: (3, 4), Layout.LINEAR: (3, 5), Layout.CONV2D: (3, 3, 4, 5), Layout.CONV3D: (3, 1, 1, 4, 5),
             Layout.GAMMA_2D: (6,), Layout.GAMMA_3D: (6,)}
    for layout, shape in cases.items():
        x = rng.standard_normal(shape).astype(np.float32)
        w = to_torch(x, layout)
        assert w.shape == torch_shape(shape, layout) and w.flags.c_contiguous
        np.testing.assert_array_equal(from_torch(w, layout), x)
    k = rng.standard_normal((3, 2, 2, 4, 5))  # (kt, kh, kw, Cin, Cout)
    assert to_torch(k, Layout.CONV3D)[4, 3, 2, 1, 0] == k[2, 1, 0, 3, 4]  # torch (Cout, Cin, kt, kh, kw)
    assert torch_shape((7,), Layout.GAMMA_3D) == (7, 1, 1, 1)
    with pytest.raises(ValueError, match="rank-2"):
        torch_shape((3, 3, 3), Layout.LINEAR)


def test_expand_rejects_unmapped_and_colliding_params():
    shapes = {("a", "kernel"): (2, 3), ("b", "kernel"): (2, 3)}
    with pytest.raises(ValueError, match="no export rule matches parameter 'b.kernel'"):
        expand([Rule(r"a\.kernel", "a.weight", Layout.LINEAR)], shapes)
    with pytest.raises(ValueError, match="produced twice"):
        expand([Rule(r".*", "same.weight")], shapes)


def test_configs_translate_both_ways():
    back = dit_map.dit_from_diffusers_config(dit_map.dit_to_diffusers_config(DIT))
    assert back == dataclasses.replace(DIT, scan_layers=back.scan_layers)
    cfg, mean, std = vae_map.vae_from_diffusers_config(vae_map.vae_to_diffusers_config(VAE, np.arange(4), np.ones(4)))
    assert cfg == VAE and mean.tolist() == [0, 1, 2, 3] and std.tolist() == [1] * 4
    wan = vae_map.vae_to_diffusers_config(VAE_VARIANTS["wan2.1"])
    assert (wan["scale_factor_spatial"], wan["scale_factor_temporal"]) == (8, 4)


@pytest.mark.parametrize("change, match", [
    (lambda: dit_map.dit_to_diffusers_config(dataclasses.replace(DIT, qk_norm=False)), "QK RMSNorm"),
    (lambda: dit_map.dit_to_diffusers_config(dataclasses.replace(DIT, rope_theta=5e5)), "theta"),
    (lambda: dit_map.dit_to_diffusers_config(dataclasses.replace(DIT, attention_layout=AttentionLayout.FACTORIZED)),
     "attention_layout=factorized"),
    (lambda: dit_map.dit_to_diffusers_config(dataclasses.replace(DIT, text_attention=TextAttention.JOINT)),
     "text_attention=joint"),
    (lambda: dit_map.dit_from_diffusers_config({"image_dim": 1280}), "image-conditioned"),
    (lambda: vae_map.vae_to_diffusers_config(dataclasses.replace(VAE, temporal_downsample=(True,) * 3)), "chunks of 4"),
    (lambda: vae_map.vae_from_diffusers_config({"is_residual": True}), "Wan 2.1 VAE layout"),
    (lambda: vae_map.vae_from_diffusers_config({"_class_name": "AutoencoderKL"}), "expected a AutoencoderKLWan"),
])
def test_unsupported_configs_raise_clear_errors(change, match):
    with pytest.raises(dit_map.UnsupportedConfigError, match=match):
        change()
