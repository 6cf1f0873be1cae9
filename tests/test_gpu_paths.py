"""The paths a first GPU run takes that a CPU run never does, proven here by simulation: fp16 autocast with a
GradScaler on half-precision backbone weights (every paradigm, full fine-tuning included), each library's
activation-checkpointing switch, SLURM's preemption signal and requeue, per-process RNG states, padded last
micro-batches, sharded strategies refused, the Mamba kernel check, DDP-wrapped UNets, the training device."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from hydra.utils import instantiate

import lilyexp.placement as placement
from conftest import TINY_RUN, compose_run, run_cli
from lilyexp.compose import check_gpu_kernels
from lilyexp.errors import ConfigError
from lilyexp.recipes.core import StepPlan
from lilyexp.recipes.devices import (enable_gradient_checkpointing, refuse_sharded, upcast_trainable,
                                     warn_unscaled_half_precision)
from lilyexp.recipes.loop import Checkpointer, rng_state, set_rng_state
from lilyexp.records import beside
from lilyexp.run import execute

CAUSAL = ["backbone=tiny_llama", "trainer.max_steps=3", "trainer.eval_every=3", *TINY_RUN]


def run_in_process(overrides: list[str], tmp_path) -> dict:
    path = execute(compose_run(overrides, tmp_path), overrides)
    return json.loads(path.read_text())


def losses(tmp_path) -> list[float]:
    lines = next((tmp_path / "results").rglob("*.steps.jsonl")).read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]


def tiny_backbone(name: str, **model_kwargs) -> torch.nn.Module:
    return instantiate(compose_run([f"backbone={name}"]).backbone.load, **model_kwargs).model


# ------------------------------------------------------------------------------ fp16 autocast + GradScaler

@pytest.mark.parametrize("method", ["lora", "lily", "full"])
def test_fp16_autocast_with_a_grad_scaler_trains_on_half_precision_weights(fp16_on_cpu, method, tmp_path):
    """Without fp32 master weights, full fine-tuning stops at step 1: 'Attempting to unscale FP16 gradients'."""
    record = run_in_process([*CAUSAL, f"method={method}"], tmp_path)
    assert record["status"] == "finished", record.get("error")
    assert len(losses(tmp_path)) == 3 and all(torch.isfinite(torch.tensor(losses(tmp_path))))
    assert fp16_on_cpu.scalers[-1]._scale is not None  # the scaler scaled the loss: the fp16 path ran
    assert record["precision"] == {"requested": "no", "autocast": "fp16", "grad_scaler": True}  # what ran


@pytest.mark.slow
@pytest.mark.parametrize("cell", [
    ["backbone=tiny_roberta", "task=glue", "task.subset=mrpc", "method=lily", "method.ne_1=2", "method.ne_2=2",
     "task.train_limit=16", "task.eval_limit=8", "task.max_length=64", "trainer.max_steps=2", "trainer.batch_size=4"],
    ["backbone=tiny_llama", "method=lily", "task.scoring=both", *CAUSAL[1:]],
], ids=["glue", "commonsense-both-scorings"])
def test_fp16_simulation_covers_the_other_paradigms(fp16_on_cpu, cell, shared_data, tmp_path):
    extra = [f"task.data_dir={shared_data / 'glue'}"] if "task=glue" in cell else []
    record = run_in_process([*cell, *extra], tmp_path)
    assert record["status"] == "finished", record.get("error")
    assert all(torch.isfinite(torch.tensor(losses(tmp_path))))


def test_trainable_half_precision_tensors_become_fp32_master_weights_and_frozen_ones_stay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).half()
    model[0].requires_grad_(False)
    assert upcast_trainable(model) == 2
    assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32


def test_fp16_weights_training_without_loss_scaling_on_a_gpu_warn(caplog):
    model = torch.nn.Linear(4, 4).half()
    on_gpu = SimpleNamespace(device=torch.device("cuda"), mixed_precision="no")
    with caplog.at_level(logging.WARNING, logger="lilyexp"):
        warn_unscaled_half_precision(model, on_gpu)
        warn_unscaled_half_precision(model, SimpleNamespace(device=torch.device("cuda"), mixed_precision="fp16"))
        warn_unscaled_half_precision(model, SimpleNamespace(device=torch.device("cpu"), mixed_precision="no"))
    assert [r.getMessage() for r in caplog.records if "loss-scaled" in r.getMessage()] == [
        "the backbone's weights are fp16 but trainer.mixed_precision=no: gradients through it are not loss-scaled "
        "and may underflow; set trainer.mixed_precision=fp16 (what the paper's runs used)."]


# ------------------------------------------------------------------------------ activation checkpointing

@pytest.mark.parametrize("backbone,kwargs,flag", [
    ("tiny_llama", {}, lambda m: m.is_activation_checkpointing),
    ("tiny_vit", {"num_classes": 3}, lambda m: m.grad_checkpointing),
    ("tiny_vim", {"num_classes": 3}, lambda m: m.grad_checkpointing),
    ("tiny_sdxl", {}, lambda m: m.is_gradient_checkpointing),
])
def test_each_library_s_own_checkpointing_switch_is_called(backbone, kwargs, flag):
    model = tiny_backbone(backbone, **kwargs)
    enable_gradient_checkpointing(model)
    assert flag(model)


def test_a_model_without_a_checkpointing_switch_is_refused():
    with pytest.raises(ConfigError, match="Linear has no activation-checkpointing switch.*set it to false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_checkpointed_vim_blocks_give_the_same_loss_and_gradients_with_drop_path():
    model = tiny_backbone("tiny_vim", num_classes=3, drop_path_rate=0.3).train()
    images = torch.randn(2, 3, 32, 32)
    results = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(0)
        loss = model(images).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, checkpointed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, checkpointed)


def test_router_weights_are_counted_once_under_activation_checkpointing(tmp_path):
    from test_captures import vit_cell

    tokens = []
    for checkpointing in ("false", "true"):
        folder = tmp_path / checkpointing
        record = vit_cell(folder, "lily", "method.ne_1=2", "method.ne_2=3", "trainer.max_steps=2",
                          f"trainer.gradient_checkpointing={checkpointing}",
                          "trainer.callbacks=[{_target_:lilyexp.figures.captures.RouterCapture}]")
        rows = json.loads(beside(record, "router_weights.json").read_text())["layers"]
        tokens.append([row["tokens"] for row in rows])
    assert tokens[0] == tokens[1] and all(count > 0 for count in tokens[0])


# ------------------------------------------------------------------------------ SLURM preemption, resume

SUBMITIT_STAND_IN = """
import json, signal, sys
from pathlib import Path

