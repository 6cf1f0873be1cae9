"""Baselines and details as their sources ran them: the ViT LoRA of vit/lora.py (separate q and v branches on the
fused qkv output, dropout 0.1), AdaptFormer of vit/adaptformer.py (no biases, dropout 0.1, 147,456 parameters), the
heads of the official ViT (reset_classifier) and Vim (trunc-normal 0.02, zero bias) code, timm's weight-decay
exemption for the Vim run, the HF Trainer's validation schedule for the commonsense cells, and the batch layout
every record states."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from hydra.utils import instantiate

from lilyexp.compose import build_method
from lilyexp.methods.sliced_lora import SlicedLoraMethod
from lilyexp.recipes.core import TrainerConfig, build_optimizer

from conftest import compose_run


def tiny_vit(num_classes: int = 5):
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                             patch_size=8, embed_dim=32, depth=2, num_heads=2)


def test_the_vit_lora_baseline_adapts_q_and_v_slices_only():
    model = SlicedLoraMethod(["qkv"], ["head"], r=4, dropout=0.1).apply(tiny_vit())
    attention = model.blocks[0].attn.qkv
    x = torch.randn(2, 17, 32)
    base = attention.base_layer(x)
    torch.testing.assert_close(attention(x), base)  # the up-projections start at zero
    with torch.no_grad():
        for branch in attention.branches.values():
            branch.up.weight.normal_()
    model.eval()
    q, k, v = (attention(x) - base).split(32, dim=-1)
    assert q.abs().sum() > 0 and v.abs().sum() > 0 and torch.equal(k, torch.zeros_like(k))
    branch = attention.branches["q"]
    torch.testing.assert_close(q, branch.up(branch.down(x)))  # s = 1, no bias, dropout off in eval
    assert branch.dropout.p == 0.1 and branch.down.bias is None and branch.up.bias is None


def test_the_vit_lora_baseline_has_the_reference_rows_count():
    cfg = compose_run(["backbone=vit", "task=vtab", "experiment=table4/lora"])
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    build_method(cfg.method).apply(vit)
    assert sum(p.numel() for p in vit.parameters() if p.requires_grad) == 294_912  # 12 x 2 x (768·8 + 8·768)


def test_adaptformer_is_the_official_bias_free_bottleneck():
    cfg = compose_run(["backbone=tiny_vit", "task=vtab", "method=adaptformer"])
    model = build_method(cfg.method).apply(tiny_vit())
    bottleneck = model.blocks[0].adaptformer
    assert bottleneck.down.bias is None and bottleneck.up.bias is None and bottleneck.dropout.p == 0.1


def test_the_vit_head_is_reset_as_the_official_code_does():
    cfg = compose_run(["backbone=tiny_vit"])
    torch.manual_seed(3)
    ours = instantiate(cfg.backbone.load, num_classes=7).model.head
    torch.manual_seed(3)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=8,
                                  embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.1)
    reference.reset_classifier(7)
    torch.testing.assert_close(ours.weight, reference.head.weight)
    assert ours.bias.abs().sum() > 0  # nn.Linear's uniform bias, not timm's zeros


def test_the_vim_head_is_trunc_normal_with_zero_bias():
    cfg = compose_run(["backbone=tiny_vim"])
    head = instantiate(cfg.backbone.load, num_classes=50).model.head
    assert torch.equal(head.bias, torch.zeros_like(head.bias))
    assert 0.017 < head.weight.std() < 0.023 and abs(head.weight.mean()) < 0.005  # N(0, 0.02²) (bounds at ±2)


def test_timms_weight_decay_exemption_is_a_switch():
    model = tiny_vit()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head")
    exempt = build_optimizer(model, TrainerConfig(weight_decay=0.1, weight_decay_1d=False), ["head"])
    decays = {tuple(p.shape): g["weight_decay"] for g in exempt.param_groups for p in g["params"]}
    assert decays == {(5, 32): 0.1, (5,): 0.0}
    everything = build_optimizer(model, TrainerConfig(weight_decay=0.1), ["head"])
    assert {g["weight_decay"] for g in everything.param_groups} == {0.1}
    cfg = compose_run(["experiment=table5/lily_l"])
    assert cfg.trainer.weight_decay_1d is False


def test_the_commonsense_cells_validate_as_the_hf_trainer_did():
    for experiment in ("table1/lily_in", "table2/lily"):
        trainer = compose_run([f"experiment={experiment}"]).trainer
        assert (trainer.eval_batch_size, trainer.eval_every, trainer.eval_at_end) == (8, 200, False)


@pytest.mark.slow
def test_without_eval_at_end_the_last_step_is_not_validated_and_the_batch_layout_is_recorded(tiny_run, tmp_path):
    from lilyexp.run import execute
    path = execute(compose_run(["backbone=tiny_llama", "trainer.max_steps=5", "trainer.eval_every=2",
                                "trainer.eval_at_end=false", *tiny_run], tmp_path))
    record = json.loads(path.read_text())
    assert [h["step"] for h in record["metrics"]["history"]] == [2, 4]
    assert record["batch"] == {"processes": 1, "micro_batch_per_process": 4, "grad_accum": 1, "global_batch": 4}


def test_table15_says_what_ran():
    from lilyexp.tables.build import load_spec
    spec = load_spec("table15")
    assert any("the same for every task" in note for note in spec["notes"])
    assert not any(row.get("choose") for row in spec["rows"])
    for name in ("lily_qv", "lily_kvmlp"):
        method = compose_run([f"experiment=table15/{name}"]).method
        assert (method.ne_1, method.ne_2, method.s) == (12, 4, 1.0)
