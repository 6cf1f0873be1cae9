"""``python -m lilyexp.describe [overrides]``: every setting of the composed cell, group by group, with its value in
this composition, its type, its default and what it does (the schemas' help texts), and whether it is part of the
cell's identity (a knob) or bookkeeping. E.g. ``python -m lilyexp.describe method=lily task=glue``."""

from __future__ import annotations

import dataclasses
import sys
import typing

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lilyexp.compose import CONF_DIR, check_override_keys
from lilyexp.errors import ConfigError
from lilyexp.settings import GROUPS, PathsSettings, RunSettings, default_of, kind_of, schema_of

KINDS = {"knob": "cell", "bookkeeping": "bookkeeping", "meta": "declared by the yaml", "plumbing": "wiring"}


def type_name(annotation: typing.Any) -> str:
    """``int``, ``float or None``, ``list``: the annotation as a reader says it."""
    text = annotation if isinstance(annotation, str) else \
        annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "")
    return f"{text[len('Optional['):-1]} or None" if text.startswith("Optional[") else text


def rows(node: dict, schema: type, prefix: str) -> list[tuple[str, ...]]:
    out = []
    for item in dataclasses.fields(schema):
        kind = kind_of(item)
        if kind == "plumbing":
            continue
        value = node.get(item.name, default_of(item))
        choices = item.metadata.get("choices")
        help_text = item.metadata.get("help", "") + (f" (one of: {', '.join(map(str, choices))})" if choices else "")
        out.append((f"{prefix}{item.name}", str(value), type_name(item.type), str(default_of(item)), KINDS[kind],
                    help_text))
    return out


def describe(overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides)
    sections = []
    for group in GROUPS:
        node = OmegaConf.to_container(cfg[group], resolve=True)
        schema = schema_of(cfg[group], group)
        sections.append((f"{group}={cfg[group].get('name', '')} ({schema.__module__}.{schema.__qualname__})",
                         rows(node, schema, f"{group}.")))
    top = {k: OmegaConf.select(cfg, k) for k in cfg if k not in (*GROUPS, "logger", "paths", "hydra")}
    sections.append(("run", rows(top, RunSettings, "")))
    sections.append(("paths", rows(OmegaConf.to_container(cfg.paths, resolve=True), PathsSettings, "paths.")))
    lines = []
    for title, table in sections:
        lines += ["", f"## {title}", "", "| setting | value | type | default | kind | what it does |",
                  "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    lines += ["", "kind: `cell` settings make the cell's identity when they differ from their default; `bookkeeping` "
              "ones do not (where files go, resume, logging)."]
    return "\n".join(lines).lstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        check_override_keys(overrides)
        print(describe(overrides), end="")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


CHOOSABLE = ("backbone", "task", "method", "trainer", "logger", "experiment", "debug", "paths")


def usage() -> str:
    """``python -m lilyexp.run --help``: the choosable groups and their options (not the internal ``family``
    fragments), and where each setting is described."""
    lines = ["lilyexp: one run = backbone x task x method (+ trainer, logger, paths), from the config tree.", "",
             "  python -m lilyexp.run backbone=<option> task=<option> method=<option> [group.setting=value ...]",
             "  python -m lilyexp.run -m trainer.lr=1e-4,3e-4 ...     (a sweep; hydra/launcher=slurm on a cluster)",
             "", "Groups and their options:"]
    for group in CHOOSABLE:
        options = sorted(str(p.relative_to(CONF_DIR / group).with_suffix(""))
                         for p in (CONF_DIR / group).rglob("*.yaml") if not p.name.startswith("base"))
        lines.append(f"  {group}: {', '.join(options)}")
    lines += ["", "Every setting with its type, default and meaning: python -m lilyexp.describe [the same overrides]",
              "The composed config: python -m lilyexp.run [overrides] --cfg job", ""]
    return "\n".join(lines)
