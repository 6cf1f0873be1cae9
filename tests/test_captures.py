"""The training-time captures behind Figs. 3 and 4 against direct computations on tiny models (ΔW and router
sums computed by hand alongside a few training steps), the numerical rank against matrices of known rank, and
a real run that leaves the artifacts beside its record."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import compose_run
from lilyexp.figures.captures import (DeltaWeightCapture, RouterCapture, default_rtol, delta_weight, find_layers,
                              layer_index, numerical_rank, pooled_mixture)
from lilyexp.errors import ConfigError
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel, RowGroups, mix_experts
from lilyexp.run import execute
from lilyexp.records import beside

# ------------------------------------------------------------------------------------------ numerical rank


def thin_product(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=generator, dtype=torch.float64) @ \
        torch.randn(k, n, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_numerical_rank_of_products_of_thin_factors(k):
    assert numerical_rank(thin_product(64, 48, k)) == k
    assert numerical_rank(thin_product(64, 48, k).float()) == k  # float32 round-off stays under the tolerance


def test_noise_below_the_tolerance_leaves_the_rank_and_noise_above_it_fills_the_matrix():
    low_rank = thin_product(64, 48, 5)
    scale = torch.linalg.svdvals(low_rank)[0]
    noise = torch.randn(64, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert numerical_rank(low_rank + 1e-10 * scale * noise) == 5
    assert numerical_rank(low_rank + 1e-3 * scale * noise) == 48
    assert numerical_rank(low_rank + 1e-3 * scale * noise, rtol=0.05) == 5


def test_the_tolerance_counts_singular_values_relative_to_the_largest():
    u, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    values = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.01] + [0.0] * 15, dtype=torch.float64)
    matrix = u[:, :20] @ torch.diag(values) @ v.T
    assert [numerical_rank(matrix, rtol) for rtol in (0.6, 0.09, 0.009, 0.0009)] == [1, 3, 4, 5]
    assert numerical_rank(torch.zeros(5, 7)) == 0
    assert default_rtol((768, 768)) == pytest.approx(768 * torch.finfo(torch.float32).eps)


# --------------------------------------------------------------------------------- tiny models, by hand

def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2))


def tiny_lily(**kwargs) -> LilyVariantModel:
    settings = {"r": 4, "ne_1": 2, "num_B": 3, "scaling": 0.5, "target_modules": ["q_proj", "v_proj"],
                "init_weights": False, **kwargs}
    return LilyVariantModel(tiny_llama(), LilyVariantConfig(**settings))


def tiny_lora() -> torch.nn.Module:
    return get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))


class FakeRun:
    def __init__(self, folder: Path):
        self.record_path = folder / "cell.json"

    def side_file(self, suffix: str) -> Path:
        return beside(self.record_path, suffix)


def batches(seed: int, count: int, size: int = 3, tokens: int = 7) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (size, tokens), generator=generator) for _ in range(count)]


class ByHand:
    """The expected updates of the q_proj layers in blocks 0 and 1, computed from their inputs and the
    parameters as they were at the forward, independently of lilyexp.figures.captures."""

    def __init__(self, model: torch.nn.Module, lily: bool):
        self.layers = {i: model.get_submodule(f"{self.prefix(model)}.{i}.self_attn.q_proj") for i in (0, 1)}
        self.lily, self.inputs = lily, {i: [] for i in self.layers}
        for i, layer in self.layers.items():
            layer.register_forward_hook(lambda module, args, out, i=i: self.inputs[i].append(args[0].detach()))
        self.sums = {i: torch.zeros(32, 32, dtype=torch.float64) for i in self.layers}
        self.router_sums = {i: torch.zeros(3, dtype=torch.float64) for i in self.layers}

    @staticmethod
    def prefix(model) -> str:
        return next(name.rsplit(".", 3)[0] for name, _ in model.named_modules() if name.endswith("0.self_attn.q_proj"))

    def parameters(self, i: int) -> dict:
        layer = self.layers[i]
        if self.lily:
            return {"A": layer.lily_A["default"].weight.detach().double().clone(),
                    "B": layer.lily_B["default"].weight.detach().double().clone().reshape(3, 4, 32),
                    "R": layer.lily_router["default"].weight.detach().double().clone()}
        return {"A": layer.lora_A["default"].weight.detach().double().clone(),
                "B": layer.lora_B["default"].weight.detach().double().clone()}

    def probabilities(self, i: int, params: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.double() @ params["A"].T @ params["R"].T, -1)  # (batch, tokens, experts)

    def mixture(self, i: int, params: dict, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.probabilities(i, params, x).mean((0, 1)) for x in xs]).mean(0)

    def update(self, params: dict, mixture: torch.Tensor | None) -> torch.Tensor:
        if not self.lily:
            return 2.0 * params["B"] @ params["A"]  # scaling = alpha / r
        return 0.5 * torch.einsum("e,eio->io", mixture, params["B"]).T @ params["A"]

    def step(self, model, optimizer, micro_batches: list[torch.Tensor]) -> None:
        """One optimizer step over the micro-batches; its updates added to the sums."""
        before = {i: self.parameters(i) for i in self.layers}
        for layer_inputs in self.inputs.values():
            layer_inputs.clear()
        model.train()
        for ids in micro_batches:
            (model(input_ids=ids).logits.square().mean() / len(micro_batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
        for i in self.layers:
            mixture = self.mixture(i, before[i], self.inputs[i]) if self.lily else None
            self.sums[i] += self.update(before[i], mixture)
            if self.lily:
                self.router_sums[i] += sum(self.probabilities(i, before[i], x).sum((0, 1)) for x in self.inputs[i])


def train(model, hand: ByHand, callbacks: list, steps: int, validation=None):
    """A few steps of two micro-batches each, the callbacks told as the training loop tells them."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loop = SimpleNamespace(unwrapped=model, model=model, main=True, start=0, accelerator=None,
                           inputs=SimpleNamespace(run=FakeRun(callbacks[0].folder)),
                           objective=SimpleNamespace(validate=validation or (lambda m: {})))
    for callback in callbacks:
        callback.on_train_start(loop)
    for step, micro_batches in enumerate(zip(batches(1, steps), batches(2, steps)), start=1):
        hand.step(model, optimizer, list(micro_batches))
        for callback in callbacks:
            callback.on_step_end(loop, step)
    for callback in callbacks:
        callback.on_train_end(loop)


