"""Subject-driven text-to-image fine-tuning (the DreamBooth paradigm of the official
subject-driven-generation/train_lily.py and infer_lily.py) on the shared training loop: the instance prompt is
encoded once and the instance photos' VAE posteriors cached once (a latent is still sampled every step, as the
official script does); each step is SDXL's denoising loss on a noised latent; there is no validation, so the last
weights are kept. After training, images are sampled for the task's prompts with seeded generators, saved as PNG
beside the record, and scored with the task's metrics (DINO, CLIP-I, CLIP-T).

The backbone's processor holds everything besides the adapted UNet (VAE, text encoders, schedulers:
:class:`lilyexp.backbones.sdxl.SDXLParts`); the task supplies the data, prompts and scoring
(:class:`lilyexp.tasks.dreambooth.DreamBoothTask`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from lilyexp.contracts import DiffusionTask, for_tasks
from lilyexp.recipes.core import Objective, Outcome, RecipeInputs
from lilyexp.recipes.devices import make_accelerator
from lilyexp.methods.routing import routing_record
from lilyexp.recipes.diffusion_steps import (add_time_ids, cache_latents, encode_prompts, sample_images,
                                             training_loss)
from lilyexp.recipes.loop import fit
from lilyexp.records import run_metrics

if TYPE_CHECKING:
    from lilyexp.backbones.sdxl import SDXLParts


class InstanceBatches:
    """The cached training inputs: latent posteriors, prompt embeddings and time ids of the instance photos."""

    def __init__(self, parts: SDXLParts, task: DiffusionTask, device: torch.device):
        parts.to_device(device)
        self.latents = cache_latents(parts.vae, task.instance.pixel_values)
        self.embeds, self.pooled = encode_prompts(parts, [task.instance.prompt])
        self.time_ids = add_time_ids(task.instance.time_id_inputs, device=device)
        self.scheduler = parts.noise_scheduler

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(indices)}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        index = batch["index"].cpu()
        latents = self.latents.sample(index).to(self.time_ids.device)
        return training_loss(model, self.scheduler, latents, self.embeds, self.pooled, self.time_ids[index])


REFERENCE_SIDE = 512


def save_samples(samples: list, reference: Any, folder: Path, root: Path) -> list[dict]:
    """PNG files ``<prompt number>-<image number>.png`` and ``reference.png`` (the first real photo, for figures,
    shrunk to REFERENCE_SIDE pixels: a full-size photo would be megabytes in every record's folder);
    the record lists each sample with its prompt and seed."""
    folder.mkdir(parents=True, exist_ok=True)
    thumbnail = reference.copy()
    thumbnail.thumbnail((REFERENCE_SIDE, REFERENCE_SIDE))
    thumbnail.save(folder / "reference.png")
    prompts = list(dict.fromkeys(sample.prompt for sample in samples))
    listed = []
    for sample in samples:
        path = folder / f"{prompts.index(sample.prompt):02d}-{sample.index}.png"
        sample.image.save(path)
        listed.append({"prompt": sample.prompt, "index": sample.index, "seed": sample.seed,
                       "path": str(path.relative_to(root))})
    return listed


def generate_and_score(inputs: RecipeInputs, accelerator: Accelerator) -> tuple[dict, dict]:
    """Sample the task's prompts with the trained UNet, save the images, score them."""
    task, parts, run = inputs.task, inputs.processor, inputs.run
    settings = task.sampling
    unet = accelerator.unwrap_model(inputs.model).eval()
    samples = sample_images(parts, unet, task.prompts, settings.images_per_prompt, inputs.seed, settings.steps,
                            settings.guidance, task.resolution, task.resolution, parts.sample_vae,
                            settings.images_per_call, settings.cfg_routing)
    folder = run.side_file("images")
    listed = save_samples(samples, task.real_images[0], folder, run.record_path.parent) \
        if accelerator.is_main_process else []
    metrics, per_prompt = task.evaluate("test", [(s.prompt, s.image) for s in samples], task.real_images)
    routing = routing_record(unet, "each image's CFG rows" if settings.cfg_routing == "joint" else "each row")
    return metrics, {"samples": listed, "per_prompt": per_prompt, "sampling": {**vars(settings), "routing": routing},
                     "prompt": task.instance.prompt}


@for_tasks(DiffusionTask)
def run(inputs: RecipeInputs) -> Outcome:
    accelerator = make_accelerator(inputs.trainer)
    batches = InstanceBatches(inputs.processor, inputs.task, accelerator.device)
    objective = Objective(plan_size=len(inputs.task.instance), collate=batches.collate, compute_loss=batches.loss,
                          validate=lambda model: {}, select_metric="train/loss", select_mode="min")
    result = fit(inputs, objective, accelerator)
    metrics, details = generate_and_score(inputs, accelerator)
    record_metrics = run_metrics(final=metrics, rule="last", metric="train/loss", mode="min", best={},
                                 history=result.history)
    extra = {"dreambooth": details, "data": {"train": len(inputs.task.instance), "prompts": len(inputs.task.prompts)},
             **result.record_fields()}
    return Outcome(record_metrics, extra)
