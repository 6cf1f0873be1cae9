"""The DreamBooth paper's metrics (Ruiz et al., 2023, Sec. 4.1), used to compare Lily with LoRA on the subjects of
the paper's Fig. 2:

* DINO: mean cosine similarity over all (generated, real) pairs of the ViT-S/16 DINO embeddings (the CLS token of
  the last hidden state of ``facebook/dino-vits16``) -- subject fidelity;
* CLIP-I: the same over CLIP image embeddings (``openai/clip-vit-large-patch14`` by default);
* CLIP-T: mean cosine similarity between each generated image's CLIP image embedding and its prompt's CLIP text
  embedding -- prompt fidelity.

The official Lily code ships no metric (it only saves images), so these follow the DreamBooth paper. The maths is
in small functions over embedding tensors; the embedders wrap transformers models from hub ids or local paths, or
tiny random ones built from configs for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from lilyexp.backbones.location import unavailable
from lilyexp.errors import ConfigError
from lilyexp.placement import training_device

DINO_MODEL = "facebook/dino-vits16"
CLIP_MODEL = "openai/clip-vit-large-patch14"
DINO_SWITCH = "task.metrics.dino=/path/to/dino-vits16"
CLIP_SWITCH = "task.metrics.clip=/path/to/clip-vit-large-patch14"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities between the rows of ``a`` (n, d) and of ``b`` (m, d)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_pairwise_cosine(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO / CLIP-I: the mean over every (generated, real) pair."""
    return cosine_matrix(generated, real).mean().item()