def with_folder(capture, folder: Path):
    capture.folder = folder
    return capture


def test_accumulated_lily_update_and_router_sums_equal_a_direct_computation(tmp_path):
    model = tiny_lily()
    hand = ByHand(model, lily=True)
    capture = with_folder(DeltaWeightCapture(modules=["q_proj"], layers=[0, 1], validation_mixture=False), tmp_path)
    routers = with_folder(RouterCapture(modules=["q_proj"]), tmp_path)
    train(model, hand, [capture, routers], steps=4)
    saved = load_file(tmp_path / "cell.delta_w.safetensors")
    summary = json.loads((tmp_path / "cell.delta_w.json").read_text())
    names = [layer["name"] for layer in summary["layers"]]
    assert [layer_index(name) for name in names] == [0, 1] and all(n.endswith("q_proj") for n in names)
    assert summary["first_step"] == 1 and summary["steps"] == 4
    for i, name in enumerate(names):
        torch.testing.assert_close(saved[f"accumulated.{name}"].double(), hand.sums[i], rtol=1e-5, atol=1e-6)
        assert summary["layers"][i]["accumulated"]["rank"] == numerical_rank(hand.sums[i].float())
    router_rows = json.loads((tmp_path / "cell.router_weights.json").read_text())["layers"]
    assert [row["layer"] for row in router_rows] == [0, 1, 2, 3]
    for i in (0, 1):
        torch.testing.assert_close(torch.tensor(router_rows[i]["sums"], dtype=torch.float64), hand.router_sums[i])
        assert router_rows[i]["tokens"] == 4 * 2 * 3 * 7


