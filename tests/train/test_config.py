"""Config validation: bad configs fail before compiling, naming the key."""

import os
import subprocess
import sys
import time

import helpers
import pytest

from experiments import demo
from klingjax.config import ConfigError, ExperimentConfig, to_experiment
from klingjax.diffusion.samplers import Sampler

REPO = str(helpers.REPO)


def test_demo_configs_validate():
    for arg in (None, "runlocal"):
        exp = to_experiment(demo.get_config(arg))
        assert isinstance(exp, ExperimentConfig) and exp.sample.sampler is Sampler.EULER
    assert to_experiment(demo.get_config("runlocal")).data.num_train < to_experiment(demo.get_config()).data.num_train


def test_unknown_key_names_the_key():
    c = demo.get_config("runlocal").to_dict()
    c["dit"]["optim"]["lrr"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown config key 'dit\.optim\.lrr'"):
        to_experiment(c)


@pytest.mark.parametrize(
    "path, value, pattern",
    [
        (("sample", "sampler"), "rk45", r"'sample\.sampler'.*not one of"),
        (("data", "num_frames"), 16, r"'data\.num_frames'.*1 \+ 4k"),
        (("vae", "batch_size"), 0, r"'vae\.batch_size'"),
        (("dit", "steps"), "many", r"'dit\.steps': expected int"),
        (("stages",), ["data", "train"], r"'stages'.*unknown stage"),
        (("vae", "loss", "mse_weight"), -1.0, r"'vae\.loss\.mse_weight': must be >= 0"),
        (("vae", "loss", "lpips_weight"), -0.1, r"'vae\.loss\.lpips_weight': must be >= 0"),
        (("vae", "disc", "weight"), -1.0, r"'vae\.disc\.weight': must be >= 0"),
        (("vae", "disc", "start"), -5, r"'vae\.disc\.start': must be >= 0"),
        (("vae", "loss", "lpips_net"), "squeeze", r"'vae\.loss\.lpips_net'.*not one of \['alex', 'vgg'\]"),
        (("vae", "loss", "lpips_frames"), 10, r"'vae\.loss\.lpips_frames': 10 is more than the 9 frames"),
        (("vae", "disc", "layers"), 0, r"'vae\.disc\.layers': must be >= 1"),
        # The loss and discriminator keys exist only on the vae stage (typed per-stage configs).
        (("dit", "loss"), {"lpips_weight": 0.1}, r"unknown config key 'dit\.loss'"),
        (("dit", "disc"), {"weight": 0.5}, r"unknown config key 'dit\.disc'"),
        (("vae", "caption_dropout"), 0.2, r"unknown config key 'vae\.caption_dropout'"),
        (("dit", "model_overrides"), {"num_layer": 2}, r"unknown config key 'dit\.model_overrides\.num_layer'"),
        (("dit", "model_overrides"), {"num_layers": "2"}, r"'dit\.model_overrides\.num_layers': expected int"),
        (("vae", "model_overrides"), {"z_dims": 4}, r"unknown config key 'vae\.model_overrides\.z_dims'"),
        (("vae", "variant"), "huge", r"'vae\.variant': unknown 'huge'"),
    ],
)
def test_bad_values_name_the_key(path, value, pattern):
    c = demo.get_config("runlocal").to_dict()
    node = c
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=pattern):
        to_experiment(c)


def test_vae_loss_keys_validate_and_must_fit_the_clips():
    from klingjax.models.lpips import LPIPSNet

    c = demo.get_config("runlocal")
    c.vae.loss.lpips_weight, c.vae.loss.lpips_net, c.vae.disc.weight, c.vae.disc.start = 0.1, "vgg", 0.5, 100
    exp = to_experiment(c)
    assert exp.vae.loss.lpips_net is LPIPSNet.VGG and exp.vae.disc.start == 100 and not hasattr(exp.dit, "disc")
    c.vae.loss.lpips_net = "alex"
    c.data.height = c.data.width = 24  # AlexNet's pooling stack needs >= 31 px
    with pytest.raises(ConfigError, match=r"'vae\.loss\.lpips_net': alex LPIPS needs frames of at least 31px"):
        to_experiment(c)
    c.vae.loss.lpips_weight = 0.0
    c.vae.disc.layers = 3  # 24 -> 12 -> 6 -> 3 -> 2 -> 1: fits; a 4th strided layer leaves nothing
    to_experiment(c)
    c.vae.disc.layers = 4
    with pytest.raises(ConfigError, match=r"'vae\.disc\.layers': 4 strided layers leave no patch"):
        to_experiment(c)


