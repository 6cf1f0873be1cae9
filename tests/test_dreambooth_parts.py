"""DreamBooth x SDXL building blocks: adapter sizes on the real SDXL UNet (meta device), Lily on a tiny SDXL,
the training loss, the official CFG-batch routing against a direct computation, seeded sampling and adapter
save/load, the metrics by hand, the grid, the data module and its input errors. CPU, offline, tiny models."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from lilyexp.backbones.sdxl import (SDXL_UNET_CONFIG, TARGETS, load_pipeline, load_vae, meta_unet,  # noqa: E402
                                    tiny_pipeline)
from lilyexp.errors import BackboneUnavailable, ConfigError  # noqa: E402
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel  # noqa: E402
from lilyexp.methods.routing import evaluation_routing  # noqa: E402
from lilyexp.recipes import diffusion_steps  # noqa: E402
from lilyexp.recipes.diffusion_steps import (add_time_ids, by_prompt, cache_latents, encode_prompts,  # noqa: E402
                                             sample_images, sample_seed, training_loss)
from lilyexp.tasks import dreambooth as db  # noqa: E402
from lilyexp.figures.grid import abbreviate, make_grid, save_grid  # noqa: E402
from lilyexp.tasks.dreambooth_metrics import (load_dino, mean_matched_cosine, mean_pairwise_cosine,  # noqa: E402
                                              score_subject, tiny_clip, tiny_dino)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LILYEXP_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data" / "dreambooth"
needs_data = pytest.mark.skipif(not (DATA / db.TABLE_FILE).is_file(),
                                reason=f"the DreamBooth dataset is not at {DATA} (set LILYEXP_SHARED)")
PROMPT = "A picture of a wolf_plushie in the jungle"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def official_lily(unet: torch.nn.Module, seed: int = 0, eval_pooling: str = "batch") -> LilyVariantModel:
    """train_lily.py's Lily: r 4, ne_1 4, ne_2 4, s 1, random B, on to_q/to_k/to_v/to_out.0."""
    torch.manual_seed(seed)
    config = LilyVariantConfig(r=4, ne_1=4, num_B=4, scaling=1.0, init_weights=False, target_modules=list(TARGETS),
                               eval_pooling=eval_pooling)
    return LilyVariantModel(unet, config)


def lily_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lily_" in name}


def unet_inputs(batch: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 77, 32, generator=g),
            {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.full((batch, 6), 32.0)})


# ---- sizes on the real SDXL base UNet --------------------------------------------------------------------------

def test_parameter_counts_on_the_real_sdxl_unet():
    lily = official_lily(meta_unet())
    assert sum(p.numel() for p in lily_tensors(lily).values()) == 468_736
    groups = {(g["target"], g["shape"]): (g["layers"], g["stride"], g["num_A"]) for g in lily.summary()}
    expected = {(640, 640): {"to_q": (20, 5, 4), "to_out.0": (20, 5, 4), "to_k": (10, 2, 5), "to_v": (10, 2, 5)},
                (640, 2048): {"to_k": (10, 2, 5), "to_v": (10, 2, 5)},
                (1280, 1280): {"to_q": (120, 30, 4), "to_out.0": (120, 30, 4),
                               "to_k": (60, 15, 4), "to_v": (60, 15, 4)},
                (1280, 2048): {"to_k": (60, 15, 4), "to_v": (60, 15, 4)}}
    assert groups == {(t, shape): v for shape, targets in expected.items() for t, v in targets.items()}
    assert sum(layers for layers, _, _ in groups.values()) == 560

    from peft import LoraConfig, inject_adapter_in_model

    lora = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                              target_modules=list(TARGETS)), meta_unet())
    assert sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) == 5_806_080
    assert SDXL_UNET_CONFIG["projection_class_embeddings_input_dim"] == 1280 + 6 * 256


# ---- Lily on the tiny SDXL -------------------------------------------------------------------------------------

def test_lily_on_tiny_unet_starts_active_and_trains_every_tensor():
    parts = tiny_pipeline()
    sample, t, text, added = unet_inputs()
    with torch.no_grad():
        base = parts.unet(sample, t, text, added_cond_kwargs=added).sample
    lily = official_lily(parts.unet)
    tensors = lily_tensors(parts.unet)
    assert tensors and all(p.requires_grad for p in tensors.values())
    assert all(p.abs().sum() > 0 for n, p in tensors.items() if "lily_B" in n)  # random B, as the official code
    adapted = parts.unet(sample, t, text, added_cond_kwargs=added).sample
    assert not torch.allclose(adapted, base, atol=1e-4)
    loss = training_loss(lily, parts.noise_scheduler, sample, text, added["text_embeds"], added["time_ids"],
                         torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in tensors.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing[:3]}"
    frozen = [n for n, p in parts.unet.named_parameters() if "lily_" not in n and p.requires_grad]
    assert not frozen


