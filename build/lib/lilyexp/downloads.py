"""Data files of public GitHub repositories, pinned to one commit, fetched once and verified by git blob hash.

Some data the paper uses exists only as files in a GitHub repository (LLM-Adapters' commonsense test sets, the
DreamBooth images). A branch can move, a commit cannot; and git names every file at a commit by its blob id,
sha1 over ``b"blob <size>\\0" + content``, which is what ``git hash-object`` prints. A manifest (package data under
``lilyexp/manifests/``) records the commit and each path's blob id, so a download is accepted only if its bytes
are exactly those of the pinned commit, and a cached copy is checked again every time it is used.

Where files go: ``$LILYEXP_CACHE/<owner>/<name>/<commit>/<path>`` when ``LILYEXP_CACHE`` is set, else the same
layout under ``<Hugging Face cache root>/lilyexp/github/`` (``HF_HOME``, default ``~/.cache/huggingface``), so
whatever already moves or shares the Hugging Face cache carries these files too.

``HF_HUB_OFFLINE=1`` or ``LILYEXP_OFFLINE=1``: never touch the network, use the cache or fail.
``LILYEXP_GITHUB_RAW=<base URL>``: fetch ``<base>/<owner>/<name>/<commit>/<path>`` instead of
raw.githubusercontent.com (a mirror, a ``file:///`` folder laid out that way, a loopback server in tests).
``HF_HUB_DISABLE_PROGRESS_BARS=1``: no byte progress bar (shown otherwise for files of 4 MiB and more).

Files are written to a temporary name beside their final one and renamed only once their hash verifies, so a
partial or wrong file never appears under the final name, and processes fetching the same file at once (one per
GPU) each end with the same verified bytes.

Every failure is one :class:`DataUnavailable` sentence naming the file, its pinned source and how to use a local
copy instead (the caller's ``hint``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Mapping

from tqdm.auto import tqdm

from lilyexp.errors import ConfigError

RAW_URL = "https://raw.githubusercontent.com/{owner}/{name}/{commit}/{path}"
USER_AGENT = "lilyexp-downloads/0.1 (+https://arxiv.org/abs/2407.09946)"
TIMEOUT_S = 60.0
CHUNK = 1 << 20
PROGRESS_FROM = 4 << 20  # bytes; smaller files download too fast for a bar to help
TRUE_VALUES = {"1", "true", "yes", "on"}
_HEX40 = re.compile(r"[0-9a-f]{40}")


class DataUnavailable(ConfigError):
    """A pinned data file could not be had (offline, unreachable, missing upstream) or its bytes were wrong."""


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints for a file with these bytes)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_blob_sha1(path: Path) -> str:
    """:func:`git_blob_sha1` of a file's content, read in chunks (training files are tens of MB)."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_relative(path: str) -> bool:
    """A manifest path must stay inside the cache folder it is joined to."""
    parts = PurePosixPath(path).parts
    return bool(parts) and not path.startswith("/") and "\\" not in path and not {"..", "."} & set(parts)


