"""The steps of SDXL DreamBooth training and sampling as the paper's official code runs them (train_lily.py,
infer_lily.py), as pure functions a training recipe calls: prompt encoding with both text encoders, SDXL's
add_time_ids, the instance images' VAE latent distributions cached once, one denoising loss, and seeded sampling
(one image per pipeline call as infer_lily.py, or batched with per-image routing groups).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn
from tqdm.auto import tqdm

from lilyexp.backbones.sdxl import SDXLParts, require_diffusers
from lilyexp.errors import ConfigError
from lilyexp.methods.routing import cfg_groups, routing_groups, row_groups, warn_if_batch_coupled


@torch.no_grad()
def encode_prompts(parts: SDXLParts, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (n, 77, d1 + d2), pooled (n, projection)) as SDXL encodes text: each encoder's penultimate
    hidden states, concatenated; the pooled, projected output of the second encoder. Padding to the tokenizer's
    max length (77), truncating, as ``StableDiffusionXLPipeline.encode_prompt`` does."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders):
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # the last encoder's projected pooled output (text_embeds)
    return torch.cat(hidden, dim=-1), pooled


def add_time_ids(time_id_inputs: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, 6) SDXL micro-conditioning: original (h, w) + crop (top, left) + target (h, w) per image."""
    rows = [list(map(float, inputs)) for inputs in time_id_inputs]
    if any(len(row) != 6 for row in rows):
        raise ConfigError("SDXL add_time_ids take six numbers per image: original size, crop top-left, target size.")
    return torch.tensor(rows, dtype=dtype, device=device)


@dataclass
class LatentCache:
    """The VAE posterior of each instance image, computed once. The encoder is deterministic on the fixed crops, so
    this is exactly what re-encoding every step gives; :meth:`sample` still draws a latent each step, as
    train_lily.py does (``latent_dist.sample()``)."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    shift: torch.Tensor | None = None  # the VAE config's latents_mean / latents_std, when it has them
    scale: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, indices: Sequence[int] | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of the images at ``indices`` (the UNet's input space)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        mean, std = self.mean[index], self.std[index]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        latents = mean + std * noise
        if self.shift is None or self.scale is None:
            return latents * self.scaling_factor
        return (latents - self.shift.to(latents)) * self.scaling_factor / self.scale.to(latents)


def _latent_statistic(vae: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(vae.config, name, None)
    return None if value is None else torch.tensor(value, dtype=torch.float32).view(1, -1, 1, 1)


@torch.no_grad()
def cache_latents(vae: nn.Module, pixel_values: torch.Tensor, batch_size: int = 1) -> LatentCache:
    """Encode the instance images (n, 3, H, W) in [-1, 1] once, in the VAE's dtype (fp32 in the official run)."""
    means, stds = [], []
    parameter = next(vae.parameters())
    for chunk in pixel_values.split(batch_size):
        posterior = vae.encode(chunk.to(parameter.device, parameter.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return LatentCache(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor),
                       _latent_statistic(vae, "latents_mean"), _latent_statistic(vae, "latents_std"))


def bare_unet(unet: nn.Module) -> nn.Module:
    """The diffusers UNet inside DDP's wrapper and peft's (PeftModel, LoraModel, LilyVariantModel). peft injects
    adapters in place, so the bare UNet carries them and a pipeline can take it."""
    diffusers = require_diffusers()
    module = extract_model_from_parallel(unet)
    while not isinstance(module, diffusers.UNet2DConditionModel):
        inner = next((module._modules[name] for name in ("base_model", "model") if name in module._modules), None)
        if inner is None:
            raise ConfigError(f"expected a diffusers UNet2DConditionModel (or a peft wrapper of one), "
                              f"got {type(unet).__name__}.")
        module = inner
    return module


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"unsupported prediction type '{prediction}' (epsilon or v_prediction).")


