"""Adapters on Falcon-Mamba's dt_proj take effect (paper Table 1's "Δ+in" rows): transformers' mixer reads
dt_proj.weight directly, lilyexp.backbones.falcon_mamba routes the time step through the wrapping module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, FalconMambaConfig

from lilyexp.backbones.falcon_mamba import route_time_steps_through_dt_proj
from lilyexp.compose import build_method
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel
from lilyexp.methods.peft_method import PeftMethod
from lilyexp.params import count_parameters
from lilyexp.recipes.loop import check_every_parameter_got_a_gradient
from lilyexp.run import execute

from conftest import compose_run
from test_methods import FALCON_MAMBA_7B, meta_model

TOKENS = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny(routed: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FalconMambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                               state_size=4, time_step_rank=4, use_mambapy=False))
    return route_time_steps_through_dt_proj(model) if routed else model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def with_random_lora_B(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    return model


def test_without_an_adapter_on_dt_proj_the_output_is_transformers_own():
    routed = tiny()
    assert torch.equal(logits(routed), logits(tiny(routed=False)))
    assert not hasattr(routed.config, "_is_quantized")  # the model's own (saved) config is untouched


def test_a_lora_on_dt_proj_computes_what_its_merged_weights_compute():
    """An independent check: merged into dt_proj.weight, the LoRA runs on transformers' own path."""
    model = with_random_lora_B(PeftMethod(LoraConfig(r=2, target_modules=["dt_proj"])).apply(tiny()))
    live = logits(model)
    assert not torch.allclose(live, logits(tiny()), atol=1e-3)
    merged = model.merge_and_unload()
    assert type(merged.backbone.layers[0].mixer.dt_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged), live, atol=1e-5, rtol=1e-4)


def test_without_the_routing_the_same_lora_would_not_run():
    model = with_random_lora_B(PeftMethod(LoraConfig(r=2, target_modules=["dt_proj"])).apply(tiny(routed=False)))
    torch.testing.assert_close(logits(model), logits(tiny(routed=False)), atol=1e-6, rtol=0)  # float noise only


@pytest.mark.parametrize("adapt", [
    lambda m: PeftMethod(LoraConfig(r=2, target_modules=["in_proj", "dt_proj"])).apply(m),
    lambda m: LilyVariantModel(m, LilyVariantConfig(r=2, ne_1=1, num_B=2, target_modules=["in_proj", "dt_proj"],
                                                    per_target={"dt_proj": {"r": 2, "num_B": 1, "use_router": False}})),
], ids=["lora", "lily"])
def test_adapters_on_dt_proj_receive_gradients(adapt):
    model = adapt(tiny())
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    check_every_parameter_got_a_gradient(model)
    assert any("dt_proj" in name and p.grad is not None and p.grad.abs().sum() > 0
               for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("experiment,count", [("table1/lora_dt_in", 3_702_784), ("table1/lily_dt_in", 3_655_680),
                                              ("table1/lora_in", 2_621_440), ("table1/lily_in", 3_287_040)])
def test_table1_cells_have_their_parameter_counts_on_the_7b_shapes(experiment, count):
    """LoRA (Δ+in) is the paper's 3,702,784; Lily (Δ+in) our assumed dt_proj adapter (paper: 3.7M in all)."""
    cfg = compose_run([f"experiment={experiment}"])
    model = build_method(cfg.method).apply(meta_model(FalconMambaConfig(**FALCON_MAMBA_7B)))
    assert count_parameters(model, [])["trainable"] == count


def test_a_delta_plus_in_cell_trains_exports_and_evaluates_its_export_alike(tiny_run, tmp_path):
    overrides = ["backbone=tiny_falcon_mamba", "method=lily", "method.ne_1=2",
                 "method.target_modules=[in_proj,dt_proj]", "+method.per_target.dt_proj={r:4,num_B:1,use_router:false}",
                 "trainer.max_steps=2", *tiny_run]
    record = json.loads(execute(compose_run(overrides, tmp_path), overrides).read_text())
    assert record["status"] == "finished" and record["steps"] == 2
    from safetensors.torch import load_file
    exported = load_file(next(Path(record["adapter"]["path"]).glob("*.safetensors")))
    assert any("dt_proj.lily_B" in key and value.abs().max() > 0 for key, value in exported.items())  # trained
    assert "route_time_steps_through_dt_proj(base_model)" in (Path(record["adapter"]["path"]) / "README.md").read_text()
    again = [*overrides, "trainer.max_steps=0", f"method.load_from={record['adapter']['path']}"]
    evaluated = json.loads(execute(compose_run(again, tmp_path / "eval"), again).read_text())
    assert evaluated["metrics"]["final"]["val/loss"] == record["metrics"]["final"]["val/loss"]  # reloaded, it runs
