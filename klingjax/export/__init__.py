"""Export to and import from PyTorch/diffusers.

param_map.py        declarative map machinery: Rule (regex -> diffusers name + Layout), Entry, expand
dit_map.py          WanDiT <-> WanTransformer3DModel rules, config translation, masked-video (I2V) layouts
vae_map.py          CausalVAE <-> AutoencoderKLWan rules and config translation
safetensors_io.py   streaming sharded safetensors writer (+ index json) and lazy reader
checkpoint_source.py  find the train loop's Orbax checkpoints; read them one array / one layer at a time
export.py           `klingjax-export` (workdir or stage checkpoint -> diffusers folder, temp dir + rename)
importer.py         `klingjax-import` (diffusers folder -> klingjax workdir) and `restore_params` (init_from)
verify.py           torch-side parity checks (`--verify`) and `use_klingjax_schedule(pipe)`
"""
