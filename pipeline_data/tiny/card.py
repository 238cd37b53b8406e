"""The model card (README.md) written next to the exported tiny base model."""

from __future__ import annotations


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def model_card(info: dict) -> str:
    """Markdown model card from the export's training summary (``training.json``)."""
    cfg = info.get("config", {})
    vae, unet, text = cfg.get("vae", {}), cfg.get("unet", {}), cfg.get("text", {})
    v = info.get("vae", {})
    data = info.get("data", {})
    params = info.get("params", {})
    minutes = (v.get("elapsed_s", 0.0) + info.get("unet_seconds", 0.0)) / 60
    size = cfg.get("crop_size", 64)  # absent in v1 exports
    levels = len(vae.get("block_out_channels") or (0, 0, 0))
    down, lat = 2 ** (levels - 1), vae.get("latent_channels", 4)
    shape = f"{size // down}x{size // down}x{lat}"
    sets = {"lfw": "LFW", "celeba": "CelebA", "orl": "ORL", "lfw_few": "LFW's 1-3-photo people"}
    sources = ", ".join(sets.get(d, d) for d in cfg.get("datasets", ("lfw", "celeba", "orl")))
    rows = "\n".join(
        [
            f"| VAE | AutoencoderKL, blocks {vae.get('block_out_channels')}, 1 resnet per block, no mid attention, "
            f"{down}x down to {shape} | {_count(params.get('vae'))} |",
            f"| text encoder | CLIPTextModel, width {text.get('hidden_size')}, "
            f"{text.get('num_hidden_layers')} layers, "
            f"{text.get('num_attention_heads')} heads; our own BPE tokenizer (vocab.json + merges.txt, 77 tokens) "
            f"| {_count(params.get('text_encoder'))} |",
            f"| UNet | UNet2DConditionModel, blocks {unet.get('block_out_channels')}, attention at 8x8 and 4x4 only, "
            f"cross-attention width {text.get('hidden_size')} | {_count(params.get('unet'))} |",
        ]
    )
    return f"""---
license: other
license_name: non-commercial-research-and-demo
tags: [diffusers, stable-diffusion, faces, tiny, difflora]
library_name: diffusers
pipeline_tag: text-to-image
---

# difflora tiny face base model

A small Stable-Diffusion-architecture model ({size}x{size} px, {shape} latents) that generates aligned face crops.
It is the embedded default of [difflora](../../../README.md): it lets the service, the adapter dataset build and the
hypernetwork run on a CPU with no model hub. It is **not** a general text-to-image model: it only knows
"a photo of a person" and a few variants ("a portrait photo of a person", "a black and white photo of a person").

Load it with stock diffusers:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("assets/tiny/base", local_files_only=True)
image = pipe("a photo of a person", num_inference_steps=25, guidance_scale=3.0).images[0]  # {size}x{size}
```

## Terms: non-commercial research and demo use only

The weights were trained on photos whose terms allow research use only: **Labeled Faces in the Wild**
(Huang, Ramesh, Berg, Learned-Miller, UMass TR 07-49, 2007; news photos, no formal licence), **CelebA**
(Liu, Luo, Wang, Tang, ICCV 2015; non-commercial research only) and the **ORL / AT&T Database of Faces**
(credit: Olivetti Research Laboratory / AT&T Laboratories Cambridge). Use these weights for non-commercial
research and demonstrations only. No photo is distributed with them.

## Training data

* {_count(data.get("crops"))} aligned {size}x{size} crops (dlib HOG detector, 5-point landmarks, `get_face_chip`,
  padding 0.3, aligned at {2 * size} px and box-downsampled) of {_count(data.get("identities"))} identities from
  {sources} (photos without a detectable face skipped), plus their mirror images.
* The identities of the reserved **eval** split (`pipeline_data/splits.py`, ~12 % by a hash of
  `<dataset>/<identity>`) were excluded, so hypernetwork evaluation uses people this model has never seen.
* Captions: "a photo of a person" and 4 colour variants; greyscale photos get "a black and white ... of a
  person"; 10 % empty captions (for classifier-free guidance).

## Architecture

| part | configuration | parameters |
|---|---|---|
{rows}
| scheduler | DDIM (SD 1.x scaled-linear betas, 1000 training steps, `steps_offset=1`) | |

Latents are normalised per channel: the mean and std of the VAE's latents were measured after training and folded
into its `quant_conv` / `post_quant_conv`, so `scaling_factor` is 1.0 and stock pipelines work unmodified.

## Training

* VAE: {_count(v.get("step"))} steps, batch {vae.get("batch_size")}, L1 + {vae.get("edge_weight")} x edge L1 +
  {vae.get("kl_weight")} x KL, AdamW lr {vae.get("lr")} (cosine); reconstruction PSNR
  {v.get("val_psnr_db", "?")} dB on the `val` identities' crops (part of the training data: only `eval` is excluded).
* UNet + text encoder (jointly): {_count(info.get("unet_steps"))} steps, batch {unet.get("batch_size")},
  epsilon prediction with Min-SNR-{unet.get("min_snr_gamma")} weighting, AdamW lr {unet.get("lr")}
  (warmup {unet.get("warmup")}, cosine to 10 %), EMA {unet.get("ema_decay")} (exported), final training loss
  {info.get("unet_loss", "?")}.
* Hardware: a 2-core CPU shared with other jobs, 1 torch thread; {minutes:.0f} minutes of training in total.
* Weights: UNet and VAE fp16, text encoder fp32 (so a plain `from_pretrained` runs on a CPU), safetensors.
  Rebuild with `make tiny-assets`
  (`difflora tiny pretrain --faces ../shared/data/faces --out assets/tiny/base`); details in `docs/tiny.md`.

## Samples

![samples](../samples.png)

4x4 grid, "a photo of a person", seeds 0-15, 25 DDIM steps, guidance 3.0, shown at 2x (nearest neighbour).
"""