@dataclass(frozen=True)
class PinnedRepo:
    """One commit of a public GitHub repository and the blob id of each file we may fetch from it."""

    owner: str
    name: str
    commit: str
    files: Mapping[str, str] = field(repr=False, hash=False)  # path in the repository -> git blob sha1
    raw_url: str = RAW_URL  # template with {owner}, {name}, {commit}, {path}

    def __post_init__(self):
        if not _HEX40.fullmatch(self.commit):
            raise ConfigError(f"{self.owner}/{self.name}: commit '{self.commit}' is not a full 40-digit sha1.")
        bad = [p for p, blob in self.files.items() if not _safe_relative(p) or not _HEX40.fullmatch(str(blob))]
        if bad:
            raise ConfigError(f"{self.owner}/{self.name}@{self.commit}: bad manifest entries {bad[:3]} (a "
                              f"relative path without '..' and a 40-digit lower-case blob sha1 each).")
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))

    def source(self, path: str) -> str:
        """``owner/name@commit/path``: what a file is, independent of where it is fetched from."""
        return f"{self.owner}/{self.name}@{self.commit}/{path}"

    def url(self, path: str, base_url: str | None = None) -> str:
        """The raw URL of ``path`` at the pinned commit; ``base_url`` replaces the host part of the default form."""
        quoted = urllib.parse.quote(path, safe="/")
        if base_url:
            return f"{base_url.rstrip('/')}/{self.owner}/{self.name}/{self.commit}/{quoted}"
        return self.raw_url.format(owner=self.owner, name=self.name, commit=self.commit, path=quoted)

    def under(self, folder: str) -> list[str]:
        """Manifest paths inside ``folder`` (recursively), sorted."""
        prefix = folder.strip("/") + "/"
        return sorted(p for p in self.files if p.startswith(prefix))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def offline() -> bool:
    """True when the network must not be used (the Hugging Face switch or our own)."""
    return _flag("HF_HUB_OFFLINE") or _flag("LILYEXP_OFFLINE")


def cache_root() -> Path:
    """``$LILYEXP_CACHE``, else ``<HF_HOME>/lilyexp/github`` with HF_HOME resolved as huggingface_hub does."""
    if os.environ.get("LILYEXP_CACHE"):
        return Path(os.environ["LILYEXP_CACHE"]).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    hf_home = Path(os.environ["HF_HOME"]).expanduser() if os.environ.get("HF_HOME") else xdg / "huggingface"
    return hf_home / "lilyexp" / "github"


def repo_cache(repo: PinnedRepo, cache_dir: str | Path | None = None) -> Path:
    """The folder holding the cached files of ``repo``'s pinned commit (laid out as in the repository)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / repo.owner / repo.name / repo.commit


def _verified(path: Path, blob: str) -> bool:
    return path.is_file() and file_blob_sha1(path) == blob


def _default_hint(local: Path) -> str:
    return f"put a copy of the file at {local} (it is checked against the same hash)"


def _unavailable(repo: PinnedRepo, path: str, why: str, hint: str) -> DataUnavailable:
    return DataUnavailable(f"could not get '{PurePosixPath(path).name}' ({repo.source(path)}): {why}; "
                           f"{hint.rstrip('. ')}.")


def _reason(exc: BaseException, timeout: float) -> str:
    """A short cause for the error sentence (urllib wraps socket errors in URLError.reason)."""
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(cause).rstrip(".") or type(cause).__name__


def _no_bar(size: int | None) -> bool:
    return _flag("HF_HUB_DISABLE_PROGRESS_BARS") or (size is not None and size < PROGRESS_FROM)


def _stream(url: str, handle, timeout: float, label: str) -> None:
    """Copy the body at ``url`` into ``handle``, with a byte progress bar for large files."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        with tqdm(total=size, desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                  disable=_no_bar(size)) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                handle.write(chunk)
                bar.update(len(chunk))


def _temporary(local: Path) -> Path:
    """An empty hidden file beside ``local``: same file system, so the final rename is atomic, and a name that
    no ``*.jpg`` or ``*.json`` glob over the folder picks up if the process dies mid-download."""
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".part")
    except OSError as exc:
        raise ConfigError(f"cannot write to the download cache {local.parent} ({exc.strerror or exc}); set "
                          f"LILYEXP_CACHE to a writable folder.") from None
    os.close(fd)
    return Path(name)


def _server(url: str) -> str:
    """The host a URL points at (the full URL is the pinned source, already in the sentence)."""
    return urllib.parse.urlsplit(url).netloc or url


