"""Generation benchmark: wall time per clip, klingjax `VideoGenerator` versus diffusers `WanPipeline`, same weights.

    python benchmarks/generate.py --workdir W [--steps 25] [--cfg 4.0] [--batch 1] [--repeats 5] [--threads N]
                                  [--student] [--host_malloc tcmalloc|system]
    python benchmarks/generate.py [--dit_variant XS|S] [--vae demo] [--frames 9] [--size 32]   # random init

1. Same CPU, same process, same thread count (torch; XLA's pool uses every schedulable core), same weights, same
   text states, same noise, same step count, guidance scale, latent shape and batch (--batch clips, 1 call).
   Text encoding is EXCLUDED for both, the decode to uint8 frames INCLUDED for both. Why: `WanPipeline` given
   `prompt_embeds` / `negative_prompt_embeds` skips its text encoder, while `VideoGenerator.__call__` runs its
   frozen encoder on the captions and on the negative prompt at every call; timing that on one side only would
   measure the encoder, not generation. So klingjax's encoder is swapped for `PrecomputedText` (states encoded once,
   looked up by caption) and the timed call is still the public `VideoGenerator.__call__`: noise from the key,
   fixed-batch padding, the compiled sampler (CFG with both branches in one batched DiT call, Euler over
   `sampling_timesteps(N, shift)`, `decode_streaming`, uint8), the host transfer. The encoder's own cost per call
   is printed alone (with --workdir).
   diffusers: `WanPipeline` without tokenizer / text encoder; `WanTransformer3DModel` and `AutoencoderKLWan` get
   the klingjax weights through the export maps (dit_map / vae_map + param_map.to_torch, strict loads) and the
   latent stats; the scheduler is the exported one (FlowMatchEulerDiscreteScheduler, klingjax's shift, no dynamic
   shifting) with `verify.use_klingjax_schedule`, so its sigmas are klingjax's grid (the same number of DiT
   evaluations either way); `latents` = klingjax's noise as (B, C, t, h, w); output_type "np", then the same
   uint8 rounding. It runs the two CFG branches as two transformer calls per step: that is WanPipeline's design.
   Interleaved rounds (1 warm-up round after compiling, --repeats timed; medians), with a breakdown: klingjax's
   compiled program alone (no Python around it), its sampling alone (final latents) and decode alone; diffusers
   with output_type "latent". XLA compilations during the timed rounds are counted (0 = no recompilation).
   On a CPU that other processes also load, torch's OpenMP threads degrade ~100x at --threads = cores (XLA's pool
   does not): compare at --threads 1 there (benchmarks/RESULTS.md).
2. Parity at 1 step and at --steps: max abs diff of the uint8 frames and of the final latents. klingjax's DiT masks
   padded text tokens out of cross-attention (`Conditions.text_mask`); `WanTransformer3DModel` has no mask, so it
   gets the states trimmed to the real tokens (the same attention: README "Export to diffusers"). Two differences
   are also measured: klingjax with text_mask None (padding attended: what untrimmed embeddings would do) and
   diffusers' own sigma grid (the scheduler as exported, unpatched: shift(linspace(1, 1/1000, N)) vs klingjax's
   shift(linspace(1, 0, N+1)); `verify.use_klingjax_schedule` patches it, as a few-step student needs).
3. --student: with --workdir `load_generator(exp, workdir, mesh, student=True)`, the distill stage's student with
   its own step count and guidance (1: one DiT evaluation per step); random init: the same DiT at --student_steps
   Euler steps, guidance 1 (what a trajectory student costs); timed in the same rounds by the same
   method; speedup = teacher (--steps, --cfg) / student.

Weights: --workdir loads a trained work dir (`load_generator`: EMA DiT per sample.use_ema, VAE, latent stats, text
encoder; captions below encoded once). Without it: random-init --dit_variant on --vae latents of --frames x --size
x --size clips and random text states (7 real tokens per caption, 2 for the negative prompt, zeros after).

Ends with one `GOAL` line per goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax import layout
from klingjax.config import DataConfig, DiTStageConfig, ExperimentConfig, SampleConfig, VAEStageConfig
from klingjax.diffusion import samplers
from klingjax.diffusion.guidance import guided_velocity
from klingjax.eval.generate import VideoGenerator, load_generator
from klingjax.export import dit_map, vae_map
from klingjax.export.param_map import to_torch
from klingjax.export.verify import use_klingjax_schedule
from klingjax.models.conditions import Conditions
from klingjax.models.dit import WanDiT
from klingjax.models.vae import CausalVAE
from klingjax.sharding.mesh import make_mesh
from klingjax.train import host_memory

CAPTIONS = ("a red circle moves left", "a small blue square drifts up slowly", "a green triangle moves right",
            "a yellow circle moves down")
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT


class PrecomputedText:
    """Stands in for a frozen text encoder: `encode(texts, max_len)` returns states encoded once, per text."""

    def __init__(self, table: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.table = table  # text -> (hidden (L, D), mask (L,))
        self.dim = next(iter(table.values()))[0].shape[-1]

    def encode(self, texts, max_len: int) -> tuple[jax.Array, jax.Array]:
        hidden, mask = zip(*(self.table[t] for t in texts))
        return jnp.asarray(np.stack(hidden)), jnp.asarray(np.stack(mask))  # (B, L, D), (B, L)


class CompileCounter:
    """Counts XLA backend compilations from now on (jax.monitoring)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        self.count += event == BACKEND_COMPILE_EVENT


