"""Baselines and accounting: LoRA/PiSSA/MiLoRA initialisation, full fine-tuning and linear probing, any peft
config, the dead-adapter check, and the parameter counts the official configs imply on the real shapes."""

from __future__ import annotations

import json
import copy

import pytest
import torch
from hydra.utils import instantiate
from peft import LoraConfig
from transformers import AutoModelForCausalLM, FalconMambaConfig, LlamaConfig

from lilyexp.compose import build_method, method_node
from lilyexp.errors import ConfigError
from lilyexp.methods.baselines import FullFineTune, LinearProbe
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel
from lilyexp.methods.milora import MiLoRAMethod
from lilyexp.methods.peft_method import PeftMethod
from lilyexp.params import count_parameters
from lilyexp.recipes.loop import check_every_parameter_got_a_gradient

from conftest import compose_run

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)
FALCON_MAMBA_7B = dict(vocab_size=65024, hidden_size=4096, num_hidden_layers=64, state_size=16, expand=2,
                       conv_kernel=4, time_step_rank=256)


def meta_model(config) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2))


def test_lily_on_llama3_8b_has_the_official_count():
    model = LilyVariantModel(meta_model(LlamaConfig(**LLAMA3_8B)), LilyVariantConfig(
        r=16, ne_1=4, num_B=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert count_parameters(model, [])["trainable"] == 1_185_792


def test_lora_r32_on_llama3_8b_matches_dora():
    model = PeftMethod(LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "up_proj",
                                                                        "down_proj"])).apply(meta_model(LlamaConfig(**LLAMA3_8B)))
    assert count_parameters(model, [])["trainable"] == 56_623_104


def test_falcon_mamba_counts():
    lily = LilyVariantModel(meta_model(FalconMambaConfig(**FALCON_MAMBA_7B)), LilyVariantConfig(
        r=40, ne_1=4, num_B=4, target_modules=["in_proj"]))
    assert count_parameters(lily, [])["trainable"] == 3_287_040
    lora = PeftMethod(LoraConfig(r=2, target_modules=["in_proj", "dt_proj"])).apply(
        meta_model(FalconMambaConfig(**FALCON_MAMBA_7B)))
    assert count_parameters(lora, [])["trainable"] == 3_702_784


TINY_OVERRIDES = {"lora": [], "pissa": [], "milora": [], "lily": ["method.ne_1=2"]}  # tiny_llama has 2 layers


@pytest.mark.parametrize("method", sorted(TINY_OVERRIDES))
def test_methods_leave_the_output_unchanged_at_init(method):
    extra = TINY_OVERRIDES[method]
    cfg = compose_run(["backbone=tiny_llama", f"method={method}", "method.dropout=0.0", "method.r=4", *extra])
    base = tiny_llama()
    x = torch.randint(0, 100, (2, 6))
    expected = base(input_ids=x).logits
    cfg.method.target_modules = ["q_proj", "k_proj", "v_proj"]
    model = build_method(cfg.method).apply(copy.deepcopy(base))
    torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) or ("lily_" in n) for n in trainable)


def lora_factors(model, name="model.layers.0.self_attn.q_proj"):
    layer = model.get_submodule(f"base_model.model.{name}")
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.get_base_layer().weight


def test_pissa_and_milora_take_opposite_ends_of_the_spectrum():
    base = tiny_llama()
    W = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    U, S, Vh = torch.linalg.svd(W)
    config = dict(r=4, lora_alpha=4, target_modules=["q_proj"])
    pissa = PeftMethod(LoraConfig(init_lora_weights="pissa", **config)).apply(copy.deepcopy(base))
    milora = MiLoRAMethod(LoraConfig(**config)).apply(copy.deepcopy(base))
    for model, components in ((pissa, slice(0, 4)), (milora, slice(-4, None))):
        A, B, residual = lora_factors(model)
        torch.testing.assert_close(residual + B @ A, W, atol=1e-5, rtol=1e-5)  # W reproduced at init
        projector = Vh[components].T @ Vh[components]
        torch.testing.assert_close(A @ projector, A, atol=1e-4, rtol=1e-4)  # A's rows span that subspace
        torch.testing.assert_close(torch.linalg.svdvals(B @ A)[:4], S[components], atol=1e-4, rtol=1e-4)