def test_encode_prompts_matches_the_sdxl_pipeline():
    parts = tiny_pipeline()
    embeds, pooled = encode_prompts(parts, [PROMPT, "a photo of wolf_plushie"])
    reference, _, reference_pooled, _ = parts.pipeline().encode_prompt([PROMPT, "a photo of wolf_plushie"],
                                                                       device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77, 32) and pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, reference)
    torch.testing.assert_close(pooled, reference_pooled)


@needs_data
def test_training_loss_falls_on_a_real_subject():
    parts = tiny_pipeline()
    data = db.prepare_instance_data(DATA, "dog", resolution=32, vae_scale_factor=parts.vae_scale_factor)
    embeds, pooled = encode_prompts(parts, [data.prompt])
    cache, time_ids = cache_latents(parts.vae, data.pixel_values), add_time_ids(data.time_id_inputs)
    official_lily(parts.unet)
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    every = range(len(cache))

    def held_out_loss() -> float:  # the same latents, noise and timesteps before and after training
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return np.mean([training_loss(parts.unet, parts.noise_scheduler, cache.sample(every, g), embeds, pooled,
                                          time_ids, g).item() for _ in range(4)])

    before, g = held_out_loss(), torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = training_loss(parts.unet, parts.noise_scheduler, cache.sample(every, g), embeds, pooled, time_ids, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert held_out_loss() < before - 0.005


def test_latent_cache_samples_like_the_vae_posterior():
    parts = tiny_pipeline()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    cache = cache_latents(parts.vae, pixels)
    direct = parts.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(cache.sample([0, 1], torch.Generator().manual_seed(7)),
                               direct * parts.vae.config.scaling_factor)


# ---- the official CFG-batch routing ----------------------------------------------------------------------------

def test_cfg_batch_routing_pools_both_halves():
    parts = tiny_pipeline()
    official_lily(parts.unet)
    name, layer = next((n, m) for n, m in parts.unet.named_modules()
                       if n.endswith("attn2.to_k") and hasattr(m, "lily_A"))
    calls = []
    handle = layer.register_forward_hook(lambda module, args, output: calls.append((args[0].detach(), output.detach())))
    sample_images(parts, parts.unet, [PROMPT], 1, seed=0, steps=1)
    handle.remove()
    x, output = calls[0]
    assert x.shape[0] == 2  # [unconditional (zeros); conditional], one pipeline call per prompt
    A, R = layer.lily_A["default"].weight, layer.lily_router["default"].weight
    B = layer.lily_B["default"].weight.reshape(4, 4, -1)
    h = x @ A.T
    per_token = torch.softmax(h @ R.T, dim=-1)
    weights = per_token.mean(dim=(0, 1))  # over BOTH halves and every token
    expected = layer.base_layer(x) + 1.0 * (h @ torch.einsum("e,eio->io", weights, B))
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(h[0], torch.zeros_like(h[0]))  # SDXL's zero negative prompt: a uniform router on that half
    torch.testing.assert_close(weights, (torch.full((4,), 0.25) + per_token[1].mean(0)) / 2)
    assert not torch.allclose(weights, per_token[1].mean(0), atol=1e-4), f"{name}: halves should matter"


# ---- sampling and the adapter round trip -----------------------------------------------------------------------

def pixels(samples) -> np.ndarray:
    return np.stack([np.asarray(s.image) for s in samples])


def test_sampling_is_seeded_and_a_saved_lily_adapter_reproduces_it(tmp_path):
    parts = tiny_pipeline()
    lily = official_lily(parts.unet)
    prompts = [PROMPT, "A picture of a red wolf_plushie"]
    first = sample_images(parts, lily, prompts, 2, seed=0, steps=2)
    assert [(s.prompt, s.index) for s in first] == [(p, i) for p in prompts for i in range(2)]
    assert [s.seed for s in first] == [sample_seed(0, p, i) for p in prompts for i in range(2)]
    assert first[0].image.size == (32, 32)
    assert by_prompt(first) == {p: [s.image for s in first if s.prompt == p] for p in prompts}
    direct = parts.pipeline(parts.unet)(prompt=PROMPT, num_inference_steps=2, guidance_scale=5.0,
                                        generator=torch.Generator().manual_seed(first[0].seed)).images[0]
    np.testing.assert_allclose(np.asarray(first[0].image), np.asarray(direct), atol=1)  # our decode = the pipeline's
    np.testing.assert_array_equal(pixels(first), pixels(sample_images(parts, lily, prompts, 2, seed=0, steps=2)))
    assert not np.array_equal(pixels(first[:1]), pixels(sample_images(parts, lily, prompts[:1], 1, seed=1, steps=2)))
    lily.save_pretrained(tmp_path / "adapter")
    fresh = tiny_pipeline()
    reloaded = LilyVariantModel.load_pretrained(fresh.unet, tmp_path / "adapter")
    np.testing.assert_array_equal(pixels(first), pixels(sample_images(fresh, reloaded, prompts, 2, seed=0, steps=2)))


def sampled_latents(monkeypatch, parts, unet, prompts, **kwargs) -> torch.Tensor:
    """The latents sample_images decodes, in job order (pixels would hide differences below one 8-bit step)."""
    captured = []

    def keep(vae, processor, latents):
        captured.append(latents)
        return [None] * len(latents)
    monkeypatch.setattr(diffusion_steps, "decode_latents", keep)
    sample_images(parts, unet, prompts, 2, seed=0, steps=2, **kwargs)
    return torch.cat(captured)


@pytest.mark.parametrize("cfg_routing,guidance", [("joint", 5.0), ("per_half", 5.0), ("joint", 1.0)])
def test_batched_sampling_with_per_group_routing_equals_one_image_per_call(monkeypatch, cfg_routing, guidance):
    prompts = [PROMPT, "A picture of a red wolf_plushie"]
    options = dict(guidance=guidance, cfg_routing=cfg_routing)
    official, per_group = (official_lily(tiny_pipeline().unet),
                           official_lily(tiny_pipeline().unet, eval_pooling="sample"))
    assert (evaluation_routing(official), evaluation_routing(per_group)) == ("per_call", "per_group")
    one_per_call = sampled_latents(monkeypatch, tiny_pipeline(), official, prompts, images_per_call=1, **options)
    batched = sampled_latents(monkeypatch, tiny_pipeline(), per_group, prompts, images_per_call=3, **options)
    if cfg_routing == "joint" or guidance <= 1:  # the groups one image per call pools
        torch.testing.assert_close(batched, one_per_call, atol=1e-5, rtol=1e-5)
    else:  # conditional rows routed alone: not the official mixture
        assert (batched - one_per_call).abs().max() > 1e-4
    coupled = sampled_latents(monkeypatch, tiny_pipeline(), official, prompts, images_per_call=3, **options)
    assert (coupled - one_per_call).abs().max() > 1e-4  # the official coupling: a call's images share one mixture


# ---- metrics ---------------------------------------------------------------------------------------------------

def test_metric_maths_by_hand():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    real = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    # cos(g0, r0) = 1/sqrt2, cos(g0, r1) = 1, cos(g1, r0) = 1/sqrt2, cos(g1, r1) = 0
    assert mean_pairwise_cosine(generated, real) == pytest.approx((2 / math.sqrt(2) + 1) / 4)
    texts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert mean_matched_cosine(generated, texts) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    with pytest.raises(ConfigError):
        mean_matched_cosine(generated, texts[:1])


def test_score_subject_averages_the_pure_functions():
    dino, clip = tiny_dino(), tiny_clip()
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))  # noqa: E731
    real, generated = [image(), image()], {"a red toy": [image(), image()], "a toy in the snow": [image(), image()]}
    scores = score_subject(generated, real, dino, clip)
    for prompt_scores, (prompt, images) in zip(scores.per_prompt, generated.items()):
        assert prompt_scores.dino == pytest.approx(mean_pairwise_cosine(dino(images), dino(real)), abs=1e-6)
        assert prompt_scores.clip_i == pytest.approx(mean_pairwise_cosine(clip.images(images), clip.images(real)),
                                                     abs=1e-6)
        text = clip.texts([prompt]).expand(len(images), -1)
        assert prompt_scores.clip_t == pytest.approx(mean_matched_cosine(clip.images(images), text), abs=1e-6)
    for metric in ("dino", "clip_i", "clip_t"):  # equal images per prompt: the mean of the per-prompt values
        assert getattr(scores, metric) == pytest.approx(np.mean([getattr(s, metric) for s in scores.per_prompt]),
                                                        abs=1e-6)
    assert set(scores.as_dict()) == {"dino", "clip_i", "clip_t", "per_prompt"}


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")
def test_unreachable_models_are_one_sentence():
    for load, switch in ((load_pipeline, "backbone.load.name_or_path="), (load_vae, "backbone.load.vae_name_or_path="),
                         (load_dino, "task.metrics.dino=")):
        with pytest.raises(BackboneUnavailable) as error:
            load("nobody/no-such-model")
        assert "'nobody/no-such-model'" in str(error.value) and switch in str(error.value)
        assert "\n" not in str(error.value)