def test_unknown_key_on_command_line_fails_fast_naming_it(tmp_path):
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "klingjax.main", "--config", "experiments/demo.py:runlocal",
         "--workdir", str(tmp_path), "--config.vae.stepz=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "stepz" in proc.stderr
    assert not os.listdir(tmp_path)  # failed before any work
    assert time.time() - t0 < 60


def test_bad_variant_argument():
    with pytest.raises(ValueError, match="unknown arg"):
        demo.get_config("huge")


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"dit.trainable.mode": "lora"}, r"'dit\.trainable\.mode': lora fine-tunes a trained model: set 'dit\.init"),
        ({"dit.trainable.mode": "adapter"}, r"'dit\.trainable\.mode'.*not one of \['full', 'subset', 'lora'\]"),
        ({"dit.trainable.mode": "subset", "dit.init_from": "/b"}, r"'dit\.trainable\.params': mode subset needs"),
        ({"dit.trainable.params": ("attn",)}, r"'dit\.trainable\.params': only read with mode subset or lora"),
        ({"vae.trainable.mode": "lora", "vae.init_from": "/b"}, r"'vae\.trainable\.mode': LoRA is available for the "
                                                                r"DiT stage only"),
        ({"dit.trainable.mode": "lora", "dit.init_from": "/b", "dit.trainable.lora_rank": 0},
         r"'dit\.trainable\.lora_rank': must be >= 1"),
        ({"dit.trainable.mode": "lora", "dit.init_from": "/b", "dit.trainable.lora_targets": ("attn1/(",)},
         r"'dit\.trainable\.lora_targets': 'attn1/\(' is not a regular expression"),
        ({"dit.trainable.mode": "lora", "dit.init_from": "/b", "dit.trainable.frozen_dtype": "int8"},
         r"'dit\.trainable\.frozen_dtype': 'int8' is not one of"),
        ({"dit.model_overrides": {"lora": {"rank": 4}}}, r"'dit\.model_overrides\.lora': set by the stage"),
        ({"data.extra_colours": {"pink": (300, 0, 0)}}, r"'data\.extra_colours\.pink': expected \(r, g, b\)"),
        ({"vae.from_workdir": "/base"}, r"'vae\.from_workdir'.*'stages' must not list 'vae'"),
        ({"data.p_camera_move": 1.5}, r"'data\.p_camera_move': a probability in \[0, 1\]"),
        ({"data.camera_moves": ("dolly_in",)}, r"'data\.camera_moves': unknown moves \['dolly_in'\]"),
        ({"dit.model_overrides": {"conditions": {"camera": "everywhere"}}},
         r"'dit\.model_overrides'.*conditions\.camera: 'everywhere' is not one of"),
    ],
)
def test_fine_tune_keys_name_the_key(changes, pattern):
    c = demo.get_config("runlocal").to_dict()
    for path, value in changes.items():
        node = c
        *parents, leaf = path.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
    with pytest.raises(ConfigError, match=pattern):
        to_experiment(c)


def test_lora_recipe_validates():
    from experiments import lora_recipe

    exp = to_experiment(lora_recipe.get_config("/base,runlocal"))
    assert exp.dit.trainable.mode.value == "lora" and exp.dit.init_from == "/base/dit"
    assert exp.vae.from_workdir == "/base" and "vae" not in exp.stages
    with pytest.raises(ValueError, match="needs the base work dir"):
        lora_recipe.get_config("")


@pytest.mark.parametrize("mode", ["all_blocks", "first_blocks", "text"])
def test_camera_experiment_validates(mode):
    from experiments import camera

    exp = to_experiment(camera.get_config(f"{mode},vae=/base,runlocal"))
    assert exp.data.p_camera_move > 0 and exp.data.camera_words == (mode == "text")
    assert exp.dit.model_overrides.get("conditions", {}).get("camera", "off") == ("off" if mode == "text" else mode)
    assert exp.vae.from_workdir == "/base" and "vae" not in exp.stages
    assert "vae" in to_experiment(camera.get_config(mode)).stages
    with pytest.raises(ValueError, match="MODE in"):
        camera.get_config("sideways")