marker, results = Path(sys.argv[1]), Path(sys.argv[2])


def requeue_and_exit(signum, frame):  # what submitit's handler does: checkpoint the job's state, requeue, exit
    record = json.loads(next(results.rglob("*.json")).read_text())
    marker.write_text(json.dumps({"signal": signal.Signals(signum).name, "record_status": record["status"]}))
    sys.exit(3)


signal.signal(signal.SIGUSR2, requeue_and_exit)  # installed before the run starts, as submitit's job wrapper does
sys.argv = ["lilyexp.run", *sys.argv[3:]]
from lilyexp.run import cli
cli()
"""


@pytest.mark.slow
def test_slurm_preemption_checkpoints_the_step_then_hands_the_signal_to_submitit_and_a_requeue_resumes(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    common = ["backbone=tiny_llama", "trainer.max_steps=4", "trainer.checkpoint_every=100", "trainer.eval_every=4",
              *TINY_RUN, f"paths.results_dir={tmp_path}/results", f"paths.checkpoint_dir={tmp_path}/checkpoints",
              f"hydra.run.dir={tmp_path}/hydra"]
    marker, script = tmp_path / "requeued.json", tmp_path / "job.py"
    script.write_text(SUBMITIT_STAND_IN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}
    stopped = subprocess.run([sys.executable, str(script), str(marker), str(tmp_path / "results"), *common,
                              "trainer.callbacks=[{_target_:callbacks.SignalAtStep,step:2,signal:SIGUSR2}]"],
                             capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert stopped.returncode == 3, stopped.stderr[-2000:]  # submitit's handler exited, after ours
    handed = json.loads(marker.read_text())
    assert handed["signal"] == "SIGUSR2" and handed["record_status"] == "interrupted"
    record = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert record["interrupted"] == {"signal": "SIGUSR2", "after_step": 2,
                                     "resume": "the same command with trainer.resume=true"}
    requeued = run_cli(common[:-3], tmp_path, env={"SLURM_RESTART_COUNT": "1"})  # no trainer.resume given
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    done = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert done["status"] == "finished" and done["resumed_from_step"] == 2


def test_each_process_restores_its_own_rng_and_a_new_process_takes_process_0_s(tmp_path):
    checkpointer = Checkpointer(SimpleNamespace(work_dir=tmp_path))
    checkpointer.begin()
    states = {}
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        states[rank] = torch.rand(1)
        torch.manual_seed(100 + rank)
        checkpointer.save_rng(rank)
    checkpointer.staging.rename(checkpointer.dir)
    from lilyexp.recipes.loop import saved_rng
    for rank, expected_rank in ((1, 1), (0, 0), (3, 0)):
        set_rng_state(saved_rng(checkpointer.dir, rank, {}))
        assert torch.rand(1) == states[expected_rank]


def test_an_older_every_gpu_rng_list_restores_only_this_process_s_device_and_skips_missing_ones(monkeypatch):
    restored = []
    state = {key: value for key, value in rng_state().items() if key != "cuda"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state))
    for device, expected in ((1, ["gpu1"]), (5, [])):  # a resume on fewer GPUs than the save had
        restored.clear()
        monkeypatch.setattr(torch.cuda, "current_device", lambda device=device: device)
        set_rng_state({**state, "cuda": ["gpu0", "gpu1"]})
        assert restored == expected


# ------------------------------------------------------------------------------ several processes

def test_a_short_last_micro_batch_is_padded_so_no_process_is_left_empty():
    plans = [StepPlan(9, batch_size=2, grad_accum=1, seed=0, world=2, rank=rank) for rank in (0, 1)]
    last = plans[0].steps_per_epoch - 1
    shares = [plan.group(last)[0] for plan in plans]
    assert [len(share) for share in shares] == [1, 1]  # 9 = 2 x 4 + 1: one example, padded to two
    seen = {i for step in range(plans[0].steps_per_epoch) for plan in plans for i in plan.group(step)[0]}
    assert seen == set(range(9))
    single = StepPlan(9, batch_size=4, grad_accum=1, seed=0)
    assert len(single.group(single.steps_per_epoch - 1)[0]) == 1  # one process never pads


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_strategies_are_refused_in_one_sentence(kind):
    with pytest.raises(ConfigError, match=f"^{kind.value} is not supported: .*launch with DDP"):
        refuse_sharded(SimpleNamespace(distributed_type=kind))
    refuse_sharded(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


def test_a_ddp_wrapped_unet_is_unwrapped_for_the_pipeline(tmp_path):
    from lilyexp.recipes.diffusion_steps import bare_unet

    unet = tiny_backbone("tiny_sdxl")
    unet.conv_in.requires_grad_(True)  # DDP wraps only a model with something to train
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        assert bare_unet(torch.nn.parallel.DistributedDataParallel(unet)) is unet
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------ devices and kernels

@pytest.mark.parametrize("backbone,task", [("falcon_mamba", "commonsense"), ("vim", "vtab")])
def test_mamba_backbones_on_a_gpu_need_the_kernels_or_checkpointing(backbone, task, monkeypatch):
    cfg = compose_run([f"backbone={backbone}", f"task={task}", "method=lily"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=f"^backbone '{backbone}' on a GPU needs mamba_ssm, causal_conv1d "
                                          r"\(pip install 'lilyexp\[mamba\]'\): without them .* GiB .*"
                                          "or set trainer.gradient_checkpointing=true.$"):
        check_gpu_kernels(cfg, torch.device("cuda"))
    check_gpu_kernels(cfg, torch.device("cpu"))
    cfg.trainer.gradient_checkpointing = True
    check_gpu_kernels(cfg, torch.device("cuda"))


def saved_for_backward(forward) -> int:
    """Bytes autograd keeps for backward during ``forward()`` (each storage once)."""
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return total


def falcon_mamba_table1_bytes() -> float:
    """Table 1: 4 x 256 tokens, width 4096, 64 layers; one layer measured at width 512 (bytes scale with it)."""
    from transformers import FalconMambaConfig, FalconMambaModel

    config = FalconMambaConfig(vocab_size=8, hidden_size=512, num_hidden_layers=1, state_size=16, expand=2,
                               conv_kernel=4, time_step_rank=32, use_mambapy=False)
    layer, tokens = FalconMambaModel(config), torch.randn(1, 256, 512, requires_grad=True)
    return saved_for_backward(lambda: layer(inputs_embeds=tokens)) * (4096 / 512) * 4 * 64


def vim_s_table5_bytes() -> float:
    """Table 5: Vim-S (width 384, 24 blocks), batch 64 of 197 tokens; one block measured for one image."""
    from lilyexp.backbones.vim import BiMambaV2

    block, tokens = BiMambaV2(384, d_state=16), torch.randn(1, 197, 384, requires_grad=True)
    return saved_for_backward(lambda: block(tokens)) * 64 * 24


@pytest.mark.parametrize("backbone,measure,expected_gib", [("falcon_mamba", falcon_mamba_table1_bytes, 165),
                                                           ("vim", vim_s_table5_bytes, 130)])
def test_the_quoted_memory_of_the_pure_pytorch_scan_is_measured(backbone, measure, expected_gib):
    """The refusal's numbers: one layer's saved activations measured, then scaled to the paper's width, batch and
    depth. Neither fits an 80 GB GPU."""
    assert measure() / 2**30 == pytest.approx(expected_gib, rel=0.1)
    why = compose_run([f"backbone={backbone}"]).backbone.gpu_kernels.why
    assert f"about {expected_gib} GiB" in why


def test_the_training_device_is_the_local_rank_s_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert placement.training_device() == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert placement.training_device() == torch.device("cuda", 0)


def test_the_method_initialises_on_the_training_device(monkeypatch, tmp_path):
    """PiSSA's SVDs run where the model is: the runner moves the backbone before the method applies."""
    import lilyexp.run as runner
    from lilyexp.methods.peft_method import PeftMethod

    seen = []
    monkeypatch.setattr(runner, "training_device", lambda: torch.device("meta"))
    monkeypatch.setattr(PeftMethod, "apply", lambda self, model: seen.append(next(model.parameters()).device)
                        or (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        execute(compose_run([*CAUSAL, "method=pissa"], tmp_path))
    assert seen == [torch.device("meta")]


def test_dreambooth_metric_models_load_on_the_training_device(monkeypatch, tmp_path):
    from lilyexp.tasks import dreambooth_metrics as metrics

    dino = metrics.tiny_dino()
    dino.model.save_pretrained(tmp_path / "dino")
    dino.processor.save_pretrained(tmp_path / "dino")
    monkeypatch.setattr(metrics, "training_device", lambda: torch.device("meta"))
    assert next(metrics.load_dino(str(tmp_path / "dino")).model.parameters()).device.type == "meta"


def test_the_record_states_the_numerics_flags(tmp_path):
    try:
        record = run_in_process([*CAUSAL, "trainer.max_steps=1", "trainer.deterministic=true", "trainer.tf32=false"],
                                tmp_path)
        assert record["env"]["numerics"] == {"tf32_matmul": False, "tf32_cudnn": False, "cudnn_benchmark": False,
                                             "deterministic": True}
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = False, True
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ------------------------------------------------------------------------------ make gpu-check

def gpu_check(tmp_path, *args: str, timeout: int = 600):
    import subprocess
    import sys

    from conftest import REPO
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # a subprocess (make test-fast leaves these out)
def test_gpu_check_composes_every_paper_scale_cell_with_random_weights_of_the_real_shapes(tmp_path):
    done = gpu_check(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    cells = [line.split(": ", 1) for line in done.stdout.splitlines() if not line.startswith("skipping")]
    loaders = {name: command.split()[0] for name, command in cells}
    assert loaders == {"llama3-lily-fp16": "lilyexp.backbones.hf.from_config",
                       "llama3-pissa-fp16": "lilyexp.backbones.hf.from_config",
                       "falcon_mamba-lily-fp16": "lilyexp.backbones.hf.from_config",
                       "roberta_large-lily-fp32": "lilyexp.backbones.hf.from_config",
                       "roberta_large-full-fp16": "lilyexp.backbones.hf.from_config",
                       "vit-lily-fp32": "lilyexp.backbones.timm_vision.load",
                       "vim-lily-bf16": "lilyexp.backbones.vim.load"}
    assert "skipping the DDP cell: 0 GPU(s) visible, it needs 2" in done.stdout


def test_gpu_check_refuses_to_run_without_a_gpu_in_one_sentence(tmp_path):
    done = gpu_check(tmp_path)
    assert done.returncode == 1 and done.stderr.strip().startswith("error: no GPU visible;")
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_gpu_check_runs_its_cells_on_the_tiny_backbones_and_reports_each(tmp_path):
    done = gpu_check(tmp_path, "--tiny", "--only", "llama3-pissa-fp16", "roberta_large-full-fp16",
                     "llama3-lily-fp16-ddp2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(row["cell"], row["status"], row["steps"], row["processes"]) for row in rows] == [
        ("llama3-pissa-fp16", "finished", 2, 1), ("roberta_large-full-fp16", "finished", 2, 1),
        ("llama3-lily-fp16-ddp2", "finished", 2, 2)]
    assert all(row["peak_mem_gib"] > 0 and row["step_s"] > 0 for row in rows)
    assert "| llama3-pissa-fp16 | finished | 2 |" in (tmp_path / "gpu_check.md").read_text()


def test_fewer_training_examples_than_processes_are_refused():
    with pytest.raises(ConfigError, match="1 training examples cannot give each of 2 processes one"):
        StepPlan(1, batch_size=1, grad_accum=1, seed=0, world=2, rank=0)


def test_a_stop_asked_of_one_process_stops_them_all_after_the_same_step():
    from lilyexp.recipes.loop import StopRequested, StopRequests, TrainingLoop

    loop = TrainingLoop.__new__(TrainingLoop)
    loop.accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                                       reduce=lambda tensor, how: torch.tensor(1.0))  # the other process was asked
    mine = StopRequests()
    with pytest.raises(StopRequested):
        loop.agreed_stop(mine)
    assert mine.requested == "SIGTERM"


@pytest.mark.parametrize("saved,warned", [({"global_batch": 8, "processes": 4}, False),
                                          ({"global_batch": 16, "processes": 4}, True)])
def test_a_resume_on_another_process_count_says_whether_the_global_batch_is_kept(saved, warned, caplog):
    from lilyexp.recipes.loop import TrainingLoop

    loop = TrainingLoop.__new__(TrainingLoop)
    loop.layout = {"global_batch": 8, "processes": 2}
    with caplog.at_level(logging.INFO, logger="lilyexp"):
        loop.check_layout({"batch": saved})
    levels = {r.levelno for r in caplog.records if "the checkpoint was written with" in r.getMessage()}
    assert levels == ({logging.WARNING} if warned else {logging.INFO})
