"""Pinned GitHub data files (lilyexp.downloads) against a loopback HTTP server that serves the real shared copies
laid out as raw.githubusercontent.com does: blob-hash verification, the cache, offline mode, the one-sentence
errors, folder fetches, and the shipped manifests checked against ``git hash-object``."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from lilyexp import downloads as dl
from lilyexp.errors import ConfigError

from conftest import SHARED as SHARED_ROOT
from loopback import Loopback

REPO = Path(__file__).resolve().parents[1]
SHARED = SHARED_ROOT / "data"
COMMONSENSE, DREAMBOOTH = SHARED / "commonsense", SHARED / "dreambooth"
LLM, DB = dl.load_manifest("llm_adapters"), dl.load_manifest("dreambooth")
BOOLQ = "dataset/boolq/test.json"
HINT = "set task.data_dir to a folder holding <set>/test.json"

needs_shared = pytest.mark.skipif(not (COMMONSENSE.is_dir() and DREAMBOOTH.is_dir()),
                                  reason=f"no shared data copies under {SHARED} (set LILYEXP_SHARED)")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def shared_copies() -> list[tuple[dl.PinnedRepo, str, Path]]:
    """(repository, path at the pinned commit, local byte copy) for every shared file that has a source."""
    copies = [(LLM, f"dataset/{p.parent.name}/test.json", p) for p in sorted(COMMONSENSE.glob("*/test.json"))]
    copies.append((LLM, "DATA_LICENSE", COMMONSENSE / "DATA_LICENSE_LLM-Adapters.txt"))
    copies.append((DB, "LICENSE.md", DREAMBOOTH / "LICENSE.md"))
    copies += [(DB, f"dataset/{name}", DREAMBOOTH / name)
               for name in ("prompts_and_classes.txt", "references_and_licenses.txt")]
    copies += [(DB, f"dataset/{p.parent.name}/{p.name}", p) for p in sorted(DREAMBOOTH.glob("*/*.jpg"))]
    return copies


def git_hash_object(path: Path | None = None, data: bytes | None = None) -> str:
    command = ["git", "hash-object", "--no-filters", str(path)] if path else ["git", "hash-object", "--stdin"]
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout.decode().strip()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Online, no base-URL override, a per-test cache (the suite's conftest turns HF offline by default)."""
    for name in ("HF_HUB_OFFLINE", "LILYEXP_OFFLINE", "LILYEXP_GITHUB_RAW", "HF_HOME", "XDG_CACHE_HOME",
                 "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LILYEXP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def server(tmp_path):
    if not (COMMONSENSE.is_dir() and DREAMBOOTH.is_dir()):
        pytest.skip(f"no shared data copies under {SHARED} (set LILYEXP_SHARED)")
    loopback = Loopback(tmp_path / "served")
    for repo, path, source in shared_copies():
        loopback.put(repo, path, source)
    loopback.thread.start()
    loopback.timer.start()
    yield loopback
    loopback.stop()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def assert_one_sentence(message: str, repo: dl.PinnedRepo, path: str, hint: str = HINT):
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
    assert repo.source(path) in message and hint in message, message


# --- hashes and manifests --------------------------------------------------------------------------------------

@needs_git
@needs_shared
def test_git_blob_sha1_equals_git_hash_object():
    for _, _, source in shared_copies():
        assert dl.git_blob_sha1(source.read_bytes()) == git_hash_object(source), source
        assert dl.file_blob_sha1(source) == git_hash_object(source), source
    assert dl.git_blob_sha1(b"") == git_hash_object(data=b"")
    assert dl.git_blob_sha1(b"a\0b\n") == git_hash_object(data=b"a\0b\n")


@needs_git
@needs_shared
def test_manifests_agree_with_every_shared_copy():
    copies = shared_copies()
    assert len(copies) >= 20
    for repo, path, source in copies:
        assert repo.files[path] == git_hash_object(source), (repo.source(path), source)


def test_shipped_manifests_pin_the_commits_and_name_every_file():
    assert dl.manifest_names() == ["dreambooth", "llm_adapters"]
    assert (LLM.owner, LLM.name, LLM.commit) == ("AGI-Edgerunners", "LLM-Adapters",
                                                 "816657208af4db747803f87ba40a4c71383fed7a")
    sets = ["ARC-Challenge", "ARC-Easy", "boolq", "hellaswag", "openbookqa", "piqa", "social_i_qa", "winogrande"]
    assert set(LLM.files) == {f"dataset/{s}/test.json" for s in sets} | {
        "ft-training_set/commonsense_170k.json", "DATA_LICENSE"}
    assert (DB.owner, DB.name, DB.commit) == ("google", "dreambooth", "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0")
    subjects = {p.split("/")[1] for p in DB.files if p.endswith(".jpg")}
    assert len(subjects) == 30 and all(4 <= len(DB.under(f"dataset/{s}")) <= 6 for s in subjects)
    assert {"LICENSE.md", "dataset/prompts_and_classes.txt", "dataset/references_and_licenses.txt"} <= set(DB.files)
    assert LLM.url(BOOLQ) == ("https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/"
                              "816657208af4db747803f87ba40a4c71383fed7a/dataset/boolq/test.json")


@needs_shared
def test_dreambooth_subjects_are_those_of_prompts_and_classes():
    lines = (DREAMBOOTH / "prompts_and_classes.txt").read_text().splitlines()
    start = lines.index("subject_name,class") + 1
    listed = {line.split(",")[0] for line in lines[start:lines.index("", start)]}
    assert listed == {p.split("/")[1] for p in DB.files if p.endswith(".jpg")}


@pytest.mark.parametrize("change", [{"files": {"../escape.json": "0" * 40}}, {"files": {"a.json": "abc"}},
                                    {"commit": "8166572"}, {"files": None}])
def test_bad_manifests_are_refused(change):
    data = {"owner": "o", "name": "n", "commit": "a" * 40, "files": {"a.json": "b" * 40}, **change}
    if data["files"] is None:
        del data["files"]
    with pytest.raises(ConfigError):
        dl.repo_from_dict(data)
    with pytest.raises(ConfigError, match="unknown data manifest"):
        dl.load_manifest("nope")


def test_cache_root_honours_hf_home_and_lilyexp_cache(monkeypatch, tmp_path):
    assert dl.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("LILYEXP_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert dl.cache_root() == tmp_path / "hf" / "lilyexp" / "github"
    assert dl.repo_cache(LLM) == tmp_path / "hf" / "lilyexp" / "github" / "AGI-Edgerunners" / "LLM-Adapters" / (
        LLM.commit)
    assert dl.repo_cache(DB, tmp_path / "x") == tmp_path / "x" / "google" / "dreambooth" / DB.commit
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.cache_root() == tmp_path / "home" / ".cache" / "huggingface" / "lilyexp" / "github"


# --- downloads against the loopback server ----------------------------------------------------------------------

def test_download_verifies_and_caches_and_a_second_call_makes_no_request(server, monkeypatch, clean_env):
    monkeypatch.setenv("LILYEXP_GITHUB_RAW", server.url)
    local = dl.fetch_file(LLM, BOOLQ, hint=HINT)
    assert local == clean_env / "AGI-Edgerunners" / "LLM-Adapters" / LLM.commit / BOOLQ
    assert local.read_bytes() == (COMMONSENSE / "boolq" / "test.json").read_bytes()
    assert server.requests == [(f"/AGI-Edgerunners/LLM-Adapters/{LLM.commit}/{BOOLQ}", dl.USER_AGENT)]
    assert dl.fetch_file(LLM, BOOLQ, hint=HINT) == local
    assert len(server.requests) == 1
    assert leftovers(clean_env) == ["test.json"]  # no temporary file left beside it


def test_cached_copy_is_verified_again_on_every_use(server, monkeypatch):
    local = dl.fetch_file(LLM, BOOLQ, hint=HINT, base_url=server.url)
    good = local.read_bytes()
    local.write_bytes(good[:-1] + b" ")  # same size, other bytes
    assert dl.fetch_file(LLM, BOOLQ, hint=HINT, base_url=server.url).read_bytes() == good
    assert len(server.requests) == 2
    local.write_bytes(b"[]")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dl.DataUnavailable, match="wrong hash") as caught:
        dl.fetch_file(LLM, BOOLQ, hint=HINT, base_url=server.url)
    assert_one_sentence(str(caught.value), LLM, BOOLQ)
    assert len(server.requests) == 2


def test_served_bytes_with_another_hash_are_refused_and_not_cached(server, clean_env):
    real = (COMMONSENSE / "boolq" / "test.json").read_bytes()
    server.put(LLM, BOOLQ, data=real.replace(b"true", b"True", 1))
    with pytest.raises(ConfigError, match="not the pinned 6d7edb0a8e8a6566b546ccf0d98d24e48db3fdf3") as caught:
        dl.fetch_file(LLM, BOOLQ, hint=HINT, base_url=server.url)
    assert_one_sentence(str(caught.value), LLM, BOOLQ)
    assert leftovers(clean_env) == []  # neither the final name nor a temporary file


@pytest.mark.parametrize("failure", ["404", "down", "timeout"])
def test_unreachable_file_is_one_sentence_with_the_hint(server, failure, clean_env):
    base = server.url
    if failure == "down":
        with socket.socket() as sock:  # a loopback port nothing listens on
            sock.bind(("127.0.0.1", 0))
            base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.mode = {"404": "404", "timeout": "hang"}.get(failure, "serve")
    with pytest.raises(dl.DataUnavailable) as caught:
        dl.fetch_file(LLM, BOOLQ, hint=HINT, base_url=base, timeout=0.5)
    message = str(caught.value)
    assert_one_sentence(message, LLM, BOOLQ)
    expected = {"404": "answered HTTP 404", "down": "the download from 127.0.0.1:", "timeout": "no answer within 0.5 s"}
    assert expected[failure] in message
    assert leftovers(clean_env) == []


def test_missing_file_without_a_hint_says_where_a_copy_may_go(server):
    server.mode = "404"
    with pytest.raises(dl.DataUnavailable, match="put a copy of the file at .*boolq/test.json"):
        dl.fetch_file(LLM, BOOLQ, base_url=server.url)


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "LILYEXP_OFFLINE"])
def test_offline_mode_uses_the_cache_or_fails_without_a_request(server, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    with pytest.raises(dl.DataUnavailable, match="offline mode is on .* holds no copy") as caught:
        dl.fetch_file(LLM, BOOLQ, hint=HINT, base_url=server.url)
    assert_one_sentence(str(caught.value), LLM, BOOLQ)
    assert server.requests == []
    monkeypatch.delenv(switch)
    local = dl.fetch_file(LLM, BOOLQ, hint=HINT, base_url=server.url)
    monkeypatch.setenv(switch, "true")
    assert dl.fetch_file(LLM, BOOLQ, hint=HINT, base_url=server.url) == local
    assert len(server.requests) == 1


def test_folder_fetch_gets_every_file_of_a_dreambooth_subject(server):
    folder = dl.fetch_folder(DB, "dataset/wolf_plushie/", hint="set task.instance_dir to a local image folder",
                             base_url=server.url)
    expected = sorted(p.name for p in (DREAMBOOTH / "wolf_plushie").glob("*.jpg"))
    assert sorted(p.name for p in folder.iterdir()) == expected == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    for name in expected:
        assert (folder / name).read_bytes() == (DREAMBOOTH / "wolf_plushie" / name).read_bytes()
    assert len(server.requests) == 5
    assert dl.fetch_folder(DB, "dataset/wolf_plushie", base_url=server.url) == folder
    assert len(server.requests) == 5


def test_unknown_paths_and_folders_are_config_errors(server):
    with pytest.raises(ConfigError, match="not in the manifest"):
        dl.fetch_file(LLM, "dataset/boolq/train.json", base_url=server.url)
    with pytest.raises(ConfigError, match="no file of the manifest"):
        dl.fetch_folder(DB, "dataset/no_such_subject", base_url=server.url)
    assert server.requests == []


def test_large_files_show_a_progress_bar(server, monkeypatch, capsys):
    monkeypatch.setattr(dl, "PROGRESS_FROM", 1)
    dl.fetch_file(DB, "dataset/dog/00.jpg", base_url=server.url)
    assert "dataset/dog/00.jpg" in capsys.readouterr().err


def test_commonsense_test_sets_come_from_the_pinned_commit_without_a_data_dir(server, monkeypatch):
    from lilyexp.tasks import commonsense as cs

    monkeypatch.setenv("LILYEXP_GITHUB_RAW", server.url)
    data = cs.llm_adapters_files(None, str(COMMONSENSE / "boolq" / "train.json"), ["boolq", "piqa"])
    assert len(data.eval_sets["boolq"]) == 3270 and len(data.eval_sets["piqa"]) == 1838
    assert {p for p, _ in server.requests} == {f"/{LLM.owner}/{LLM.name}/{LLM.commit}/dataset/{s}/test.json"
                                               for s in ("boolq", "piqa")}


def test_a_training_file_with_the_wrong_bytes_is_refused_and_not_cached(server, monkeypatch, clean_env):
    from lilyexp.tasks import commonsense as cs

    monkeypatch.setenv("LILYEXP_GITHUB_RAW", server.url)
    server.put(LLM, "ft-training_set/commonsense_170k.json", data=b"[]")
    with pytest.raises(ConfigError, match="commonsense_170k.json.*task.train_file"):
        cs.training_records(None, cs.DEFAULT_TRAIN_FILE)
    assert not list(clean_env.rglob("commonsense_170k.json"))


@pytest.mark.slow
def test_the_mission_command_downloads_its_test_sets(server, tmp_path):
    """`python -m lilyexp.run backbone=<b> task=commonsense method=lily` with no data folder: the test sets come
    from the pinned commit (here a loopback server; the 170K training file is not in our shared copies, so a local
    training file stands in)."""
    from conftest import run_cli

    env = {"LILYEXP_GITHUB_RAW": server.url, "LILYEXP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0"}
    result = run_cli(["backbone=tiny_llama", "task=commonsense", "method=lily", "debug=smoke", "task.subset=[boolq]",
                      f"task.train_file={COMMONSENSE / 'boolq' / 'train.json'}", "task.generation.num_beams=1",
                      "task.generation.max_new_tokens=4"], tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("record: ")
    assert (tmp_path / "cache" / LLM.owner / LLM.name / LLM.commit / BOOLQ).is_file()


def test_a_dreambooth_subject_comes_from_the_pinned_commit_without_a_data_dir(server, monkeypatch):
    from lilyexp.tasks.dreambooth import dataset_root, prepare_instance_data

    monkeypatch.setenv("LILYEXP_GITHUB_RAW", server.url)
    root = dataset_root(None, "duck_toy")
    assert (root / "prompts_and_classes.txt").is_file() and len(list((root / "duck_toy").glob("*.jpg"))) == 4
    assert prepare_instance_data(root, "duck_toy", resolution=32, vae_scale_factor=2).prompt == "a photo of duck_toy"
    with pytest.raises(ConfigError, match="'teddy' is not in google/dreambooth; known: .*wolf_plushie"):
        dataset_root(None, "teddy")