# ---- grid ------------------------------------------------------------------------------------------------------

def test_grid_layout_and_png(tmp_path):
    prompts = [PROMPT, "A picture of a red wolf_plushie", "A picture of a wolf_plushie floating in an ocean of milk"]
    assert abbreviate(prompts, max_chars=20) == ["wolf_plushie in the…", "red wolf_plushie", "wolf_plushie floati…"]
    solid = lambda color: Image.new("RGB", (32, 32), color)  # noqa: E731
    rows = {"Lily": [solid("red")] * 3, "LoRA": [solid("blue")] * 3}
    grid = make_grid(solid("green"), rows, prompts, cell=64, label_width=40, header=30)
    assert grid.size == (40 + 64 * 4, 30 + 64 * 2)
    assert grid.getpixel((40 + 32, 30 + 32)) == (0, 128, 0)  # the reference, first row
    assert grid.getpixel((40 + 64 + 32, 30 + 32)) == (255, 0, 0)  # Lily's first sample
    assert grid.getpixel((40 + 3 * 64 + 32, 30 + 64 + 32)) == (0, 0, 255)  # LoRA's last sample
    assert grid.getpixel((40 + 32, 30 + 64 + 32)) == (255, 255, 255)  # below the reference: blank
    path = save_grid(grid, tmp_path / "figs" / "fig2.png")
    assert Image.open(path).format == "PNG" and Image.open(path).size == grid.size
    with pytest.raises(ConfigError, match="LoRA"):
        make_grid(solid("green"), {"LoRA": [solid("blue")]}, prompts)


