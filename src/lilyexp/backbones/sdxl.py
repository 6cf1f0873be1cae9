"""Stable Diffusion XL as the DreamBooth experiment of the paper (Fig. 2) uses it: every part of the pipeline
(UNet, VAE, both CLIP text encoders and tokenizers, the DDPM training scheduler and the sampling scheduler),
loaded from the hub or a local copy, or built at toy width from configs for offline tests.

The official training (train_lily.py) loads ``stabilityai/stable-diffusion-xl-base-1.0`` with the
``madebyollin/sdxl-vae-fp16-fix`` VAE: the VAE stays fp32, UNet and text encoders run in fp16, only the UNet is
adapted. :data:`SDXL_UNET_CONFIG` is the base model's UNet config, so adapter parameter counts can be computed on
the meta device without a download (:func:`meta_unet`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lilyexp.backbones import Backbone
from lilyexp.backbones.location import torch_dtype, unavailable
from lilyexp.errors import ConfigError

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"
# The overrides a hub failure names: the config keys the backbone yaml passes to load_pipeline.
BASE_SWITCH = "backbone.load.name_or_path=/path/to/stable-diffusion-xl-base-1.0"
VAE_SWITCH = "backbone.load.vae_name_or_path=/path/to/sdxl-vae-fp16-fix"

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers UNet2DConditionModel arguments).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # text_encoder_2 projection 1280 + 6 time ids x 256
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json (an EulerDiscreteScheduler; the
# official training reads the same file into a DDPMScheduler).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet's self- and cross-attention projections
CLIP_MAX_LENGTH = 77


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("the SDXL backbones need diffusers: pip install 'lilyexp[diffusion]'.") from None
    return diffusers


@dataclass
class SDXLParts:
    """Everything an SDXL DreamBooth run touches. ``noise_scheduler`` (DDPM) adds training noise;
    ``sample_scheduler`` (the model's own, Euler for SDXL base) drives :meth:`pipeline`."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: Any
    tokenizer_2: Any
    noise_scheduler: Any
    sample_scheduler: Any
    sample_vae: nn.Module | None = None  # decodes samples when not ``vae`` (infer_lily.py: the base model's own)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to_device(self, device: torch.device | str) -> "SDXLParts":
        """Move the frozen parts (VAEs, text encoders) to ``device``; the UNet moves with the training loop."""
        for name in ("vae", "text_encoder", "text_encoder_2", "sample_vae"):
            module = getattr(self, name)
            if module is not None:
                module.to(device)
        return self

    @property
    def text_encoders(self) -> tuple[nn.Module, nn.Module]:
        return self.text_encoder, self.text_encoder_2

    @property
    def tokenizers(self) -> tuple[Any, Any]:
        return self.tokenizer, self.tokenizer_2

    def pipeline(self, unet: nn.Module | None = None, vae: nn.Module | None = None):
        """A ``StableDiffusionXLPipeline`` over these parts (``unet``/``vae`` replace the held ones), with a fresh
        copy of the sampling scheduler. No watermarker: the official environment did not install one."""
        diffusers = require_diffusers()
        scheduler = type(self.sample_scheduler).from_config(self.sample_scheduler.config)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae if vae is not None else self.vae, text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2,
            unet=unet if unet is not None else self.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _from_pretrained(cls: Any, name_or_path: str, switch: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        raise unavailable(name_or_path, exc, switch) from None


def load_vae(name_or_path: str = SDXL_VAE, subfolder: str | None = None, dtype: str = "float32",
             switch: str = VAE_SWITCH) -> nn.Module:
    """An ``AutoencoderKL``; ``subfolder='vae'`` reads the VAE inside a full pipeline folder (the base model's own
    VAE, which the official inference script samples with)."""
    vae = _from_pretrained(require_diffusers().AutoencoderKL, name_or_path, switch, subfolder=subfolder,
                           torch_dtype=torch_dtype(dtype))
    return vae.requires_grad_(False)


def load_pipeline(name_or_path: str = SDXL_BASE, vae_name_or_path: str | None = SDXL_VAE, dtype: str = "float16",
                  vae_dtype: str = "float32", variant: str | None = None) -> SDXLParts:
    """The real SDXL parts, frozen (train_lily.py: UNet and text encoders in ``dtype``, the VAE in fp32 "to avoid
    NaN losses"). ``vae_name_or_path=None`` uses the base model's own VAE."""
    diffusers = require_diffusers()
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    weights = {"torch_dtype": torch_dtype(dtype), "variant": variant}
    unet = _from_pretrained(diffusers.UNet2DConditionModel, name_or_path, BASE_SWITCH, subfolder="unet", **weights)
    encoders = [_from_pretrained(cls, name_or_path, BASE_SWITCH, subfolder=folder, dtype=torch_dtype(dtype),
                                 variant=variant)
                for cls, folder in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))]
    tokenizers = [_from_pretrained(AutoTokenizer, name_or_path, BASE_SWITCH, subfolder=folder)
                  for folder in ("tokenizer", "tokenizer_2")]
    sampler = _from_pretrained(diffusers.EulerDiscreteScheduler, name_or_path, BASE_SWITCH, subfolder="scheduler")
    if vae_name_or_path is None:
        vae = load_vae(name_or_path, "vae", vae_dtype, BASE_SWITCH)
    else:
        vae = load_vae(vae_name_or_path, None, vae_dtype)
    for module in (unet, *encoders):
        module.requires_grad_(False)
    return SDXLParts(unet, vae, *encoders, *tokenizers, diffusers.DDPMScheduler.from_config(sampler.config), sampler)