def _download(repo: PinnedRepo, path: str, local: Path, url: str, timeout: float, hint: str) -> None:
    """Fetch ``url`` and move it to ``local`` only if its blob hash is the pinned one."""
    tmp = _temporary(local)
    try:
        try:
            with tmp.open("wb") as handle:
                _stream(url, handle, timeout, path)
        except urllib.error.HTTPError as exc:
            why = f"{_server(url)} answered HTTP {exc.code} {exc.reason}".rstrip()
            raise _unavailable(repo, path, why, hint) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            why = f"the download from {_server(url)} failed ({_reason(exc, timeout)})"
            raise _unavailable(repo, path, why, hint) from None
        got = file_blob_sha1(tmp)
        if got != repo.files[path]:
            why = (f"the bytes from {_server(url)} have git blob {got}, not the pinned {repo.files[path]}, so "
                   f"nothing was cached")
            raise _unavailable(repo, path, why, hint)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_file(repo: PinnedRepo, path: str, *, hint: str | None = None, base_url: str | None = None,
               cache_dir: str | Path | None = None, timeout: float = TIMEOUT_S) -> Path:
    """Local path of ``path`` at the pinned commit: the cached copy when its hash verifies, else a fresh download
    (unless offline). ``hint`` ends the error sentence: how to use a local copy instead (e.g. "set
    task.data_dir to a folder holding <set>/test.json"). ``base_url`` wins over ``LILYEXP_GITHUB_RAW``;
    ``timeout`` is in seconds per network operation."""
    if path not in repo.files:
        raise ConfigError(f"'{path}' is not in the manifest of {repo.owner}/{repo.name}@{repo.commit}.")
    local = repo_cache(repo, cache_dir) / path
    if _verified(local, repo.files[path]):
        return local
    if offline():
        held = "a copy with the wrong hash" if local.exists() else "no copy"
        where = f" at {local}" if hint else ""  # the default hint names the place already
        raise _unavailable(repo, path, f"offline mode is on (HF_HUB_OFFLINE or LILYEXP_OFFLINE) and the cache "
                                       f"holds {held}{where}", hint or _default_hint(local))
    hint = hint or _default_hint(local)
    _download(repo, path, local, repo.url(path, base_url or os.environ.get("LILYEXP_GITHUB_RAW")), timeout, hint)
    return local


def fetch_folder(repo: PinnedRepo, folder: str, *, hint: str | None = None, base_url: str | None = None,
                 cache_dir: str | Path | None = None, timeout: float = TIMEOUT_S) -> Path:
    """Local folder holding every manifest file under ``folder`` (e.g. ``dataset/wolf_plushie``), each fetched
    and verified as :func:`fetch_file` does."""
    paths = repo.under(folder)
    if not paths:
        raise ConfigError(f"no file of the manifest of {repo.owner}/{repo.name}@{repo.commit} is under "
                          f"'{folder.strip('/')}/'.")
    for path in paths:
        fetch_file(repo, path, hint=hint, base_url=base_url, cache_dir=cache_dir, timeout=timeout)
    return repo_cache(repo, cache_dir) / folder.strip("/")


def manifest_names() -> list[str]:
    """Names of the manifests shipped with lilyexp (``llm_adapters``, ``dreambooth``)."""
    folder = resources.files("lilyexp").joinpath("manifests")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def repo_from_dict(data: Mapping, origin: str = "manifest") -> PinnedRepo:
    """A :class:`PinnedRepo` from a manifest's JSON object (``owner``, ``name``, ``commit``, ``files``,
    optional ``raw_url``; other keys such as ``about`` are descriptions)."""
    missing = [k for k in ("owner", "name", "commit", "files") if k not in data]
    if missing:
        raise ConfigError(f"{origin} lacks {missing}.")
    return PinnedRepo(owner=data["owner"], name=data["name"], commit=data["commit"], files=data["files"],
                      raw_url=data.get("raw_url", RAW_URL))


def load_manifest(name: str) -> PinnedRepo:
    """The shipped manifest ``lilyexp/manifests/<name>.json``."""
    ref = resources.files("lilyexp").joinpath("manifests", f"{name}.json")
    if not ref.is_file():
        raise ConfigError(f"unknown data manifest '{name}'; shipped: {manifest_names()}.")
    return repo_from_dict(json.loads(ref.read_text(encoding="utf-8")), f"manifest '{name}'")