def test_milora_rank_above_the_weight_rank_is_refused():
    with pytest.raises(ConfigError, match="exceeds"):
        MiLoRAMethod(LoraConfig(r=64, target_modules=["q_proj"])).apply(tiny_llama())


def test_full_and_linear_probe_choose_their_parameters():
    model = FullFineTune().apply(tiny_llama())
    assert all(p.requires_grad for p in model.parameters())
    probe = LinearProbe(["lm_head"]).apply(tiny_llama())
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"lm_head.weight"}
    with pytest.raises(ConfigError, match="head"):
        LinearProbe([])


def test_any_peft_config_through_the_generic_method():
    cfg = compose_run(["backbone=tiny_llama", "method=peft", "method.config._target_=peft.LoraConfig",
                       "+method.config.use_dora=true", "+method.config.r=2"])
    model = build_method(cfg.method).apply(tiny_llama())
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_negative_rank_is_refused_before_any_model():
    cfg = compose_run(["backbone=tiny_llama", "method=lora", "method.r=-1"])
    with pytest.raises(ConfigError, match="positive"):
        PeftMethod(instantiate(method_node(cfg.method)["config"]))


def tiny_falcon_mamba() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FalconMambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                              state_size=4, time_step_rank=4, use_mambapy=False))


@pytest.mark.parametrize("adapt", [
    lambda m: PeftMethod(LoraConfig(r=2, target_modules=["in_proj", "dt_proj"])).apply(m),
    lambda m: LilyVariantModel(m, LilyVariantConfig(r=2, ne_1=1, num_B=2, target_modules=["in_proj", "dt_proj"])),
])
def test_dead_adapter_on_a_directly_read_weight_is_caught(adapt):
    model = adapt(tiny_falcon_mamba())
    x = torch.randint(0, 50, (2, 5))
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(ConfigError, match="dt_proj"):
        check_every_parameter_got_a_gradient(model)


def test_live_adapters_pass_the_gradient_check():
    model = LilyVariantModel(tiny_falcon_mamba(), LilyVariantConfig(r=2, ne_1=1, num_B=2, target_modules=["in_proj"]))
    x = torch.randint(0, 50, (2, 5))
    model(input_ids=x, labels=x).loss.backward()
    check_every_parameter_got_a_gradient(model)


def test_svd_initialised_factors_checkpoint_as_contiguous_tensors(tmp_path):
    """safetensors refuses strided tensors; MiLoRA's (and PiSSA's) SVD factors come back column-major."""
    from safetensors.torch import save_file

    from lilyexp.params import trainable_state
    model = MiLoRAMethod(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj"])).apply(tiny_llama())
    A, B, residual = lora_factors(model)
    assert A.is_contiguous() and B.is_contiguous() and residual.is_contiguous()
    state = trainable_state(model)
    assert all(t.is_contiguous() for t in state.values())
    save_file(state, tmp_path / "trainable.safetensors")


def test_a_peft_method_carries_its_own_name_into_its_cell_and_record(tiny_run, tmp_path):
    """Two peft methods (LoHa and LoRA through method=peft) are two cells, not one 'peft' that collides."""
    from lilyexp.records import RunContext
    from lilyexp.run import execute

    loha = ["backbone=tiny_llama", "method=peft", "method.name=loha", "method.config._target_=peft.LoHaConfig",
            "+method.config.r=4", "trainer.max_steps=1", *tiny_run]
    cfg = compose_run(loha, tmp_path)
    plain = RunContext.create(compose_run(["backbone=tiny_llama", "method=peft", *tiny_run], tmp_path), [])
    named = RunContext.create(cfg, loha)
    assert named.identity["method"] == "loha" and named.identity != plain.identity
    record = json.loads(execute(cfg, loha).read_text())
    assert record["status"] == "finished" and "-loha-seed0-" in record["run_name"]
    with pytest.raises(ConfigError, match="method.name is fixed by the method= choice"):
        execute(compose_run(["backbone=tiny_llama", "method=lora", "method.name=x"], tmp_path),
                ["method=lora", "method.name=x"])