def test_final_lily_update_mixes_the_experts_with_the_validation_router_weights(tmp_path):
    model = tiny_lily()
    hand = ByHand(model, lily=True)
    validation_batches = batches(3, 2, size=2, tokens=5)

    def validate(model):
        model.eval()
        with torch.no_grad():
            for ids in validation_batches:
                model(input_ids=ids)
        return {}

    capture = with_folder(DeltaWeightCapture(modules=["q_proj"], layers=[1]), tmp_path)
    train(model, hand, [capture], steps=2, validation=validate)
    params = hand.parameters(1)
    hidden = [x.double() @ params["A"].T for x in hand.inputs[1][-2:]]  # the validation pass's inputs
    probabilities = torch.cat([torch.softmax(h @ params["R"].T, -1).reshape(-1, 3) for h in hidden])
    expected = hand.update(params, probabilities.mean(0))
    saved = load_file(tmp_path / "cell.delta_w.safetensors")
    torch.testing.assert_close(saved[f"final.{next(iter(find_layers(model, ['q_proj'], [1])))}"].double(),
                               expected, rtol=1e-5, atol=1e-6)


def test_accumulated_and_final_lora_updates_equal_scaling_b_a(tmp_path):
    model = tiny_lora()
    hand = ByHand(model, lily=False)
    capture = with_folder(DeltaWeightCapture(modules=["q_proj"], layers=[0, 1]), tmp_path)
    routers = with_folder(RouterCapture(), tmp_path)
    train(model, hand, [capture, routers], steps=3)
    saved = load_file(tmp_path / "cell.delta_w.safetensors")
    summary = json.loads((tmp_path / "cell.delta_w.json").read_text())
    for i, layer in enumerate(summary["layers"]):
        torch.testing.assert_close(saved[f"accumulated.{layer['name']}"].double(), hand.sums[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved[f"final.{layer['name']}"].double(), hand.update(hand.parameters(i), None),
                                   rtol=1e-5, atol=1e-6)
        assert layer["final"]["rank"] == 2 and layer["rtol"] == default_rtol((32, 32))
    assert not (tmp_path / "cell.router_weights.json").exists()  # LoRA has no router: nothing to save


def test_the_layer_update_equals_what_the_layer_adds_to_its_output():
    model = tiny_lily(init_weights=False)
    layer = next(iter(find_layers(model, ["v_proj"], [2]).values()))
    x = torch.randn(2, 5, 32)
    hidden = layer.lily_A["default"](x)
    mixture = pooled_mixture(layer.lily_router["default"](hidden), "batch_mean", None)
    with torch.no_grad():
        added = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(added.double(), x.double() @ delta_weight(layer, mixture).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["batch_mean", "token", "sample_sum"])
def test_the_pooled_mixture_gives_the_batch_mean_of_the_applied_updates(pooling):
    torch.manual_seed(0)
    hidden, experts = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    router = torch.nn.Linear(4, 3, bias=False).double()
    logits = router(hidden)
    mixture = pooled_mixture(logits, pooling, None)
    mixed = torch.einsum("e,eio->io", mixture, experts)
    if pooling == "batch_mean":  # one mixture for the batch: the layer's output itself
        torch.testing.assert_close(mix_experts(hidden, experts, router, pooling), hidden @ mixed)
    else:  # a mixture per token or per sample: the mean of the per-token (or per-sample) maps
        per = logits.softmax(-1) if pooling == "token" else logits.sum(1).softmax(-1)
        torch.testing.assert_close(torch.einsum("...e,eio->io", per, experts) / per[..., 0].numel(), mixed)


def test_the_pooled_mixture_under_per_sample_routing_is_the_token_mean_of_each_rows_mixture():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5, [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.float64)
    groups = RowGroups.of(torch.tensor([7, 7, 2, 5]))  # rows 0 and 1 routed together, rows 2 and 3 alone
    probabilities = logits.softmax(-1)
    per_token = probabilities * mask[..., None]
    first = per_token[:2].sum((0, 1)) / mask[:2].sum()
    per_row = [first, first, per_token[2].sum(0) / mask[2].sum(), per_token[3].sum(0) / mask[3].sum()]
    expected = sum(m * n for m, n in zip(per_row, mask.sum(1))) / mask.sum()
    torch.testing.assert_close(pooled_mixture(logits, "batch_mean", mask, groups), expected)
    everything = RowGroups.of(torch.zeros(4, dtype=torch.long))  # one group: the official pooling
    torch.testing.assert_close(pooled_mixture(logits, "batch_mean", mask, everything),
                               pooled_mixture(logits, "batch_mean", mask))


def test_captures_run_beside_per_sample_evaluation_routing(tmp_path):
    record = vit_cell(tmp_path, "lily", "method.ne_1=2", "method.ne_2=3", "method.eval_pooling=sample",
                      "trainer.max_steps=2", CAPTURES)
    assert json.loads(record.read_text())["evaluation"]["routing"]["mode"] == "per_group"
    summary = json.loads(beside(record, "delta_w.json").read_text())
    assert all(layer["final"]["rank"] >= 1 for layer in summary["layers"])


def test_a_capture_naming_no_adapted_layer_says_which_there_are(tmp_path):
    capture = with_folder(DeltaWeightCapture(modules=["query"], layers=[0]), tmp_path)
    with pytest.raises(ConfigError, match="no adapted layer named \\['query'\\].*q_proj"):
        capture.attach(tiny_lily())


# ---------------------------------------------------------------------------------------------- a real run

def fake_vtab(folder: Path, task: str = "caltech101", images: int = 6) -> Path:
    """A VTAB-1K release folder for one task: its four lists over a few coloured images."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    (folder / task / "images").mkdir(parents=True)
    lines = []
    for number in range(images):
        colour = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=generator))
        Image.new("RGB", (40, 40), colour).save(folder / task / "images" / f"{number}.png")
        lines.append(f"images/{number}.png {number % 3}")
    for split in ("train800", "val200", "train800val200", "test"):
        (folder / task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


CAPTURES = ("trainer.callbacks=[{_target_:lilyexp.figures.captures.DeltaWeightCapture,modules:[qkv],layers:[0,1]},"
            "{_target_:lilyexp.figures.captures.RouterCapture}]")


def vit_cell(tmp_path: Path, method: str, *extra: str) -> Path:
    """A tiny-ViT run on a fake Caltech101 (a few seconds), its record under ``tmp_path/runs``."""
    data = tmp_path / "vtab" if (tmp_path / "vtab").is_dir() else fake_vtab(tmp_path / "vtab")
    cfg = compose_run(["backbone=tiny_vit", "task=vtab", f"method={method}", "task.subset=caltech101",
                       f"task.data_dir={data}", "task.protocol=paper", "debug=smoke",
                       f"paths.results_dir={tmp_path}/runs", f"paths.checkpoint_dir={tmp_path}/checkpoints", *extra])
    return execute(cfg)


def test_a_run_with_the_captures_leaves_their_artifacts_beside_its_record(tmp_path):
    record = vit_cell(tmp_path, "lily", "method.ne_1=2", "method.ne_2=3", "trainer.max_steps=3", CAPTURES)
    summary = json.loads(beside(record, "delta_w.json").read_text())
    assert summary["first_step"] == 1 and summary["steps"] == 3 and len(summary["layers"]) == 2
    assert all(layer["accumulated"]["rank"] >= 1 and layer["final"]["rank"] >= 1 for layer in summary["layers"])
    assert [layer["shape"] for layer in summary["layers"]] == [[96, 32], [96, 32]]  # the fused qkv of width 32
    tensors = load_file(beside(record, "delta_w.safetensors"))
    assert sorted(tensors) == sorted(f"{m}.{layer['name']}" for m in ("accumulated", "final")
                                     for layer in summary["layers"])
    routers = json.loads(beside(record, "router_weights.json").read_text())["layers"]
    assert len(routers) == 4 and all(len(row["sums"]) == 3 for row in routers)
    # every step is counted: batches of 4 over 6 training images give steps 1-3 4, 2 and 4 images of 17 tokens
    assert [row["tokens"] for row in routers] == [(4 + 2 + 4) * 17] * 4
    assert json.loads(record.read_text())["status"] == "finished"