def meta_unet(config: dict[str, Any] | None = None, **task_kwargs: Any) -> nn.Module:
    """The UNet of ``config`` (default: the real SDXL base) on the meta device: shapes only, no memory, no download.
    The task's keyword arguments (``sample_vae``) concern the pipeline's other parts, not the UNet's shapes."""
    diffusers = require_diffusers()
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**copy.deepcopy(config or SDXL_UNET_CONFIG))


def tiny_unet_config() -> dict[str, Any]:
    """The ``tiny_sdxl`` backbone's UNet config (conf/backbone/tiny_sdxl.yaml): SDXL's block layout at toy width."""
    from omegaconf import OmegaConf

    from lilyexp.compose import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / "tiny_sdxl.yaml").load.unet_config)


def clip_like_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = CLIP_MAX_LENGTH):
    """A byte-level tokenizer with CLIP's conventions, built in code: ``<|startoftext|> text <|endoftext|>``, the
    end token the highest id (CLIP pools its hidden state there), padding to 77 with ``pad_token`` (SDXL's first
    tokenizer pads with the end token, the second with ``!``). One token per byte, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=eos))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token=eos,
                                   pad_token=pad_token, model_max_length=max_length)


def tiny_text_encoder(tokenizer: Any, hidden: int, projection: int | None, act: str) -> nn.Module:
    """A 2-layer random CLIP text encoder; with ``projection`` the ``CLIPTextModelWithProjection`` (pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act=act,
        projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval().requires_grad_(False)


def tiny_vae() -> nn.Module:
    """A 2-level ``AutoencoderKL`` (scale factor 2) with SDXL's latent channels and scaling factor."""
    return require_diffusers().AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.13025,
        force_upcast=False).eval().requires_grad_(False)


def tiny_pipeline(seed: int = 0, unet_config: dict[str, Any] | None = None) -> SDXLParts:
    """:class:`SDXLParts` at toy width, from configs only (no download), the same under the same ``seed``: the
    ``tiny_sdxl`` UNet (cross-attention width 32 = 16 + 16 from the two encoders; add-embedding input 80 = the
    second encoder's projection 32 + 6 time ids x 8), a small VAE, two CLIP text encoders with code-built
    tokenizers, SDXL's scheduler settings. Images of 32 x 32 pixels give the UNet its 16 x 16 latents."""
    diffusers = require_diffusers()
    tokenizer, tokenizer_2 = clip_like_tokenizer(), clip_like_tokenizer(pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**(unet_config or tiny_unet_config())).requires_grad_(False)
        vae = tiny_vae()
        text_encoder = tiny_text_encoder(tokenizer, 16, None, "quick_gelu")
        text_encoder_2 = tiny_text_encoder(tokenizer_2, 16, 32, "gelu")
    sampler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    return SDXLParts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                     diffusers.DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG), sampler)


SAMPLE_VAES = ("base", "training")


def load(name_or_path: str = SDXL_BASE, vae_name_or_path: str | None = SDXL_VAE, dtype: str = "float16",
         vae_dtype: str = "float32", variant: str | None = None, sample_vae: str = "base") -> Backbone:
    """The ``sdxl`` backbone: the UNet is the model a method adapts; the other parts travel as its processor.
    ``sample_vae`` (the task's): ``base`` decodes samples with the base model's own VAE, as infer_lily.py does,
    ``training`` with the fp16-fix VAE training used."""
    if sample_vae not in SAMPLE_VAES:
        raise ConfigError(f"sample_vae must be one of {SAMPLE_VAES}, got '{sample_vae}'.")
    parts = load_pipeline(name_or_path, vae_name_or_path, dtype, vae_dtype, variant)
    if sample_vae == "base" and vae_name_or_path is not None:
        parts.sample_vae = load_vae(name_or_path, "vae", vae_dtype, BASE_SWITCH)
    return Backbone(parts.unet, parts)


def tiny(seed: int = 0, unet_config: dict[str, Any] | None = None, sample_vae: str = "base") -> Backbone:
    """The ``tiny_sdxl`` backbone: :func:`tiny_pipeline` (its one VAE serves both roles)."""
    if sample_vae not in SAMPLE_VAES:
        raise ConfigError(f"sample_vae must be one of {SAMPLE_VAES}, got '{sample_vae}'.")
    parts = tiny_pipeline(seed, unet_config)
    return Backbone(parts.unet, parts)
