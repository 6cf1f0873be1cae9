"""What a run leaves behind: every method's export loads back with ``lilyexp.load_adapter`` and reproduces the
trained model's outputs; LoRA, PiSSA, MiLoRA and the Lily variants upstream peft computes load with
``peft.PeftModel.from_pretrained`` (PiSSA/MiLoRA on the ORIGINAL base weights); upstream peft refuses every other
Lily export instead of loading it untrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, RobertaConfig

import lilyexp
from lilyexp.compose import method_node
from lilyexp.errors import ConfigError

from conftest import compose_run


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=4, num_attention_heads=4,
                                                        num_key_value_heads=2))


def tiny_roberta() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        num_labels=3))


def trained(method, base: torch.nn.Module) -> torch.nn.Module:
    """The method applied and its trainable tensors moved off their initial values (a stand-in for training)."""
    model = method.apply(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def method_and_node(backbone: str, method: str, *overrides: str):
    cfg = compose_run([f"backbone={backbone}", f"method={method}", *overrides])
    node = method_node(cfg.method)
    return instantiate(node), node


CAUSAL = {"lora": ["method.r=4"], "pissa": ["method.r=4", "method.dropout=0.0"],
          "milora": ["method.r=4", "method.dropout=0.0"], "lily": ["method.r=4", "method.ne_1=2", "method.ne_2=3",
                   "method.apply_s=false", "method.eval_pooling=sample"]}  # as the Table 2 cell


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_peft_expressible_exports_load_in_plain_peft_with_the_trained_outputs(name, tmp_path):
    method, node = method_and_node("tiny_llama", name, "method.dropout=0.0", *CAUSAL[name])
    model = trained(method, tiny_llama())
    method.export(model, tmp_path / "adapter", node)
    x = torch.randint(0, 100, (2, 7))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()  # the ORIGINAL weights
    tolerance = 1e-4 if name in ("pissa", "milora") else 1e-5  # the residual route adds rounding
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=tolerance, rtol=0)
    torch.testing.assert_close(lilyexp.load_adapter(tiny_llama(), tmp_path / "adapter").eval()(input_ids=x).logits,
                               model(input_ids=x).logits, atol=tolerance, rtol=0)


def test_a_peft_format_lily_export_is_batch_coupled_in_peft_and_routes_per_sample_in_lilyexps_lily(tmp_path):
    """Upstream peft's Lily pools its router over the whole call: the evaluation treats it as batch-coupled (no
    regrouping, no length-sorted batches). The same export loaded into lilyexp's Lily (the method's own load)
    computes the same outputs and can route each sample on its own."""
    from lilyexp.methods.routing import batch_coupled, evaluation_routing

    method, node = method_and_node("tiny_llama", "lily", "method.dropout=0.0", *CAUSAL["lily"])
    model = trained(method, tiny_llama())
    method.export(model, tmp_path / "adapter", node)
    upstream = lilyexp.load_adapter(tiny_llama(), tmp_path / "adapter").eval()
    assert evaluation_routing(upstream) == "per_call" and batch_coupled(upstream)
    ours = method.load(tiny_llama(), tmp_path / "adapter").eval()
    assert evaluation_routing(ours) == "per_group" and not batch_coupled(ours)
    x = torch.randint(0, 100, (1, 7))
    torch.testing.assert_close(ours(input_ids=x).logits, upstream(input_ids=x).logits, atol=1e-5, rtol=0)


def test_a_classifier_heads_upstream_lily_export_carries_its_head(tmp_path):
    method, node = method_and_node("tiny_roberta", "lily", "method.r=4", "method.ne_1=2", "method.s=0.1")
    model = trained(method, tiny_roberta())
    method.export(model, tmp_path / "adapter", node)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LILY"
    x = torch.randint(0, 100, (3, 9))
    loaded = PeftModel.from_pretrained(tiny_roberta(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=0)


VARIANTS = {  # Lily variants upstream peft does not compute, on the backbones the paper uses them with
    "router per A": ("tiny_llama", ["method.router=A", "method.ne_1=2"], "causal"),
    "no router": ("tiny_llama", ["method.use_router=false", "method.ne_1=2"], "causal"),
    "ViT k/v slices + parallel MLP": ("tiny_vit", [
        "method.ne_1=2", "method.target_modules=[qkv,mlp]", "method.parallel=[mlp]",
        "+method.slices.qkv={parts:[q,k,v],adapt:[k,v]}", "+method.per_target.mlp={r:8,activation:relu}"], "image"),
    "Vim Lily-L": ("tiny_vim", [
        "method.r=8", "method.ne_1=2", "method.router=group", "method.pooling=token",
        "+method.per_target.dt_proj={r:4,num_B:1,use_router:false}",
        "+method.per_target.dt_proj_b={r:4,num_B:1,use_router:false}"], "image"),
}


def base_of(kind: str, backbone: str) -> torch.nn.Module:
    if kind == "causal":
        return tiny_llama()
    cfg = compose_run([f"backbone={backbone}"])
    torch.manual_seed(0)
    return instantiate(cfg.backbone.load, num_classes=4).model


def inputs_of(kind: str) -> dict:
    generator = torch.Generator().manual_seed(2)
    if kind == "causal":
        return {"input_ids": torch.randint(0, 100, (2, 7), generator=generator)}
    return {"x": torch.rand(2, 3, 32, 32, generator=generator)}


def outputs(model, kind: str, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits if kind == "causal" else model(inputs["x"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_lily_variants_are_refused_by_peft_and_loaded_by_lilyexp(variant, tmp_path):
    backbone, overrides, kind = VARIANTS[variant]
    method, node = method_and_node(backbone, "lily", "method.dropout=0.0", *overrides)
    model = trained(method, base_of(kind, backbone))
    method.export(model, tmp_path / "adapter", node)
    with pytest.raises(Exception, match="lilyexp.load_adapter"):
        PeftModel.from_pretrained(base_of(kind, backbone), str(tmp_path / "adapter"))
    loaded = lilyexp.load_adapter(base_of(kind, backbone), tmp_path / "adapter").eval()
    x = inputs_of(kind)
    torch.testing.assert_close(outputs(loaded, kind, x), outputs(model, kind, x), atol=1e-6, rtol=0)
    shared = [p for n, p in loaded.named_parameters(remove_duplicate=False) if "lily_B" in n]
    assert len({id(p) for p in shared}) < len(shared)  # B experts still shared after loading


BASELINES = {"full": ("tiny_vit", []), "linear_probe": ("tiny_vit", []), "adaptformer": ("tiny_vit", []),
             "lora": ("tiny_vit", ["method.r=4"])}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_other_method_round_trips_through_load_adapter(name, tmp_path):
    backbone, overrides = BASELINES[name]
    method, node = method_and_node(backbone, name, *overrides)
    model = trained(method, base_of("image", backbone))
    method.export(model, tmp_path / "adapter", node)
    loaded = lilyexp.load_adapter(base_of("image", backbone), tmp_path / "adapter").eval()
    x = inputs_of("image")
    torch.testing.assert_close(outputs(loaded, "image", x), outputs(model, "image", x), atol=1e-6, rtol=0)


def test_a_corrupt_or_foreign_directory_is_one_sentence(tmp_path):
    method, node = method_and_node("tiny_llama", "lily", "method.ne_1=2", "method.router=A")
    method.export(trained(method, tiny_llama()), tmp_path / "adapter", node)
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read the Lily adapter"):
        lilyexp.load_adapter(tiny_llama(), tmp_path / "adapter")
    with pytest.raises(ConfigError, match="not a readable adapter config"):
        lilyexp.load_adapter(tiny_llama(), tmp_path / "nothing")


def test_a_peft_layout_adapter_whose_weights_do_not_match_is_refused_not_loaded_at_init(tmp_path):
    """peft only warns about missing adapter keys and keeps the initial weights; load_adapter refuses instead."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "q_proj" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="do not match the adapter its adapter_config.json builds"):
        lilyexp.load_adapter(tiny_llama(), tmp_path)


