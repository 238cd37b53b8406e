"""GPU smoke test: base model -> hypernet-predicted adapter -> exact merge -> generation, with per-stage timings.

On a GPU host (defaults: CUDA, fp16, 512x512, 20 steps)::

    python scripts/gpu_smoke.py                                # real-size SD 1.5 built from its public config
    python scripts/gpu_smoke.py --model /models/sd15 --hypernet /models/hypernet --photos a.jpg b.jpg \\
        --face-backend insightface --face-model-dir /models/insightface
    python scripts/gpu_smoke.py --model sdxl --dtype bfloat16 --compile

Without ``--model`` the real-size SD 1.5 (UNet 860 M, VAE, CLIP ViT-L text encoder) is built from its public
configuration with random weights: nothing is downloaded, the timings are those of the real architecture, the
images are noise. Without ``--hypernet`` the hypernetwork is untrained (its adapters are the method's zero-init
no-op), so ``--perturb`` adds noise to the predicted adapter to make the merge change the weights and check that
the restore is exact. ``--tiny`` runs the same stages on the CPU with the bundled tiny model and hypernet (or,
when ``assets/tiny`` is absent, the tiny architecture built from its config and an untrained hypernet): CI runs it.

Prints one line per stage and a summary; ``--json PATH`` also writes everything as JSON. Exit status: 0 OK,
1 a check failed (restore not exact, non-finite image), 2 bad input (missing model or checkpoint).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Stable Diffusion 1.5's public component configs (unet/, vae/, text_encoder/ config.json)
from pipeline_data.models import SD15_UNET_CONFIG as SD15_UNET  # noqa: E402
from weights.atomic import atomic_write_json  # noqa: E402

SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Named stage timings (seconds), synchronising CUDA around each stage."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stages = device, {}

    def __call__(self, name: str, fn, *a, **kw):
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        _sync(self.device)
        self.stages[name] = time.perf_counter() - t0
        print(f"  {name:<18} {self.stages[name]:9.3f} s", flush=True)
        return out


def _tokenizer():
    from pipeline_data.tiny.tokenizer import load_tokenizer, write_tokenizer

    return load_tokenizer(write_tokenizer(tempfile.mkdtemp(prefix="difflora_tok_")))


def build_sd15_from_config(seed: int = 0):
    """The real-size SD 1.5 pipeline with random weights (fp32, CPU); the tokenizer is the project's small BPE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id}
    text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **ids))
    sched = DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_from_config(seed: int = 0):
    """The tiny base's architecture (pipeline_data.tiny.arch defaults) with random weights (fp32, CPU)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipeline_data.tiny.arch import SCHEDULER_KW, TinyConfig, build_text_encoder, build_unet, build_vae

    cfg, tok = TinyConfig(), _tokenizer()
    torch.manual_seed(seed)
    vae = build_vae(cfg.vae)
    size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    text = build_text_encoder(cfg.text, len(tok), tok.bos_token_id, tok.eos_token_id)
    unet = build_unet(cfg.unet, cfg.vae.latent_channels, cfg.text.hidden_size, size)
    sched = DDIMScheduler(**SCHEDULER_KW, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_pipeline(args, device: torch.device, dtype: torch.dtype):
    """(pipeline on CPU or device, description). Untrained hypernets need the fp32 CPU model first."""
    from pipeline_data.models import ModelNotFoundError, load_pipeline

    on_cpu = args.hypernet is None  # Predictor.untrained inits adapters from the fp32 weights
    dev, dt = ("cpu", torch.float32) if on_cpu else (device, dtype)
    if args.model:
        return load_pipeline(args.model, device=dev, dtype=dt), args.model
    if args.tiny:
        try:
            return load_pipeline("tiny", device=dev, dtype=dt), "tiny (bundled)"
        except ModelNotFoundError:
            return build_tiny_from_config(args.seed).to(dev, dt), "tiny (from config, random weights)"
    return build_sd15_from_config(args.seed).to(dev, dt), "sd15 (from public config, random weights)"


def get_embeddings(args, cond_dim: int) -> tuple[np.ndarray, str]:
    """(P, E) face embeddings of --photos, or one random unit vector."""
    if not args.photos:
        v = np.random.default_rng(args.seed).standard_normal((1, cond_dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True), "random unit vector"
    from pipeline_data.faces import get_encoder

    kw = {"model_dir": args.face_model_dir} if args.face_model_dir else {}
    enc = get_encoder(args.face_backend, **kw)
    embs = [r.embedding for r in enc.embed_many(args.photos, errors="return") if not isinstance(r, Exception)]
    if not embs:
        raise ValueError("no face found in any of --photos")
    return np.stack(embs).astype(np.float32), f"{len(embs)} photo(s), {args.face_backend}"


def perturb(adapter, amount: float, seed: int):
    """Adds ``amount``·N(0, rms²) to every trainable tensor (rms 1 for all-zero ones, e.g. LoRA's B)."""
    from weights.adapter import Adapter, split_key
    from weights.methods import get_method

    trainable = set(get_method(adapter.spec.method).trainable)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in adapter.tensors.items():
        if k.count("::") == 1 and split_key(k)[1] in trainable and t.is_floating_point():
            rms = float(t.float().pow(2).mean().sqrt()) or 1.0
            t = t + amount * rms * torch.randn(t.shape, generator=g).to(t)
        out[k] = t
    return Adapter(adapter.spec, out)


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _import_all() -> None:
    import diffusers.pipelines.stable_diffusion  # noqa: F401 - the heavy imports, timed on their own
    import transformers  # noqa: F401

    import hypernet.predict  # noqa: F401


def run(args) -> dict:
    from hypernet.predict import Predictor
    from hypernet.sample import Hypernet
    from weights.apply import apply_adapter, restore

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = getattr(torch, args.dtype)
    timer = Timer(device)
    print(f"gpu_smoke: device {device}, dtype {args.dtype}, {args.size}x{args.size}, {args.steps} steps")
    timer("import", _import_all)
    pipe, model_desc = timer("pipeline", get_pipeline, args, device, dtype)
    if args.hypernet:
        pred = timer("hypernet", Predictor.load, args.hypernet, device=device)
        hn_desc = f"trained ({args.hypernet})"
    else:
        from pipeline_data.recipe import TARGET_PRESETS, BuildConfig

        recipe = BuildConfig(rank=args.rank, targets=list(TARGET_PRESETS[args.targets]))
        pred = timer(
            "hypernet", Predictor.untrained, pipe, recipe, preset=args.hypernet_preset, token_dim=args.token_dim,
            cond_dim=args.cond_dim, face_backend=args.face_backend,
        )  # fmt: skip
        pred.hypernet = Hypernet(pred.hypernet.model, device)
        hn_desc = f"untrained ({args.hypernet_preset} preset, {args.targets} targets, rank {args.rank})"
        timer("to_device", pipe.to, device, dtype)
    unet = pipe.unet
    if args.compile:
        unet.compile(mode=args.compile_mode)  # in place: module names (and apply_adapter) stay the same
    attn = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    print(f"  model: {model_desc}; hypernet: {hn_desc}; attention: {', '.join(attn)}")

    if args.predict_steps:
        pred.steps = args.predict_steps
    emb, emb_desc = timer("faces", get_embeddings, args, pred.cond_dim)
    adapter = timer("predict", pred.predict, emb, seed=args.seed)
    predict_warm = _median(lambda: pred.predict(emb, seed=args.seed), args.repeats)
    amount = args.perturb if args.perturb is not None else (0.0 if pred.trained else 1e-2)
    if amount:
        adapter = perturb(adapter, amount, args.seed)
    layers = [unet.get_submodule(lay.name) for lay in adapter.spec.layers]
    originals = [m.weight.detach().clone() for m in layers]
    state = timer("apply", apply_adapter, unet, adapter, args.scale)
    delta = max(float((m.weight.detach().float() - w0.float()).abs().max()) for m, w0 in zip(layers, originals))

    def generate():
        gen = torch.Generator("cpu").manual_seed(args.seed)
        with torch.inference_mode():
            return pipe(
                args.prompt, negative_prompt="", num_inference_steps=args.steps, guidance_scale=args.guidance,
                height=args.size, width=args.size, generator=gen, output_type="np",
            ).images  # fmt: skip

    images = timer("generate_first", generate)  # includes torch.compile and CUDA warm-up
    gen_times = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        images = generate()
        _sync(device)
        gen_times.append(time.perf_counter() - t0)
    timer.stages["generate"] = statistics.median(gen_times)
    print(f"  {'generate':<18} {timer.stages['generate']:9.3f} s  (median of {args.repeats})")
    timer("restore", restore, unet, state)
    exact = all(torch.equal(m.weight.detach(), w0) for m, w0 in zip(layers, originals))
    apply_warm = _median(lambda: (apply_adapter(unet, adapter, args.scale), restore(unet)), args.repeats)
    finite = bool(np.isfinite(images).all())
    if args.image:
        from PIL import Image

        Image.fromarray((np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)).save(args.image)
    timer.stages |= {"predict_warm": predict_warm, "apply_restore_warm": apply_warm}
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "model": model_desc,
        "hypernet": hn_desc,
        "embeddings": emb_desc,
        "attention": attn,
        "compile": args.compile,
        "size": args.size,
        "steps": args.steps,
        "adapter_layers": len(layers),
        "adapter_params": adapter.num_params(),
        "tokens": pred.layout.num_tokens,
        "predict_steps": pred.steps,
        "perturb": amount,
        "max_abs_delta_w": delta,
        "restore_exact": exact,
        "image_finite": finite,
        "seconds_per_step": timer.stages["generate"] / args.steps,
        "timings_s": {k: round(v, 4) for k, v in timer.stages.items()},
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Smoke test: predict an adapter, merge it, generate; time each stage.")
    p.add_argument("--tiny", action="store_true", help="CPU run on the bundled tiny model (CI)")
    p.add_argument("--model", help="preset (sd15|sdxl|tiny) or local diffusers folder (default: SD 1.5 from config)")
    p.add_argument("--hypernet", help="trained predictor directory (default: untrained; --tiny: the bundled one)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; --tiny: cpu)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: float16 on CUDA, else fp32")
    p.add_argument("--size", type=int, help="image side (default 512; --tiny: 64)")
    p.add_argument("--steps", type=int, help="denoising steps (default 20; --tiny: 4)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--prompt", default="a photo of sks person")
    p.add_argument("--repeats", type=int, help="timed repeats of the warm stages (default 3; --tiny: 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (first generation compiles)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--photos", nargs="+", help="face photos to embed (default: a random embedding)")
    p.add_argument("--face-backend", default=None, choices=["dlib", "insightface"], help="default: dlib")
    p.add_argument("--face-model-dir", help="insightface model pack directory")
    p.add_argument(
        "--targets", choices=["attn", "full"], help="untrained hypernet: adapter targets (default attn; --tiny: full)"
    )
    p.add_argument("--rank", type=int, default=4, help="untrained hypernet: adapter rank")
    p.add_argument("--token-dim", type=int, help="untrained hypernet: token width (default 128; --tiny: 64)")
    p.add_argument("--cond-dim", type=int, help="untrained hypernet: embedding size (default 512; dlib photos: 128)")
    p.add_argument("--hypernet-preset", help="untrained hypernet: tiny|sd15|sdxl (default sd15; --tiny: tiny)")
    p.add_argument("--predict-steps", type=int, help="hypernet DDIM steps (default: the predictor's own, 50)")
    p.add_argument("--perturb", type=float, help="noise added to the predicted adapter (default 0.01 if untrained)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", help="write the first image here (PNG)")
    p.add_argument("--json", help="write the results here (JSON)")
    return p


def _defaults(args) -> None:
    cuda = torch.cuda.is_available() and not args.tiny
    args.device = args.device or ("cuda" if cuda else "cpu")
    gpu = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("float16" if gpu else "float32")
    args.size = args.size or (64 if args.tiny else 512)
    args.steps = args.steps or (4 if args.tiny else 20)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.token_dim = args.token_dim or (64 if args.tiny else 128)
    args.targets = args.targets or ("full" if args.tiny else "attn")  # full SD 1.5: 3.7 M entries, 28 k tokens
    args.hypernet_preset = args.hypernet_preset or ("tiny" if args.tiny else "sd15")
    if args.face_backend is None:
        args.face_backend = "insightface" if args.face_model_dir else "dlib"
    dlib_dim = args.face_backend == "dlib" and (args.tiny or args.photos)  # else ArcFace-sized, as in production
    args.cond_dim = args.cond_dim or (128 if dlib_dim else 512)
    if args.tiny and not args.model and not args.hypernet:  # the bundled pair, when both are there
        from pipeline_data.models import TINY_BASE

        bundled = ROOT / "assets" / "tiny" / "hypernet"
        if (TINY_BASE / "model_index.json").is_file() and (bundled / "config.json").is_file():
            args.hypernet = str(bundled)
    if args.size % 8 or args.size < 8 or args.steps < 1 or args.repeats < 1:
        raise ValueError("--size must be a positive multiple of 8; --steps and --repeats must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    try:
        _defaults(args)
        result = run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"gpu_smoke: {e}", file=sys.stderr)
        return 2
    ok = result["restore_exact"] and result["image_finite"]
    t = result["timings_s"]
    print(
        f"gpu_smoke: {'OK' if ok else 'FAILED'}  predict {t['predict_warm'] * 1e3:.1f} ms, apply+restore "
        f"{t['apply_restore_warm'] * 1e3:.1f} ms, generate {t['generate']:.2f} s "
        f"({result['seconds_per_step'] * 1e3:.1f} ms/step), restore exact {result['restore_exact']}, "
        f"max |dW| {result['max_abs_delta_w']:.3g}, image finite {result['image_finite']}"
    )
    if args.json:
        atomic_write_json(args.json, result, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
