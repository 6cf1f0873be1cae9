"""Every command README.md shows runs as written: the smoke ones (tiny backbones, ``debug=smoke``, the table
renderer, the budget helper) run for real; paper-scale ones are composed exactly as the CLI would compose them
(the first value of every sweep), their settings and combination checked; make targets exist (``make -n``)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from lilyexp.compose import check_combination, method_node
from lilyexp.settings import check_settings

from conftest import REPO, compose_run

README = (REPO / "README.md").read_text()
ENV_PREFIX = re.compile(r"^(\w+=\S+\s+)+")


COMMAND_START = re.compile(r"^(\w+=\S+\s+)*(python -m |make |accelerate launch )")


def shell_commands(text: str) -> list[str]:
    """The commands of every ```bash block (continuation lines joined, comments dropped) and of every inline
    code span that starts like one."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [span for span in re.findall(r"`([^`]+)`", prose) if COMMAND_START.match(span)]
    return list(dict.fromkeys(commands))


COMMANDS = shell_commands(README)


def lilyexp_run_arguments(command: str) -> list[str] | None:
    """The arguments after ``-m lilyexp.run`` (also under accelerate launch / torchrun), or None."""
    words = shlex.split(ENV_PREFIX.sub("", command))
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "lilyexp.run":
            return words[i + 2:]
    return None


def first_of_each_sweep(arguments: list[str]) -> list[str]:
    parsed = OverridesParser.create().parse_overrides([a for a in arguments if a != "-m" and "=" in a])
    out = config_dirs(arguments)
    for override in parsed:
        key = override.get_key_element()
        if key.startswith("hydra"):
            continue
        value = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() \
            else override.get_value_element_as_str()
        out.append(f"{key}={value}")
    return out


def config_dirs(arguments: list[str]) -> list[str]:
    """``--config-dir X`` as the search-path override the compose API takes (X relative to the repository)."""
    folders = [arguments[i + 1] for i, a in enumerate(arguments[:-1]) if a == "--config-dir"]
    return [f"hydra.searchpath=[{','.join('file://' + str((REPO / f).resolve()) for f in folders)}]"] if folders else []


def pinned_files_served(request, tmp_path) -> dict:
    """A loopback stand-in for raw.githubusercontent.com serving the shared DreamBooth copies, for commands that
    download their data; the environment that points lilyexp at it."""
    from lilyexp import downloads
    from loopback import Loopback

    shared = request.getfixturevalue("shared_data") / "dreambooth"
    repo = downloads.load_manifest("dreambooth")
    server = Loopback(tmp_path / "served")
    server.put(repo, "dataset/prompts_and_classes.txt", shared / "prompts_and_classes.txt")
    for image in (shared / "duck_toy").glob("*.jpg"):
        server.put(repo, f"dataset/duck_toy/{image.name}", image)
    server.thread.start()
    server.timer.start()
    request.addfinalizer(server.stop)
    return {"LILYEXP_GITHUB_RAW": server.url, "LILYEXP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0"}


def runs_here(arguments: list[str]) -> bool:
    return any(a.startswith("backbone=tiny_") for a in arguments) and "debug=smoke" in arguments


def test_readme_shows_the_two_setup_commands_and_this_test_covers_its_commands():
    assert "make demo" in COMMANDS and "make test" in COMMANDS
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", [c for c in COMMANDS if lilyexp_run_arguments(c) is not None
                                     and not runs_here(lilyexp_run_arguments(c))])
def test_paper_scale_commands_compose_to_valid_cells(command):
    overrides = first_of_each_sweep(lilyexp_run_arguments(command))
    cfg = compose_run(overrides)
    check_settings(cfg, overrides)
    check_combination(cfg)


def run(command: list[str], tmp_path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def split_env(command: str) -> tuple[dict, list[str]]:
    """``A=1 B=2 python ...`` -> ({A: 1, B: 2}, [python, ...])."""
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^\w+=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if lilyexp_run_arguments(c) is not None
                                     and runs_here(lilyexp_run_arguments(c))])
def test_smoke_commands_run(command, tmp_path, request):
    env, words = split_env(command)
    if "task=dreambooth" in words and not any(w.startswith("task.data_dir=") for w in words):
        env.update(pinned_files_served(request, tmp_path))  # the command downloads its subject
    paths = [f"paths.results_dir={tmp_path}/results", f"paths.checkpoint_dir={tmp_path}/checkpoints",
             f"hydra.run.dir={tmp_path}/hydra", f"hydra.sweep.dir={tmp_path}/sweep"]
    result = run([sys.executable, *words[1:], *paths], tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "results").rglob("*.json")), "the command wrote no record"


@pytest.mark.slow  # a subprocess (make test-fast leaves these out)
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith(("python -m lilyexp.tables",
                                                                          "python -m lilyexp.figures",
                                                                          "python -m lilyexp.budget"))])
def test_table_figure_and_budget_commands_run(command, tmp_path):
    words = shlex.split(command)
    extra = ["--out", str(tmp_path)] if "lilyexp.tables" in command or "lilyexp.figures" in command else []
    result = run([sys.executable, *words[1:], *extra], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def study_arguments(command: str) -> tuple[str, ...]:
    """A study command as this test runs it: composing every cell it would run (``--commands``), running none."""
    return (*(w for w in shlex.split(command)[1:] if w not in ("--commands", "--report")), "--commands")


STUDY_COMMANDS = {study_arguments(c): c for c in COMMANDS if c.startswith("python -m lilyexp.study")}


@pytest.mark.slow  # a subprocess (make test-fast leaves these out)
@pytest.mark.parametrize("arguments", list(STUDY_COMMANDS), ids=list(STUDY_COMMANDS.values()))
def test_study_commands_compose_every_cell(arguments, tmp_path):
    """A study runs for hours: here each of README's study commands composes every cell it would run, without
    running one (commands that differ only in what they print are one case)."""
    result = run([sys.executable, *arguments, f"paths.results_dir={tmp_path}/results"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "python -m lilyexp.run" in result.stdout


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_make_targets_exist(command, tmp_path):
    result = run(["make", "-n", *shlex.split(command)[1:]], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if "adapter_dir" not in b and "base_model" not in b])
def test_python_snippets_that_define_code_run(block):
    """A snippet that defines a class (the Extending example) runs as written; tests/test_extending.py uses it."""
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own snippet
    assert any(isinstance(value, type) for value in namespace.values())


@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if "adapter_dir" in b or "base_model" in b])
def test_python_snippets_run_on_a_real_export(block, tmp_path):
    """The snippets name ``base_model`` and ``adapter_dir``: here a tiny LLaMA and a LoRA export of it."""
    import copy

    from hydra.utils import instantiate

    cfg = compose_run(["backbone=tiny_llama", "method=lora", "method.r=4"])
    base = instantiate(cfg.backbone.load).model
    node = method_node(cfg.method)
    method = instantiate(node)
    method.export(method.apply(copy.deepcopy(base)), tmp_path / "adapter", node)
    namespace = {"base_model": base, "adapter_dir": str(tmp_path / "adapter")}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own snippet
    assert namespace["model"] is not None
