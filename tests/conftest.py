"""Shared test helpers: compose the real config tree (as the CLI does) with small, offline overrides."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lilyexp.compose import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
# The project's shared data (real GLUE, commonsense and DreamBooth files): LILYEXP_SHARED, else ../shared.
SHARED = Path(os.environ.get("LILYEXP_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: one thread each, not one per core
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The slow (end-to-end, subprocess) tests first, each file's in its order: `make test`'s workers take tests
    in this order, so the run ends on short tests instead of one worker finishing a long one while the other
    idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def results_outside_the_repository(tmp_path_factory):
    """A test that forgets its own results folder writes into a temporary one, never into the committed
    results/ (the runner's default paths read these variables; subprocesses inherit them)."""
    scratch = tmp_path_factory.mktemp("default_paths")
    os.environ["LILYEXP_RESULTS_DIR"] = str(scratch / "results")
    os.environ["LILYEXP_CHECKPOINT_DIR"] = str(scratch / "checkpoints")
    yield
    for name in ("LILYEXP_RESULTS_DIR", "LILYEXP_CHECKPOINT_DIR"):
        os.environ.pop(name, None)

# A tiny commonsense_synthetic run: a few examples, short generations.
TINY_RUN = ["task.n_train=120", "task.n_eval=2", "task.val_size=8", "task.cutoff_len=512",
            "task.generation.max_new_tokens=4", "trainer.batch_size=4"]


def compose_run(overrides: list[str], tmp_path: Path | None = None) -> DictConfig:
    """The config the CLI composes for ``overrides`` (a copy: tests may edit it; interpolations resolve when read,
    so environment variables set later still apply)."""
    extra = [] if tmp_path is None else [f"paths.results_dir={tmp_path}/results",
                                         f"paths.checkpoint_dir={tmp_path}/checkpoints"]
    return copy.deepcopy(composed((*overrides, *extra)))


@functools.lru_cache(maxsize=1024)
def composed(overrides: tuple[str, ...]) -> DictConfig:
    """Hydra's composition takes ~0.15 s; the config tests compose the same cells several times."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


def run_cli(args: list[str], tmp_path: Path, timeout: int = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """``python -m lilyexp.run`` in a subprocess with results and checkpoints under ``tmp_path`` (``env`` adds
    to the environment)."""
    command = [sys.executable, "-m", "lilyexp.run", *args, f"paths.results_dir={tmp_path}/results",
               f"paths.checkpoint_dir={tmp_path}/checkpoints", f"hydra.run.dir={tmp_path}/hydra"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
           **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture
def tiny_run() -> list[str]:
    return list(TINY_RUN)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; a test that needs it skips, saying why, when it is absent."""
    folder = SHARED / "data"
    if not folder.is_dir():
        pytest.skip(f"the shared data folder {folder} is absent (set LILYEXP_SHARED to the folder holding data/)")
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any transformers model load fails the test: the input must have been refused before."""
    import lilyexp.backbones.hf as hf

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(hf, "from_config", refuse)
    monkeypatch.setattr(hf, "load_pretrained", refuse)


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread, and the machine's cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- GPU paths, simulated
# On a CPU accelerate silently turns fp16 into "no autocast, no scaler", so the fp16 path a GPU run takes is
# never exercised. These fixtures force it: fp16 autocast and a GradScaler on the CPU, and half-precision backbone
# weights, through the same Accelerator object and runner the CLI uses.

def simulated_fp16_accelerator(mixed_precision: str = "no", **kwargs):
    """An Accelerator that behaves as accelerate's CUDA fp16 setup: autocast to float16 around every forward
    and a GradScaler on the optimizer (unscaled before clipping), whatever the run's own setting."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="fp16", **kwargs)
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Every recipe trains under :func:`simulated_fp16_accelerator`; the backbone's weights are cast to
    ``fp16_on_cpu.dtype`` (default float16) as the paper's LLaMA3/Falcon-Mamba/SDXL loads are."""
    import torch
    from accelerate.state import AcceleratorState

    import lilyexp.recipes.devices as devices
    import lilyexp.run as runner
    from lilyexp.backbones import Backbone

    class Simulation:
        dtype = torch.float16
        scalers: list = []

    def accelerator(mixed_precision: str = "no", **kwargs):
        made = simulated_fp16_accelerator(**kwargs)
        Simulation.scalers.append(made.scaler)
        return made

    build = runner.build

    def half_precision_build(node, **kwargs):
        built = build(node, **kwargs)
        if isinstance(built, Backbone):
            built.model.to(Simulation.dtype)
        return built

    monkeypatch.setattr(devices, "Accelerator", accelerator)
    monkeypatch.setattr(runner, "build", half_precision_build)
    yield Simulation
    AcceleratorState._reset_state(reset_partial_state=True)