def training_loss(unet: nn.Module, scheduler: Any, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                  pooled_embeds: torch.Tensor, time_ids: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One DreamBooth loss (train_lily.py): Gaussian noise, a uniform timestep in [0, T) per image, ``add_noise``,
    the UNet with SDXL's ``added_cond_kwargs``, MSE in fp32 against the scheduler's target (the noise for epsilon
    prediction). Embeddings of batch 1 are repeated over the latents' batch. Inputs go to the UNet in its base
    dtype; the official run feeds fp32 latents to its fp16 UNet under fp16 autocast, which casts them the same."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    dtype = bare_unet(unet).conv_in.weight.dtype
    if prompt_embeds.shape[0] != batch:
        prompt_embeds, pooled_embeds = prompt_embeds.expand(batch, -1, -1), pooled_embeds.expand(batch, -1)
    conditions = {"text_embeds": pooled_embeds.to(latents.device, dtype),
                  "time_ids": time_ids.to(latents.device, dtype)}
    prediction = unet(noisy.to(dtype), timesteps, prompt_embeds.to(latents.device, dtype),
                      added_cond_kwargs=conditions, return_dict=False)[0]
    target = training_target(scheduler, latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def sample_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of image ``index`` of ``prompt``: fixed by (seed, prompt text, index) alone, so every method, and
    any subset or order of prompts, starts from the same noise. (infer_lily.py does not seed its sampling.)"""
    digest = hashlib.sha256(f"{seed}\x1f{prompt}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Sample:
    """One generated image and what reproduces it."""

    prompt: str
    index: int
    seed: int
    image: Any  # PIL.Image.Image


def by_prompt(samples: Sequence[Sample]) -> dict[str, list[Any]]:
    """prompt -> its images in index order: what the metrics and the grid take."""
    grouped: dict[str, list[Sample]] = {}
    for sample in samples:
        grouped.setdefault(sample.prompt, []).append(sample)
    return {prompt: [s.image for s in sorted(group, key=lambda s: s.index)] for prompt, group in grouped.items()}


@torch.no_grad()
def decode_latents(vae: nn.Module, image_processor: Any, latents: torch.Tensor) -> list[Any]:
    """PIL images from the UNet's latents, decoded in the VAE's own dtype. The pipeline would hand fp16 latents to
    an fp32 VAE unchanged (a dtype error outside autocast); the official run decodes in fp32 as well (the base
    VAE's ``force_upcast``), so pass an fp32 VAE (the :func:`load_vae` default)."""
    parameter = next(vae.parameters())
    latents = latents.to(parameter.device, parameter.dtype)
    shift, scale = _latent_statistic(vae, "latents_mean"), _latent_statistic(vae, "latents_std")
    if shift is not None and scale is not None:
        latents = latents * scale.to(latents) / vae.config.scaling_factor + shift.to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    return image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")


def sample_images(parts: SDXLParts, unet: nn.Module, prompts: Sequence[str], images_per_prompt: int, seed: int,
                  steps: int = 50, guidance: float = 5.0, height: int | None = None, width: int | None = None,
                  vae: nn.Module | None = None, images_per_call: int = 1, cfg_routing: str = "joint") -> list[Sample]:
    """Generate ``images_per_prompt`` images for each prompt with the SDXL pipeline (default size: the UNet's
    sample size x the VAE factor, 1024 for SDXL). infer_lily.py makes one image per pipeline call; classifier-free
    guidance runs the empty-prompt (zero) and the prompt conditions as one batch of two, and Lily's official
    routing averages its router's softmax over that batch and every token. ``images_per_call`` > 1 batches images
    into one call, each its own routing group (``cfg_routing`` joint: its two CFG rows together, as one image per
    call pools them; per_half: each row alone), which a router honours in per-group mode (Lily
    ``eval_pooling: sample``). Each image has its own CPU generator (:func:`sample_seed`), so its noise depends
    neither on the device nor on the batch. ``vae`` replaces the parts' VAE for decoding (infer_lily.py decodes
    with the base model's)."""
    if images_per_prompt < 1 or steps < 1 or images_per_call < 1:
        raise ConfigError("sampling needs images_per_prompt, steps and images_per_call of at least 1.")
    pipe = parts.pipeline(unet=bare_unet(unet).eval(), vae=vae)  # eval: no dropout, and evaluation routing
    warn_if_batch_coupled(unet, images_per_call, "infer_lily.py's one image per pipeline call")
    jobs = [(prompt, index, sample_seed(seed, prompt, index))
            for prompt in prompts for index in range(images_per_prompt)]
    samples = []
    for start in tqdm(range(0, len(jobs), images_per_call), desc="sample", leave=False):
        batch = jobs[start:start + images_per_call]
        generators = [torch.Generator(device="cpu").manual_seed(image_seed) for _, _, image_seed in batch]
        with routing_groups(unet, sampling_groups(len(batch), uses_cfg(unet, guidance), cfg_routing)):
            latents = pipe(prompt=[prompt for prompt, _, _ in batch], num_inference_steps=steps,
                           guidance_scale=guidance, generator=generators, height=height, width=width,
                           output_type="latent").images
        images = decode_latents(pipe.vae, pipe.image_processor, latents)
        samples += [Sample(prompt, index, image_seed, image)
                    for (prompt, index, image_seed), image in zip(batch, images)]
    return samples


def uses_cfg(unet: nn.Module, guidance: float) -> bool:
    """Whether the SDXL pipeline runs classifier-free guidance (its own rule: scale > 1 and no guidance embedding)."""
    return guidance > 1 and getattr(bare_unet(unet).config, "time_cond_proj_dim", None) is None


def sampling_groups(images: int, cfg: bool, cfg_routing: str) -> torch.Tensor:
    """The routing groups of one pipeline call of ``images`` images: with CFG its rows are
    ``[uncond_0..uncond_{n-1}, cond_0..cond_{n-1}]``."""
    if not cfg:
        return row_groups(images)
    return cfg_groups(images) if cfg_routing == "joint" else row_groups(2 * images)