# ---------------------------------------------------------------------------------------------------------
# klingjax: the generators
# ---------------------------------------------------------------------------------------------------------


def text_table(encoder, texts: list[str], max_len: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """text -> (hidden (L, D), mask (L,)) from klingjax's frozen text encoder, each text encoded once."""
    table = {}
    for text in dict.fromkeys(texts):
        hidden, mask = encoder.encode([text], max_len)
        table[text] = (np.asarray(hidden[0]), np.asarray(mask[0]))
    return table


def random_generator(args, captions: list[str]) -> tuple[ExperimentConfig, VideoGenerator, dict]:
    """(config, generator, text table) of random-init models: the timing needs no trained weights."""
    exp = ExperimentConfig(data=DataConfig(num_frames=args.frames, height=args.size, width=args.size),
                           vae=VAEStageConfig(variant=args.vae), dit=DiTStageConfig(variant=args.dit_variant))
    dit = WanDiT(layout.dit_model_config(exp, args.text_dim), rngs=nnx.Rngs(0))
    vae = CausalVAE(layout.vae_config(exp), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)

    def states(real: int) -> tuple[np.ndarray, np.ndarray]:
        hidden = np.zeros((args.text_len, args.text_dim), np.float32)
        hidden[:real] = rng.standard_normal((real, args.text_dim))
        return hidden, np.arange(args.text_len) < real

    table = {**{c: states(7) for c in captions}, "": states(2)}
    z = vae.cfg.z_dim
    gen = VideoGenerator(dit=dit, vae=vae, text_encoder=PrecomputedText(table), latent_shape=layout.latent_grid(exp),
                         latent_mean=np.zeros(z, np.float32), latent_std=np.ones(z, np.float32), sample=SampleConfig(),
                         text_max_len=args.text_len, shift=layout.train_shift(exp))
    return exp, gen, table


def with_sampling(gen: VideoGenerator, **changes) -> VideoGenerator:
    """`gen` with SampleConfig fields replaced (a new compiled sampler)."""
    return dataclasses.replace(gen, sample=dataclasses.replace(gen.sample, **changes))


def sample_shift(gen: VideoGenerator) -> float:
    """The shift `gen` samples with (generate._make_sample_fn's rule)."""
    return gen.sample.shift if gen.sample.shift > 0 else gen.shift


def latent_sampler(gen: VideoGenerator) -> Callable:
    """Jitted (dit_state, cond, uncond, noise) -> final normalised latents (B, t, h, w, C): the text-to-video
    sampler of generate._make_sample_fn (same guided_velocity + samplers.sample calls) without the decode."""
    dit_def, s, shift = nnx.graphdef(gen.dit), gen.sample, sample_shift(gen)

    @jax.jit
    def run(dit_state, cond, uncond, noise):
        def velocity(x, t, dit_state):
            tt = jnp.full((x.shape[0],), t * 1000.0, x.dtype)  # (B,) in [0, 1000]
            return guided_velocity(nnx.merge(dit_def, dit_state), x, tt, cond, uncond, s.cfg_scale)

        return samplers.sample(velocity, noise, num_steps=s.num_steps, sampler=s.sampler, shift=shift,
                               args=(dit_state,))

    return run


def student_generator(exp: ExperimentConfig, workdir: str, mesh, text_encoder) -> VideoGenerator:
    """The distill stage's student of `workdir` (`load_generator(..., student=True)`); exits when it has none."""
    try:
        return load_generator(exp, workdir, mesh, text_encoder=text_encoder, student=True)
    except FileNotFoundError as err:
        sys.exit(f"--student: {workdir} has no distill-stage checkpoint to load ({err}); run its 'distill' stage "
                 "first, or run without --student")


def check_student_api(args) -> None:
    """Exit with a clear message when --student cannot run, before anything is loaded."""
    if not args.student:
        return
    if args.workdir and "student" not in inspect.signature(load_generator).parameters:
        sys.exit("--student: klingjax.eval.generate.load_generator has no `student=` argument yet (the distill "
                 "stage adds it); run without --student until it exists")


def random_student(teacher: VideoGenerator, steps: int) -> VideoGenerator:
    """Random init: a trajectory student has its teacher's architecture, so its cost is the same DiT sampled with
    `steps` Euler steps at guidance 1 (`distill.student_sample_config`'s settings)."""
    return with_sampling(teacher, sampler=samplers.Sampler.EULER, num_steps=steps, cfg_scale=1.0,
                         visual_cfg_scale=1.0, negative_prompt="")


# ---------------------------------------------------------------------------------------------------------
# diffusers: WanPipeline from the same weights
# ---------------------------------------------------------------------------------------------------------


def torch_weights(entries, flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    """diffusers state dict from flat klingjax params through the export map's entries."""
    import torch

    return {e.name: torch.tensor(to_torch(flat[e.path] if e.layer is None else flat[e.path][e.layer], e.layout))
            for e in entries}  # torch.tensor copies: jax-backed numpy arrays are read-only


def diffusers_pipelines(gen: VideoGenerator, threads: int):
    """(WanPipeline on klingjax's sigma grid, the same pipeline with the exported scheduler as is), or None."""
    try:
        import torch
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    except ImportError:
        print("torch/diffusers not importable: skipping the diffusers timing (pip install -e '.[torch]')")
        return None
    torch.set_num_threads(threads)
    cfg, vcfg = gen.dit.cfg, gen.vae.cfg
    transformer = WanTransformer3DModel.from_config(dit_map.dit_to_diffusers_config(cfg))
    flat = dit_map.to_diffusers_params(cfg, dit_map.flat_params(gen.dit))  # CHANNEL_CONCAT: the fused patch kernel
    transformer.load_state_dict(torch_weights(dit_map.dit_entries(cfg), flat), strict=True)
    vae = AutoencoderKLWan.from_config(vae_map.vae_to_diffusers_config(vcfg, gen.latent_mean, gen.latent_std))
    vae.load_state_dict(torch_weights(vae_map.vae_entries(vcfg), dit_map.flat_params(gen.vae)), strict=True)
    # As export._pipeline_files writes scheduler_config.json.
    sched = {"num_train_timesteps": 1000, "shift": sample_shift(gen), "use_dynamic_shifting": False}
    pipes = []
    for patch in (True, False):
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=transformer.eval(),
                           scheduler=FlowMatchEulerDiscreteScheduler(**sched))
        pipe.set_progress_bar_config(disable=True)
        pipes.append(use_klingjax_schedule(pipe) if patch else pipe)
    print(f"diffusers: torch {torch.__version__}, {threads} threads; WanTransformer3DModel "
          f"{sum(p.numel() for p in transformer.parameters()):,} params, AutoencoderKLWan "
          f"{sum(p.numel() for p in vae.parameters()):,} params (strict loads)", flush=True)
    return pipes


def diffusers_generate(pipe, exp: ExperimentConfig, text: dict, noise: np.ndarray, steps: int, scale: float,
                       output_type: str = "np") -> np.ndarray:
    """One WanPipeline call: uint8 (B, T, H, W, 3) for "np", final latents (B, t, h, w, C) for "latent"."""
    import torch

    latents = torch.from_numpy(noise).permute(0, 4, 1, 2, 3).contiguous()  # (B, C, t, h, w)
    out = pipe(prompt_embeds=torch.from_numpy(text["cond"]), negative_prompt_embeds=torch.from_numpy(text["neg"]),
               height=exp.data.height, width=exp.data.width, num_frames=exp.data.num_frames,
               num_inference_steps=steps, guidance_scale=scale, latents=latents, output_type=output_type,
               return_dict=False)[0]
    if output_type == "latent":
        return out.permute(0, 2, 3, 4, 1).numpy()
    return np.round(out * 255.0).clip(0, 255).astype(np.uint8)  # [0, 1] floats; klingjax: round((x + 1) * 127.5)


# ---------------------------------------------------------------------------------------------------------
# Parity and timing
# ---------------------------------------------------------------------------------------------------------


def diff(a, b) -> float:
    """Max abs difference, in float64."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def parity(teacher: VideoGenerator, pipes, exp, captions, key, inputs: dict, text: dict, steps: int) -> None:
    """Print klingjax vs diffusers differences at `steps` steps (same noise, weights, text states)."""
    gen = teacher if steps == teacher.sample.num_steps else with_sampling(teacher, num_steps=steps)
    scale, dit_state = gen.sample.cfg_scale, nnx.state(gen.dit)
    cond, uncond, noise = inputs["cond"], inputs["uncond"], inputs["noise"]
    video = gen(captions, key, batch_size=len(captions))
    run = latent_sampler(gen)
    z = np.asarray(run(dit_state, cond, uncond, noise))
    decode = functools.partial(gen._codec["decode"], nnx.state(gen.vae))
    replica = diff(decode(z), video)  # latent_sampler + decode vs the generator's own program: should be <= 1
    z_open = run(dit_state, cond.replace(text_mask=None), uncond.replace(text_mask=None), noise)
    video_open = np.asarray(decode(z_open))
    noise_np = np.array(noise)
    z_df = diffusers_generate(pipes[0], exp, text, noise_np, steps, scale, "latent")
    video_df = diffusers_generate(pipes[0], exp, text, noise_np, steps, scale)
    z_grid = diffusers_generate(pipes[1], exp, text, noise_np, steps, scale, "latent")

    print(f"parity {steps} step(s) cfg {scale}: uint8 frames max abs diff {diff(video, video_df):.0f} "
          f"({np.sum(video != video_df)} of {video.size} values differ), final latents {diff(z, z_df):.2e} "
          f"(max |z| {np.max(np.abs(z)):.2f}); klingjax with text_mask None (all L text positions attended, diffusers "
          f"given trimmed states): uint8 {diff(video_open, video_df):.0f} ({np.sum(video_open != video_df)} differ), "
          f"latents {diff(z_open, z_df):.2e}; diffusers with its own sigma grid vs klingjax's: latents "
          f"{diff(z_grid, z_df):.2e}; (self-check: decoded latent_sampler latents vs the generator's video, uint8 "
          f"{replica:.0f})", flush=True)


def timed_rounds(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall times of each fn, called in turn for warmup + repeats rounds (all see the same machine load)."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def call_median(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def encoder_time(gen: VideoGenerator, captions: list[str], repeats: int) -> float:
    """Median seconds klingjax's own text encoder adds to one generate call (captions + negative prompt)."""
    enc, n, neg = gen.text_encoder, gen.text_max_len, [gen.sample.negative_prompt] * len(captions)
    return call_median(lambda: jax.block_until_ready((enc.encode(captions, n), enc.encode(neg, n))), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="", help="trained klingjax work dir; empty: random-init models")
    parser.add_argument("--dit_variant", default="XS", help="random init: DiT variant")
    parser.add_argument("--vae", default="demo", help="random init: VAE variant")
    parser.add_argument("--frames", type=int, default=9, help="random init: frames per clip")
    parser.add_argument("--size", type=int, default=32, help="random init: frame height = width in pixels")
    parser.add_argument("--text_len", type=int, default=16, help="random init: text tokens")
    parser.add_argument("--text_dim", type=int, default=384, help="random init: text width")
    parser.add_argument("--batch", type=int, default=1, help="clips per generate call")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps, both frameworks")
    parser.add_argument("--cfg", type=float, default=4.0, help="guidance scale, both frameworks")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads; XLA's CPU pool uses every schedulable core")
    parser.add_argument("--student", action="store_true", help="also time the distilled student (with --workdir: "
                        "its distill stage's; random init: the same DiT at --student_steps, guidance 1)")
    parser.add_argument("--student_steps", type=int, default=4, help="random init --student: its step count")
    parser.add_argument("--no_parity", dest="parity", action="store_false", help="skip the parity check")
    parser.add_argument("--host_malloc", default="tcmalloc", choices=["tcmalloc", "system"],
                        help="tcmalloc: re-exec under tcmalloc when installed (both frameworks share the process)")
    args = parser.parse_args()
    check_student_api(args)
    if args.host_malloc == "system":
        os.environ["KLINGJAX_HOST_MALLOC"] = "default"
    malloc = host_memory.reexec_with_tcmalloc()  # may restart this process (same argv) under tcmalloc

    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    t0 = time.perf_counter()
    student = None
    if args.workdir:
        exp = layout.load_workdir_config(args.workdir)
        mesh = make_mesh(exp.mesh.sizes)
        gen = load_generator(exp, args.workdir, mesh)
        if args.student:  # loaded first: a missing checkpoint fails before minutes of timing
            student = student_generator(exp, args.workdir, mesh, gen.text_encoder)
        negatives = [g.sample.negative_prompt for g in (gen, student) if g is not None]
        table = text_table(gen.text_encoder, [*captions, *negatives], exp.text_max_len)
        enc_sec = encoder_time(gen, captions, args.repeats)
    else:
        (exp, gen, table), enc_sec = random_generator(args, captions), None
    stub = PrecomputedText(table)
    teacher = with_sampling(dataclasses.replace(gen, text_encoder=stub), sampler=samplers.Sampler.EULER,
                            num_steps=args.steps, cfg_scale=args.cfg)
    if args.student and not args.workdir:
        student = random_student(teacher, args.student_steps)
    neg = teacher.sample.negative_prompt
    cond = Conditions(*stub.encode(captions, teacher.text_max_len))
    uncond = Conditions(*stub.encode([neg] * args.batch, teacher.text_max_len))
    key = jax.random.key(0)
    noise = jax.random.normal(jax.random.fold_in(key, 0), (args.batch, *teacher.latent_shape))  # what __call__ draws
    inputs = {"cond": cond, "uncond": uncond, "noise": noise}
    # WanTransformer3DModel has no text mask: it gets the states trimmed to the real tokens, which is what klingjax's
    # masked cross-attention reads (README "Export to diffusers"); writable copies, for torch.from_numpy.
    real = [int(np.max(np.sum(np.asarray(c.text_mask), axis=1))) for c in (cond, uncond)]
    text = {"cond": np.array(cond.text[:, :real[0]]), "neg": np.array(uncond.text[:, :real[1]])}
    cfg = teacher.dit.cfg
    print(f"CPU: {len(os.sched_getaffinity(0))} schedulable cores (XLA's pool), torch threads {args.threads}; host "
          f"allocator: {malloc}; jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"models ({'work dir ' + args.workdir if args.workdir else 'random init'}, loaded in "
          f"{time.perf_counter() - t0:.1f} s): DiT {exp.dit.variant} (dim {cfg.dim}, {cfg.num_layers} layers, "
          f"text_dim {cfg.text_dim}), VAE {exp.vae.variant} z_dim {teacher.vae.cfg.z_dim}; clips "
          f"{exp.data.num_frames}x{exp.data.height}x{exp.data.width}, latents {(args.batch, *teacher.latent_shape)}; "
          f"text {text['cond'].shape} (real tokens: caption {int(np.asarray(cond.text_mask)[0].sum())}, negative "
          f"prompt {int(np.asarray(uncond.text_mask)[0].sum())}); {args.steps} Euler steps, cfg {args.cfg}, shift "
          f"{sample_shift(teacher):.4f}", flush=True)
    if args.workdir and (gen.sample.num_steps, gen.sample.cfg_scale) != (args.steps, args.cfg):
        print(f"note: the work dir samples with {gen.sample.num_steps} steps cfg {gen.sample.cfg_scale}", flush=True)
    if enc_sec is not None:
        print(f"klingjax text encoder per generate call (captions + negative prompt), excluded from the timing: "
              f"{1e3 * enc_sec:.1f} ms", flush=True)

    # --- klingjax: compile + warm up ------------------------------------------------------------------------
    dit_state, vae_state = nnx.state(teacher.dit), nnx.state(teacher.vae)
    scales = (float(args.cfg), float(teacher.sample.visual_cfg_scale))
    sample_only = latent_sampler(teacher)
    t0 = time.perf_counter()
    video = teacher(captions, key, batch_size=args.batch)
    compile_sec = time.perf_counter() - t0
    latents = sample_only(dit_state, cond, uncond, noise).block_until_ready()
    decode = teacher._codec["decode"]
    fns = {
        "klingjax": lambda: teacher(captions, key, batch_size=args.batch),
        "klingjax program": lambda: teacher._fn(dit_state, vae_state, cond, uncond, noise, None,
                                                scales=scales).block_until_ready(),
        "klingjax sample": lambda: sample_only(dit_state, cond, uncond, noise).block_until_ready(),
        "klingjax decode": lambda: decode(vae_state, latents).block_until_ready(),
    }
    print(f"klingjax: first call (compile + run) {compile_sec:.1f} s; video {video.shape} {video.dtype}", flush=True)

    # --- diffusers ------------------------------------------------------------------------------------------
    pipes = diffusers_pipelines(teacher, args.threads)
    if pipes is not None:
        noise_np = np.array(noise)
        fns["diffusers"] = lambda: diffusers_generate(pipes[0], exp, text, noise_np, args.steps, args.cfg)
        fns["diffusers latent"] = lambda: diffusers_generate(pipes[0], exp, text, noise_np, args.steps, args.cfg,
                                                             "latent")
        if args.parity:
            for n in sorted({1, args.steps}):
                parity(teacher, pipes, exp, captions, key, inputs, text, n)

    # --- student --------------------------------------------------------------------------------------------
    if student is not None:
        student = dataclasses.replace(student, text_encoder=stub)
        t0 = time.perf_counter()
        student(captions, key, batch_size=args.batch)
        s = student.sample
        print(f"student: {s.num_steps} steps, sampler {s.sampler.value}, cfg {s.cfg_scale}; first call "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        fns["student"] = lambda: student(captions, key, batch_size=args.batch)
        s_uncond = Conditions(*stub.encode([s.negative_prompt] * args.batch, student.text_max_len))
        s_state, s_scales = nnx.state(student.dit), (float(s.cfg_scale), float(s.visual_cfg_scale))
        fns["student program"] = lambda: student._fn(s_state, vae_state, cond, s_uncond, noise, None,
                                                     scales=s_scales).block_until_ready()

    # --- timing ---------------------------------------------------------------------------------------------
    timed_rounds(fns, warmup=1, repeats=0)  # warm-up round (first decode call, torch allocator)
    counter = CompileCounter()
    times = timed_rounds(fns, warmup=0, repeats=args.repeats)
    for name, t in times.items():
        print(f"{name:17s} median {1e3 * np.median(t):8.1f} ms per call = {1e3 * np.median(t) / args.batch:8.1f} ms "
              f"per clip ({', '.join(f'{1e3 * x:.0f}' for x in t)})", flush=True)
    print(f"XLA compilations during the {args.repeats} timed rounds: {counter.count}; load average now "
          f"{os.getloadavg()[0]:.1f} (other processes' load slows torch's OpenMP threads most)", flush=True)
    report(args, times, teacher, student)


def report(args, times: dict[str, list[float]], teacher: VideoGenerator, student: VideoGenerator | None) -> None:
    """Print the breakdowns and the GOAL lines from the timed rounds."""
    med = {name: float(np.median(t)) for name, t in times.items()}
    evals = args.steps * (2 if args.cfg != 1 else 1)  # DiT evaluations per clip
    ours, program, b = med["klingjax"], med["klingjax program"], args.batch
    print(f"klingjax breakdown: sampling {100 * med['klingjax sample'] / ours:.0f}%, decode "
          f"{100 * med['klingjax decode'] / ours:.0f}% of the call; Python + host around the compiled program "
          f"{1e3 * (min(times['klingjax']) - min(times['klingjax program'])):.1f} ms per call (min - min; medians "
          f"{1e3 * (ours - program):.1f}); {args.steps} DiT calls of batch {b * evals // args.steps} (CFG branches "
          f"batched)", flush=True)
    split = [call_median(lambda m=m: nnx.state(m)) for m in (teacher.dit, teacher.vae)]
    print(f"of which VideoGenerator.__call__ re-reads the params each call: nnx.state(dit) {1e3 * split[0]:.2f} ms + "
          f"nnx.state(vae) {1e3 * split[1]:.2f} ms", flush=True)
    theirs = med.get("diffusers")
    if theirs is not None:
        dec = theirs - med["diffusers latent"]
        print(f"diffusers breakdown: sampling {100 * med['diffusers latent'] / theirs:.0f}%, decode + postprocess "
              f"{100 * dec / theirs:.0f}% ({1e3 * dec:.0f} ms); {evals} DiT calls of batch {b} (one per CFG branch)",
              flush=True)
    if student is not None:
        dec, st, k = med["klingjax decode"], med["student"], student.sample.num_steps
        print(f"student breakdown: the same VAE decode ({1e3 * dec:.1f} ms) is {100 * dec / st:.0f}% of its call; "
              f"without it (call - decode) teacher / student = {(ours - dec) / max(st - dec, 1e-9):.1f}x; compiled "
              f"programs alone {program / med['student program']:.1f}x; DiT evaluations per clip teacher / student = "
              f"{evals} / {k * (2 if student.sample.cfg_scale != 1 else 1)}", flush=True)

    if theirs is None:
        print("GOAL generate_time_vs_diffusers: NOT MEASURED (goal <= 0.5x) NOT MET")
    else:
        r = ours / theirs
        print(f"GOAL generate_time_vs_diffusers: klingjax {ours / b:.3f} s vs diffusers {theirs / b:.3f} s per clip "
              f"at {args.steps} steps cfg {args.cfg:g} = {r:.2f}x (goal <= 0.5x) {'MET' if r <= 0.5 else 'NOT MET'}")
    if student is None:
        print("GOAL student_speedup: not measured (no --student) (goal >= 10x) NOT MET")
    else:
        r = ours / med["student"]
        print(f"GOAL student_speedup: teacher {args.steps}-step CFG {ours / b:.3f} s / student "
              f"{student.sample.num_steps}-step {med['student'] / b:.3f} s = {r:.1f}x (goal >= 10x) "
              f"{'MET' if r >= 10 else 'NOT MET'}")


if __name__ == "__main__":
    main()