# ---- data ------------------------------------------------------------------------------------------------------

TABLE = """Classes

subject_name,class
wolf_plushie,stuffed animal
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


@pytest.fixture
def data_root(tmp_path) -> Path:
    (tmp_path / db.TABLE_FILE).write_text(TABLE)
    (tmp_path / "wolf_plushie").mkdir()
    Image.new("RGB", (60, 40), (200, 10, 10)).save(tmp_path / "wolf_plushie" / "01.jpg")
    Image.new("RGB", (40, 40), (10, 10, 200)).save(tmp_path / "wolf_plushie" / "00.png")
    return tmp_path


def test_prompts_from_the_table(data_root):
    table = db.read_prompt_table(data_root / db.TABLE_FILE)
    assert db.instance_prompt("wolf_plushie", table) == "a photo of wolf_plushie"
    assert db.instance_prompt("wolf_plushie", table, "rare_token") == "a sks stuffed animal"
    assert db.evaluation_prompts("wolf_plushie", table) == [PROMPT, "A picture of a red wolf_plushie"]
    assert db.evaluation_prompts("dog", table, "rare_token", token="zwx") == ["a zwx dog wearing a red hat"]
    assert db.evaluation_prompts("dog", table) == ["A picture of a dog in the jungle", "A picture of a red dog"]


def test_clip_t_compares_with_the_class_noun_in_place_of_the_identifier(data_root):
    table = db.read_prompt_table(data_root / db.TABLE_FILE)
    assert db.evaluation_prompts("wolf_plushie", table, class_noun=True) == [
        "A picture of a stuffed animal in the jungle", "A picture of a red stuffed animal"]
    assert db.evaluation_prompts("dog", table, "rare_token", class_noun=True) == ["a dog wearing a red hat"]
    task = db.DreamBoothTask("wolf_plushie", str(data_root), resolution=16, vae_scale_factor=2,
                             metrics={"dino": "random", "clip": "random"})
    assert task.clip_texts == {PROMPT: "A picture of a stuffed animal in the jungle",
                               "A picture of a red wolf_plushie": "A picture of a red stuffed animal"}
    images = {prompt: [Image.new("RGB", (32, 32), (120, 30, 30))] for prompt in task.prompts}
    by_class = task.evaluate("test", [(p, i) for p, images in images.items() for i in images], task.real_images)[0]
    raw = db.DreamBoothTask("wolf_plushie", str(data_root), resolution=16, vae_scale_factor=2, clip_text="prompt",
                            metrics={"dino": "random", "clip": "random"})
    assert raw.clip_texts == {}
    by_prompt = raw.evaluate("test", [(p, i) for p, images in images.items() for i in images], raw.real_images)[0]
    assert by_class["test/dino"] == by_prompt["test/dino"] and by_class["test/clip_t"] != by_prompt["test/clip_t"]
    with pytest.raises(ConfigError, match="task.clip_text must be one of"):
        db.DreamBoothTask("wolf_plushie", str(data_root), resolution=16, vae_scale_factor=2, clip_text="caption")


@needs_data
def test_the_real_prompt_table():
    table = db.read_prompt_table(DATA / db.TABLE_FILE)
    assert len(table.classes) == 30 and len(table.object_templates) == 25 and len(table.live_templates) == 25
    assert sorted(s for s in table.classes if table.is_live(s)) == ["cat", "cat2", "dog", "dog2", "dog3", "dog5",
                                                                    "dog6", "dog7", "dog8"]
    prompts = db.evaluation_prompts("robot_toy", table)  # infer_lily.py's list, in its order
    assert prompts[0] == "A picture of a robot_toy in the jungle"
    assert prompts[-1] == "A picture of a cube shaped robot_toy"
    assert "A picture of a robot_toy on top of green grass with sunflowers around it" in prompts
    assert db.evaluation_prompts("dog", table, "rare_token")[10] == "a sks dog wearing a red hat"


def test_preprocessing_crops_once_with_a_seed(data_root):
    first = db.prepare_instance_data(data_root, "wolf_plushie", resolution=32, vae_scale_factor=2, seed=3)
    again = db.prepare_instance_data(data_root, "wolf_plushie", resolution=32, vae_scale_factor=2, seed=3)
    assert first.prompt == "a photo of wolf_plushie" and len(first) == 2
    assert first.pixel_values.shape == (2, 3, 32, 32) and -1 <= first.pixel_values.min() < first.pixel_values.max() <= 1
    square, wide = first.examples  # sorted by name: 00.png, then 01.jpg
    assert square.time_id_inputs == (40, 40, 0, 0, 32, 32)
    top, left = wide.crop_top_left  # 60 x 40 resized to 48 x 32: only a horizontal crop is possible
    assert wide.original_size == (40, 60) and top == 0 and 0 <= left <= 16
    assert first.time_id_inputs == again.time_id_inputs
    assert add_time_ids(first.time_id_inputs).tolist()[1] == [40.0, 60.0, 0.0, float(left), 32.0, 32.0]
    lefts = {db.prepare_instance_data(data_root, "wolf_plushie", 32, 2, seed=s).examples[1].crop_top_left[1]
             for s in range(8)}
    assert len(lefts) > 1  # the crop is random, fixed by the seed


def test_bad_input_is_a_config_error_naming_it(data_root):
    with pytest.raises(ConfigError, match="teapot"):
        db.prepare_instance_data(data_root, "teapot", 32, 2)  # not in the table
    with pytest.raises(ConfigError, match="dog"):
        db.prepare_instance_data(data_root, "dog", 32, 2)  # in the table, no folder
    (data_root / "dog").mkdir()
    (data_root / "dog" / "notes.txt").write_text("no image here")
    with pytest.raises(ConfigError, match="holds no image"):
        db.prepare_instance_data(data_root, "dog", 32, 2)
    whole = data_root / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    (data_root / "dog" / "00.jpg").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(ConfigError, match="00.jpg"):
        db.prepare_instance_data(data_root, "dog", 32, 2)
    with pytest.raises(ConfigError, match="1020"):
        db.prepare_instance_data(data_root, "wolf_plushie", 1020, 8)
    with pytest.raises(ConfigError, match="pixar"):
        db.prepare_instance_data(data_root, "wolf_plushie", 32, 2, style="pixar")
    with pytest.raises(ConfigError, match="prompts_and_classes.txt"):
        db.prepare_instance_data(data_root / "elsewhere", "wolf_plushie", 32, 2)