def mean_matched_cosine(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: the mean over aligned rows (image i with the text of its prompt)."""
    if images.shape[0] != texts.shape[0]:
        raise ConfigError(f"CLIP-T pairs each image with its prompt: {images.shape[0]} images, {texts.shape[0]} texts.")
    return F.cosine_similarity(images.float(), texts.float(), dim=-1).mean().item()


def _features(output: Any) -> torch.Tensor:
    """transformers < 5 returns projected features as a tensor, 5.x as ``pooler_output`` of a model output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DinoEmbedder:
    """DINO embeddings: the CLS token of a ``ViTModel``'s last hidden state (after its final layer norm)."""

    def __init__(self, model: torch.nn.Module, processor: Any, batch_size: int = 16):
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        device, chunks = next(self.model.parameters()).device, []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")
            pixels = pixels["pixel_values"].to(device, next(self.model.parameters()).dtype)
            chunks.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(chunks)


class ClipEmbedder:
    """CLIP image and text embeddings (the projected features CLIP compares)."""

    def __init__(self, model: torch.nn.Module, image_processor: Any, tokenizer: Any, batch_size: int = 16):
        self.model, self.image_processor, self.tokenizer = model.eval(), image_processor, tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def images(self, images: Sequence[Any]) -> torch.Tensor:
        parameter, chunks = next(self.model.parameters()), []
        for start in range(0, len(images), self.batch_size):
            pixels = self.image_processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")
            pixels = pixels["pixel_values"].to(parameter.device, parameter.dtype)
            chunks.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
        output = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _features(output).float().cpu()


OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite"]


def resolve_metric_model(name_or_path: str, switch: str) -> str:
    """Before training: a local folder as it is, a hub id as its local snapshot (downloaded now when the hub is
    reachable, else the cache); an id that can be had neither way is the one-sentence refusal, not a failure after
    hours of training. ``random`` (the tiny test models) needs nothing."""
    if name_or_path == "random" or Path(name_or_path).expanduser().is_dir():
        return name_or_path
    from huggingface_hub import snapshot_download

    try:  # the PyTorch weights only: no TF/Flax copies, and no .bin where safetensors exist
        folder = snapshot_download(name_or_path, ignore_patterns=OTHER_FRAMEWORKS + ["*.bin"])
        if not list(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(name_or_path, ignore_patterns=OTHER_FRAMEWORKS)
        return folder
    except Exception as exc:  # offline and not cached, unknown id, gated: every way of not having it
        raise unavailable(name_or_path, exc, switch) from None


def _load(cls: Any, name_or_path: str, switch: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        raise unavailable(name_or_path, exc, switch) from None


def load_dino(name_or_path: str = DINO_MODEL, device: str | torch.device | None = None) -> DinoEmbedder:
    from transformers import AutoImageProcessor, ViTModel

    model = _load(ViTModel, name_or_path, DINO_SWITCH, add_pooling_layer=False)
    return DinoEmbedder(model.to(device or training_device()), _load(AutoImageProcessor, name_or_path, DINO_SWITCH))


def load_clip(name_or_path: str = CLIP_MODEL, device: str | torch.device | None = None) -> ClipEmbedder:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = _load(CLIPModel, name_or_path, CLIP_SWITCH)
    return ClipEmbedder(model.to(device or training_device()), _load(CLIPImageProcessor, name_or_path, CLIP_SWITCH),
                        _load(AutoTokenizer, name_or_path, CLIP_SWITCH))


def tiny_dino(seed: int = 0) -> DinoEmbedder:
    """A random 1-layer ViT with DINO's preprocessing at 32 px, for tests."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return DinoEmbedder(model, processor)


def tiny_clip(seed: int = 0) -> ClipEmbedder:
    """A random 1-layer CLIP (text and vision) with CLIP's preprocessing at 32 px and a code-built tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from lilyexp.backbones.sdxl import clip_like_tokenizer

    tokenizer = clip_like_tokenizer()
    layer = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**layer, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config={**layer, "image_size": 32, "patch_size": 8}, projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return ClipEmbedder(model, processor, tokenizer)


@dataclass
class PromptScores:
    prompt: str
    images: int
    dino: float
    clip_i: float
    clip_t: float


@dataclass
class SubjectScores:
    """Per-prompt scores and the subject's averages over all generated images (equal to the mean over prompts when
    every prompt has the same number of images)."""

    per_prompt: list[PromptScores]
    dino: float
    clip_i: float
    clip_t: float

    def as_dict(self) -> dict[str, Any]:
        return {"dino": self.dino, "clip_i": self.clip_i, "clip_t": self.clip_t,
                "per_prompt": [vars(scores) for scores in self.per_prompt]}


def score_subject(generated: Mapping[str, Sequence[Any]], real: Sequence[Any], dino: DinoEmbedder,
                  clip: ClipEmbedder, texts: Mapping[str, str] | None = None) -> SubjectScores:
    """DINO, CLIP-I and CLIP-T of the images generated per prompt against the subject's real photos. ``texts`` maps
    a prompt to the text CLIP-T compares with (default: the prompt itself)."""
    if not real or not generated or any(len(images) == 0 for images in generated.values()):
        raise ConfigError("scoring needs at least one real image and one generated image per prompt.")
    real_dino, real_clip = dino(real), clip.images(real)
    per_prompt, all_dino, all_clip, all_text = [], [], [], []
    for prompt, images in generated.items():
        gen_dino, gen_clip = dino(images), clip.images(images)
        text = clip.texts([(texts or {}).get(prompt, prompt)]).expand(len(images), -1)
        per_prompt.append(PromptScores(prompt, len(images), mean_pairwise_cosine(gen_dino, real_dino),
                                       mean_pairwise_cosine(gen_clip, real_clip), mean_matched_cosine(gen_clip, text)))
        all_dino.append(gen_dino)
        all_clip.append(gen_clip)
        all_text.append(text)
    gen_clip = torch.cat(all_clip)
    return SubjectScores(per_prompt, mean_pairwise_cosine(torch.cat(all_dino), real_dino),
                         mean_pairwise_cosine(gen_clip, real_clip), mean_matched_cosine(gen_clip, torch.cat(all_text)))