def test_an_export_names_its_published_base_and_carries_a_model_card_and_still_loads_in_peft(tiny_run, tmp_path):
    import json as json_module

    from peft import PeftModel

    from lilyexp.compose import build
    from lilyexp.run import execute

    overrides = ["backbone=tiny_llama", "method=lora", "method.r=4", "trainer.max_steps=1", *tiny_run]
    cfg = compose_run(overrides, tmp_path)
    record = json_module.loads(execute(cfg, overrides).read_text())
    folder = Path(record["adapter"]["path"])
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "base_model:" not in card  # a random-init backbone has no hub id
    assert "| method.r | `4` |" in card and "python -m lilyexp.run backbone=tiny_llama method=lora" in card
    for key, value in record["metrics"]["final"].items():
        if isinstance(value, (int, float)):
            assert f"| {key} | {value:.4g} |" in card
    assert json_module.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    base = build(cfg.backbone.load).model
    loaded = PeftModel.from_pretrained(base, str(folder))
    assert any("lora_A" in name for name, _ in loaded.named_parameters())


def test_a_model_card_names_the_published_base_model():
    from lilyexp.methods.export import model_card

    card = model_card(base="HuggingFaceTB/SmolLM2-135M-Instruct", run_name="x", method="lily",
                      settings={"method.r": 16}, task="commonsense", metrics={"test/accuracy/avg": 0.5},
                      params={"adapter": 10}, command="python -m lilyexp.run method=lily")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and \
        "`HuggingFaceTB/SmolLM2-135M-Instruct`." in card
    assert compose_run(["backbone=smollm2"]).backbone.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
