"""Lily: equivalence with upstream peft, each variant against a direct computation of its formula, sharing,
init, the config checks, and save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LilyConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from lilyexp.errors import ConfigError
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel, mix_experts
from lilyexp.params import count_parameters

QKV = ["q_proj", "k_proj", "v_proj"]


def tiny_llama(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2))


def lily(model=None, **kwargs) -> LilyVariantModel:
    settings = {"r": 4, "ne_1": 2, "num_B": 3, "target_modules": QKV, "init_weights": False, **kwargs}
    return LilyVariantModel(model if model is not None else tiny_llama(), LilyVariantConfig(**settings))


def upstream_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def our_name(name: str) -> str:
    return name.removeprefix("model.")


def test_upstream_equivalence_of_outputs_and_gradients():
    base = tiny_llama()
    upstream = get_peft_model(copy.deepcopy(base), LilyConfig(r=4, stride_A=2, num_B=3, scaling=0.5,
                                                               target_modules=QKV, init_weights=False))
    ours = lily(copy.deepcopy(base), scaling=0.5)
    ours.model.load_state_dict({upstream_name(k): v for k, v in upstream.state_dict().items()})
    x = torch.randint(0, 100, (3, 9))
    a, b = upstream(input_ids=x).logits, ours(input_ids=x).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    a.square().sum().backward()
    b.square().sum().backward()
    grads_a = {upstream_name(n): p.grad for n, p in upstream.named_parameters() if p.requires_grad}
    grads_b = {our_name(n): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 21
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


def direct_batch_mean(h, experts, router):
    probabilities = torch.softmax(h @ router.weight.T, -1)  # per token
    w = probabilities.mean(dim=(0, 1))
    return sum(h @ (w[e] * experts[e]) for e in range(len(experts)))


def direct_eq2(h, experts, router):
    out = []
    for sample in h:  # S = softmax(sum_i (x' R^T)_i), one mixture per input
        w = torch.softmax((sample @ router.weight.T).sum(0), -1)
        out.append(sum(w[e] * (sample @ experts[e]) for e in range(len(experts))))
    return torch.stack(out)


def direct_token(h, experts, router):
    out = torch.zeros(*h.shape[:-1], experts.shape[-1])
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            w = torch.softmax(h[b, t] @ router.weight.T, -1)
            out[b, t] = sum(w[e] * (h[b, t] @ experts[e]) for e in range(len(experts)))
    return out


@pytest.fixture
def routing_inputs():
    torch.manual_seed(1)
    h, experts = torch.randn(3, 5, 4), torch.randn(6, 4, 7)
    router = torch.nn.Linear(4, 6, bias=False)
    return h, experts, router


@pytest.mark.parametrize("pooling,direct", [("batch_mean", direct_batch_mean), ("sample_sum", direct_eq2),
                                            ("token", direct_token)])
def test_each_pooling_matches_its_formula(pooling, direct, routing_inputs):
    h, experts, router = routing_inputs
    torch.testing.assert_close(mix_experts(h, experts, router, pooling), direct(h, experts, router))


def test_eq2_and_official_pooling_differ(routing_inputs):
    h, experts, router = routing_inputs
    official, paper = mix_experts(h, experts, router, "batch_mean"), mix_experts(h, experts, router, "sample_sum")
    assert (official - paper).abs().max() > 1e-3
    # official routing couples samples: sample 0 alone routes differently; Eq. 2 does not
    assert not torch.allclose(mix_experts(h[:1], experts, router, "batch_mean"), official[:1])
    torch.testing.assert_close(mix_experts(h[:1], experts, router, "sample_sum"), paper[:1])


def test_no_router_ablation_is_the_mean_of_experts(routing_inputs):
    h, experts, _ = routing_inputs
    torch.testing.assert_close(mix_experts(h, experts, None, "batch_mean"), h @ experts.mean(0))


def test_padding_mask_leaves_pad_tokens_out_of_routing(routing_inputs):
    h, experts, router = routing_inputs
    mask = torch.ones(3, 5)
    mask[0, :2] = 0  # left padding on sample 0
    masked = mix_experts(h, experts, router, "batch_mean", mask)
    tokens = torch.cat([h[0, 2:], h[1], h[2]])[None]
    expected_mix = torch.softmax(tokens @ router.weight.T, -1).mean(dim=(0, 1))
    torch.testing.assert_close(masked, h @ torch.einsum("e,eio->io", expected_mix, experts))
    eq2 = mix_experts(h, experts, router, "sample_sum", mask)
    torch.testing.assert_close(eq2[0, 2:], direct_eq2(h[:1, 2:], experts, router)[0])


def test_model_reads_the_attention_mask_for_routing():
    model = lily(mask_padding=True)
    x = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    with_mask = model(input_ids=x, attention_mask=mask).logits
    changed = x.clone()
    changed[1, :3] = 7  # padding content must not move the routing
    torch.testing.assert_close(model(input_ids=changed, attention_mask=mask).logits[0], with_mask[0])


def test_sharing_is_real_and_counted_once():
    model = lily(ne_1=2, num_B=3)
    layers = model.model.model.layers
    q = [layer.self_attn.q_proj for layer in layers]
    assert q[0].lily_A["default"] is q[1].lily_A["default"] and q[1].lily_A["default"] is not q[2].lily_A["default"]
    assert all(layer.lily_B["default"] is q[0].lily_B["default"] for layer in q)
    assert len({id(layer.lily_router["default"]) for layer in q}) == 4
    assert q[0].lily_B["default"] is not layers[0].self_attn.k_proj.lily_B["default"]
    # n_A·C_in·r + ne·r·C_out + L·r·ne per target (the official sharing rule): q (32->32), k and v (32->16)
    expected = sum(2 * 32 * 4 + 3 * 4 * out + 4 * 4 * 3 for out in (32, 16, 16))
    assert count_parameters(model, [])["trainable"] == expected


@pytest.mark.parametrize("router,routers_per_target", [("layer", 4), ("A", 2), ("group", 1)])
def test_router_placements(router, routers_per_target):
    model = lily(router=router)
    q = [layer.self_attn.q_proj for layer in model.model.model.layers]
    assert len({id(layer.lily_router["default"]) for layer in q}) == routers_per_target
    assert all(group["routers"] == routers_per_target for group in model.summary())


def test_official_stride_can_build_more_a_than_ne_1():
    model = lily(tiny_llama(layers=4), ne_1=3)  # stride 4 // 3 = 1: four A's, as the official rule gives
    assert {g["num_A"] for g in model.summary()} == {4} and {g["stride"] for g in model.summary()} == {1}


def test_more_a_than_layers_is_refused():
    with pytest.raises(ConfigError, match="ne_1=5 asks for more A's than the 4"):
        lily(ne_1=5)


@pytest.mark.parametrize("bad,match", [({"router": "nope"}, "router"), ({"pooling": "max"}, "pooling"),
                                       ({"ne_1": 0}, "ne_1"), ({"dropout": 1.5}, "dropout"),
                                       ({"per_target": {"q_proj": {"alpha": 2}}}, "unknown keys")])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        LilyVariantConfig(r=4, target_modules=QKV, **bad)


def test_zero_init_leaves_outputs_unchanged():
    base = tiny_llama()
    x = torch.randint(0, 100, (2, 5))
    expected = base(input_ids=x).logits
    torch.testing.assert_close(lily(copy.deepcopy(base), init_weights=True)(input_ids=x).logits, expected)
    assert not torch.allclose(lily(copy.deepcopy(base), init_weights=False)(input_ids=x).logits, expected)


def test_scaling_switch_and_dropout():
    base = tiny_llama()
    x = torch.randint(0, 100, (2, 5))
    plain = lily(copy.deepcopy(base), scaling=1.0).eval()
    torch.manual_seed(3)
    ignored = lily(copy.deepcopy(base), scaling=7.0, apply_scaling=False).eval()
    ignored.model.load_state_dict(plain.model.state_dict())
    torch.testing.assert_close(ignored(input_ids=x).logits, plain(input_ids=x).logits)
    dropped = lily(copy.deepcopy(base), dropout=0.5)
    dropped.model.load_state_dict(plain.model.state_dict())
    torch.testing.assert_close(dropped.eval()(input_ids=x).logits, plain(input_ids=x).logits)
    assert not torch.allclose(dropped.train()(input_ids=x).logits, plain(input_ids=x).logits)


def test_per_target_rank_and_experts():
    model = lily(per_target={"k_proj": {"r": 2, "num_B": 5}, "v_proj": {"use_router": False}})
    groups = {g["target"]: g for g in model.summary()}
    assert (groups["k_proj"]["r"], groups["k_proj"]["num_B"], groups["q_proj"]["r"]) == (2, 5, 4)
    assert groups["v_proj"]["routers"] == 0
    v = model.model.model.layers[0].self_attn.v_proj
    assert not list(v.lily_router["default"].parameters())


def test_save_and_load_round_trip(tmp_path):
    model = lily()
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(v.numel() for v in stored.values()) == count_parameters(model, [])["trainable"]  # shared once
    reloaded = LilyVariantModel.load_pretrained(tiny_llama(), tmp_path / "adapter")
    x = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)
    assert reloaded.model.model.layers[1].self_attn.q_proj.lily_A["default"] is \
        reloaded.model.model.layers[0].self_attn.q_proj.lily_A["default"]


def test_corrupt_or_mismatched_adapter_is_a_clear_error(tmp_path):
    lily().save_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError, match="does not match"):
        LilyVariantModel.load_pretrained(tiny_llama(layers=2), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read"):
        LilyVariantModel.load_pretrained(tiny_llama(), tmp_path / "adapter")


def tiny_vit(**kwargs):
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=5, **{
        "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, **kwargs})


KVMLP = dict(target_modules=["qkv", "mlp"], slices={"qkv": {"parts": ["q", "k", "v"], "adapt": ["k", "v"]}},
             parallel=["mlp"])


def test_vit_kvmlp_adapts_exactly_k_v_and_the_mlp():
    base = tiny_vit()
    model = LilyVariantModel(copy.deepcopy(base), LilyVariantConfig(
        r=4, ne_1=2, num_B=2, init_weights=False, per_target={"mlp": {"r": 8, "activation": "relu"}}, **KVMLP))
    x = torch.rand(2, 3, 32, 32)
    block_in = torch.randn(2, 17, 32)
    fused = model.model.blocks[0].attn.qkv
    adapted, original = fused(block_in), base.blocks[0].attn.qkv(block_in)
    torch.testing.assert_close(adapted[..., :32], original[..., :32])  # q untouched
    assert not torch.allclose(adapted[..., 32:64], original[..., 32:64])
    assert not torch.allclose(adapted[..., 64:], original[..., 64:])
    mlp = model.model.blocks[0].mlp
    delta = mlp(block_in) - base.blocks[0].mlp(block_in)
    branch = mlp.lily_parallel["default"]
    hidden = torch.relu(branch.lily_A["default"](block_in))
    assert branch.lily_A["default"].weight.shape == (8, 32)  # hidden 2r with a ReLU (official MLP adapter)
    experts = branch.lily_B["default"].weight.reshape(2, 8, 32)
    torch.testing.assert_close(delta, mix_experts(hidden, experts, branch.lily_router["default"], "batch_mean"),
                               atol=1e-5, rtol=1e-5)
    groups = {g["target"]: g for g in model.summary()}
    assert set(groups) == {"qkv.k", "qkv.v", "mlp"} and groups["mlp"]["r"] == 8 and groups["qkv.k"]["num_A"] == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lily_" in n for n in trainable)
    model(x).sum().backward()


def test_vit_b16_kvmlp_count_matches_the_official_formula():
    import timm
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    for ne, expected in ((2, 198_144), (3, 297_216), (4, 396_288)):  # the official formula, r = 16
        model = LilyVariantModel(copy.deepcopy(vit), LilyVariantConfig(
            r=16, ne_1=ne, num_B=ne, per_target={"mlp": {"r": 32, "activation": "relu"}}, **KVMLP))
        assert count_parameters(model, [])["trainable"] == expected


def test_a_non_linear_target_must_be_declared_parallel():
    with pytest.raises(ConfigError, match="parallel"):
        LilyVariantModel(tiny_vit(), LilyVariantConfig(r=4, ne_1=2, num_B=2, target_modules=["mlp"]))


def test_half_precision_backbone_gets_fp32_adapters_still_shared():
    from lilyexp.methods.lily import LilyMethod
    base = tiny_llama().to(torch.float16)
    model = LilyMethod(LilyVariantConfig(r=4, ne_1=2, num_B=3,
                                         target_modules=["q_proj", "k_proj", "v_proj"])).apply(base)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.float16}
    q = [layer.self_attn.q_proj for layer in model.model.model.layers]
    assert q[0].lily_A["default"] is q[1].lily_A["default"] and \
        all(proj.lily_B["default"] is q[0].lily_B["default"] for proj in q)
    out = model(input_ids=torch.randint(0, 100, (2, 5))).logits
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("placement,adapted_parts,has_mlp", [("qv", (0, 2), False), ("qvmlp", (0, 2), True),
                                                            ("mlp", (), True)])
def test_vit_placements_adapt_exactly_their_parts(placement, adapted_parts, has_mlp):
    """Table 15's placements: qv leaves k alone, mlp leaves the whole qkv alone."""
    from conftest import compose_run

    from lilyexp.compose import build_method
    cfg = compose_run([f"experiment=table15/lily_{placement}", "backbone=tiny_vit", "method.ne_1=2",
                       "method.zero_init_B=false"])
    base = tiny_vit()
    model = build_method(cfg.method).apply(copy.deepcopy(base))
    block_in = torch.randn(2, 17, 32)
    adapted, original = model.model.blocks[0].attn.qkv(block_in), base.blocks[0].attn.qkv(block_in)
    for part in range(3):
        same = torch.allclose(adapted[..., 32 * part:32 * (part + 1)], original[..., 32 * part:32 * (part + 1)])
        assert same == (part not in adapted_parts), (placement, "qkv"[part])
    mlp_changed = not torch.allclose(model.model.blocks[0].mlp(block_in), base.blocks[0].mlp(block_in))
    assert mlp_changed == has_mlp


def test_routing_groups_regroup_only_the_batch_mean_pooling(routing_inputs):
    """Groups say which rows pool together under batch_mean; per-sample and per-token pooling ignore them."""
    from lilyexp.methods.lily import RowGroups

    h, experts, router = routing_inputs
    groups = RowGroups.of(torch.zeros(h.shape[0], dtype=torch.long))
    for pooling in ("sample_sum", "token"):
        torch.testing.assert_close(mix_experts(h, experts, router, pooling, None, groups),
                                   mix_experts(h, experts, router, pooling))
