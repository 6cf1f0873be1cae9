"""The plain-PyTorch Vision Mamba: pinned against a hand-written reference on a tiny config (parameter names and
shapes, the middle class token, both scan directions), the official-checkpoint key check, Lily-S/L on Vim (the
official parameter count, the official dt-adapter gradient switch) and 2-step VTAB runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_run
from lilyexp.backbones.vim import VisionMamba, load_checkpoint
from lilyexp.errors import ConfigError
from lilyexp.methods.lily import LilyMethod, LilyVariantConfig
from lilyexp.params import count_parameters
from lilyexp.run import execute
from test_vtab import vtab_dir  # noqa: F401  (the generated VTAB-1K folder)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, drop_path_rate=0.0)


def tiny(num_classes=5, **kwargs):
    torch.manual_seed(0)
    model = VisionMamba(num_classes=num_classes, **{**TINY, **kwargs})
    with torch.no_grad():  # non-trivial values everywhere, so every term of the reference matters
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight")) or "dt_proj" in name or "D" in name.split(".")[-1]:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_direction(x, z, mixer, suffix):
    """One scan direction of one sample by the recurrence, written out: causal depthwise conv + SiLU, x_proj into
    (dt, B, C), softplus(W_dt dt + b), h_t = exp(δ_t A) h_{t-1} + δ_t B_t u_t, y_t = C_t h_t + D u_t, gated by
    SiLU(z)."""
    conv, x_proj, dt_proj = (getattr(mixer, f"{n}{suffix}") for n in ("conv1d", "x_proj", "dt_proj"))
    length, width = x.shape
    kernel = conv.weight.shape[-1]
    padded = torch.cat([torch.zeros(kernel - 1, width), x])
    u = F.silu(torch.stack([(padded[t:t + kernel] * conv.weight[:, 0, :].T).sum(0) + conv.bias for t in range(length)]))
    dt, B, C = torch.split(u @ x_proj.weight.T, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    delta = F.softplus(dt @ dt_proj.weight.T + dt_proj.bias)
    A = -torch.exp(getattr(mixer, f"A{suffix}_log"))
    h, ys = torch.zeros(width, mixer.d_state), []
    for t in range(length):
        h = torch.exp(delta[t][:, None] * A) * h + delta[t][:, None] * B[t][None, :] * u[t][:, None]
        ys.append((h @ C[t] + getattr(mixer, f"D{suffix}") * u[t]) * F.silu(z[t]))
    return torch.stack(ys)


def reference_forward(model, image):
    tokens = model.patch_embed.proj(image[None]).flatten(2).transpose(1, 2)[0]  # (16, 32)
    tokens = torch.cat([tokens[:8], model.cls_token[0], tokens[8:]]) + model.pos_embed[0]  # class token at 16 // 2
    residual, hidden = None, tokens
    for layer in model.layers:
        residual = hidden if residual is None else residual + hidden
        mixer = layer.mixer
        x, z = (rms(residual, layer.norm.weight) @ mixer.in_proj.weight.T).chunk(2, dim=-1)
        forward = reference_direction(x, z, mixer, "")
        backward = reference_direction(x.flip(0), z.flip(0), mixer, "_b").flip(0)
        hidden = ((forward + backward) / 2) @ mixer.out_proj.weight.T
    final = rms(residual + hidden, model.norm_f.weight)
    return model.head(final[8])


def test_architecture_matches_the_hand_written_reference():
    model = tiny()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(images)
        reference = torch.stack([reference_forward(model, image) for image in images])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    assert model.cls_position == 8 and model.pos_embed.shape == (1, 17, 32)


def test_parameter_names_and_shapes_are_the_official_checkpoints():
    with torch.device("meta"):
        vim_s = VisionMamba(num_classes=1000)
    shapes = {k: tuple(v.shape) for k, v in vim_s.state_dict().items()}
    layer = {k.removeprefix("layers.0."): v for k, v in shapes.items() if k.startswith("layers.0.")}
    assert layer == {
        "mixer.in_proj.weight": (1536, 384), "mixer.out_proj.weight": (384, 768), "norm.weight": (384,),
        **{f"mixer.{module}{s}.{param}": shape for s in ("", "_b") for module, param, shape in (
            ("conv1d", "weight", (768, 1, 4)), ("conv1d", "bias", (768,)), ("x_proj", "weight", (56, 768)),
            ("dt_proj", "weight", (768, 24)), ("dt_proj", "bias", (768,)))},
        "mixer.A_log": (768, 16), "mixer.A_b_log": (768, 16), "mixer.D": (768,), "mixer.D_b": (768,)}
    assert {k for k in shapes if not k.startswith("layers.")} == {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm_f.weight",
        "head.weight", "head.bias"}
    assert shapes["pos_embed"] == (1, 197, 384) and len([k for k in shapes if k.endswith("mixer.in_proj.weight")]) == 24
    assert 25_000_000 < sum(p.numel() for p in vim_s.parameters()) < 26_500_000  # "26M" (Table 5)


def test_checkpoint_keys_are_all_checked(tmp_path):
    source = tiny(num_classes=1000)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "vim.pth"
    import argparse
    # as DeiT-style training saves
    torch.save({"model": state, "epoch": 299, "args": argparse.Namespace(lr=1e-2)}, path)
    target = tiny(num_classes=7)
    load_checkpoint(target, path)  # the 1000-class head is dropped, the new one kept
    torch.testing.assert_close(target.layers[1].mixer.A_b_log, source.layers[1].mixer.A_b_log)
    assert target.head.out_features == 7
    for name, broken in (("missing", {k: v for k, v in state.items() if k != "layers.1.mixer.D_b"}),
                         ("unexpected", {**state, "layers.0.mixer.rope.freqs": torch.zeros(3)}),
                         ("wrong shape", {**state, "pos_embed": torch.zeros(1, 16, 32)})):
        torch.save({"model": broken}, path)
        with pytest.raises(ConfigError, match=name):
            load_checkpoint(tiny(), path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read the Vim checkpoint"):
        load_checkpoint(tiny(), path)


DT = {"r": 4, "num_B": 1, "use_router": False, "dropout": 0.0, "detach_input": True}


def lily_on_vim(model, detach=True, r=8, ne=5):
    dt = {**DT, "detach_input": detach}
    return LilyMethod(LilyVariantConfig(r=r, ne_1=len(model.layers), num_B=ne, router="group", pooling="token",
                                        dropout=0.1, apply_scaling=False, init_weights=False,
                                        target_modules=["in_proj", "dt_proj", "dt_proj_b"],
                                        per_target={"dt_proj": dt, "dt_proj_b": dt})).apply(model)


def test_lily_l_on_vim_s_has_the_official_parameter_count():
    with torch.device("meta"):
        model = lily_on_vim(VisionMamba(num_classes=0))
    # vim/lily.sh's configuration, by the official parameter layout
    assert count_parameters(model, [])["trainable"] == 145_960
    groups = {g["target"]: g for g in model.summary()}
    assert groups["in_proj"]["routers"] == 1 and groups["in_proj"]["num_A"] == 24  # one router, no A sharing
    assert groups["dt_proj"]["num_B"] == groups["dt_proj_b"]["num_B"] == 1 and groups["dt_proj"]["routers"] == 0


def test_official_dt_adapter_gradient_leaves_the_adapter_term_out_upstream():
    images = torch.rand(2, 3, 32, 32)
    grads = {}
    for detach in (True, False):
        base = tiny()
        torch.manual_seed(1)  # the same adapter initialisation both times
        model = lily_on_vim(base, detach=detach, r=4, ne=2)
        model.eval()  # no dropout: the two forwards are identical
        model(images).sum().backward()
        mixer = model.model.layers[1].mixer
        grads[detach] = {"adapter": mixer.dt_proj.lily_A["default"].weight.grad.clone(),
                         "upstream": model.model.layers[0].mixer.in_proj.lily_A["default"].weight.grad.clone()}
    torch.testing.assert_close(grads[True]["adapter"], grads[False]["adapter"])  # ΔW's own gradient is exact
    assert not torch.allclose(grads[True]["upstream"], grads[False]["upstream"])  # upstream sees W_dt only


@pytest.mark.slow
@pytest.mark.parametrize("experiment,extra", [("table5/lily_l", []), ("table5/lily_s", []), ("table5/lora", []),
                                              ("table5/full", []), ("table5/linear_probe", [])])
def test_two_step_vtab_run_on_tiny_vim(experiment, extra, vtab_dir, tmp_path):  # noqa: F811
    cfg = compose_run([f"experiment={experiment}", "backbone=tiny_vim", "task.subset=eurosat",
                       f"task.data_dir={vtab_dir}", "task.image_size=32", "trainer.batch_size=4", "trainer.epochs=1",
                       "task.eval_every_epochs=1", "method.ne_1=2" if "lily" in experiment else "seed=42", *extra],
                      tmp_path)
    record = json.loads(execute(cfg).read_text())
    metrics = record["metrics"]
    assert record["status"] == "finished" and metrics["selection"]["rule"] == "test_selected"
    assert "test/accuracy" in metrics["final"]
    if "lily" in experiment:
        groups = {g["target"] for g in record["adapter_summary"]}
        assert groups == {"in_proj", "dt_proj", "dt_proj_b"}
