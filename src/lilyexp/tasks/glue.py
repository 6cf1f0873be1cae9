"""GLUE as the Lily NLU code runs it (natural-language-understanding/glue.py, run.sh): the hub's ``nyu-mll/glue``
or a local folder of the classic GLUE TSVs (``glue_data/<TASK>/{train,dev}.tsv``), both read into the same columns
and labels; metrics from the package's ``evaluate`` GLUE module (offline). The number the paper reports is the best
epoch on the validation split."""

from __future__ import annotations

import csv
import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lilyexp.errors import ConfigError
from lilyexp.settings import knob
from lilyexp.tasks import TaskSettings

METRIC_MODULE = str(Path(__file__).with_name("glue_metric.py"))


@dataclass(frozen=True)
class GlueSubset:
    """Where a GLUE subset's fields are, on the hub and in the classic TSV files."""

    hub_fields: tuple[str, ...]  # text columns on the hub
    folder: str  # glue_data/<folder>
    tsv_fields: tuple[int, ...]  # text column indices in the TSV
    tsv_label: int  # label column index (-1 = last)
    header: bool = True
    num_labels: int = 2
    main_metric: str = "accuracy"
    label_names: tuple[str, ...] = ()  # TSV string labels in hub id order
    dev_file: str = "dev.tsv"
    hub_validation: str = "validation"


SUBSETS = {
    "cola": GlueSubset(("sentence",), "CoLA", (3,), 1, header=False, main_metric="matthews_correlation"),
    "sst2": GlueSubset(("sentence",), "SST-2", (0,), 1),
    "mrpc": GlueSubset(("sentence1", "sentence2"), "MRPC", (3, 4), 0),
    "stsb": GlueSubset(("sentence1", "sentence2"), "STS-B", (7, 8), 9, num_labels=1, main_metric="pearson"),
    "qnli": GlueSubset(("question", "sentence"), "QNLI", (1, 2), 3, label_names=("entailment", "not_entailment")),
    "rte": GlueSubset(("sentence1", "sentence2"), "RTE", (1, 2), 3, label_names=("entailment", "not_entailment")),
    "qqp": GlueSubset(("question1", "question2"), "QQP", (3, 4), 5),
    "mnli": GlueSubset(("premise", "hypothesis"), "MNLI", (8, 9), -1, num_labels=3,
                       label_names=("entailment", "neutral", "contradiction"), dev_file="dev_matched.tsv",
                       hub_validation="validation_matched"),
}


@dataclass
class GlueSettings(TaskSettings):
    """task=glue: one GLUE subset from the hub or a local folder of the classic TSVs."""

    subset: str = knob("cola", choices=tuple(SUBSETS), help="the GLUE task")
    data_dir: Optional[str] = knob(None, help="a glue_data/ folder (<TASK>/train.tsv, dev.tsv); None = the hub")
    max_length: int = knob(512)
    subsample_seed: int = knob(0, help="seed of the train_limit subsample (the same for every run)")
    val_fraction: Optional[float] = knob(None, help="hold out this fraction of the training file as the selection "
                                                    "split; the GLUE dev split is then tested once (None: select "
                                                    "on dev, as the paper)")
    val_max: Optional[int] = knob(None, help="at most this many held-out examples (with val_fraction)")
    val_seed: int = knob(0, help="seed of the held-out split (the same for every run)")


def label_of(value: Any, subset: GlueSubset) -> float | int:
    """A label as the model's head takes it, range-checked: a score in [0, 5] (STS-B), or a class index."""
    if subset.num_labels == 1:
        score = float(value)
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"score {value!r} is outside STS-B's [0, 5]")
        return score
    if subset.label_names and isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        if value not in subset.label_names:
            raise ValueError(f"label {value!r} is none of {', '.join(subset.label_names)}")
        return subset.label_names.index(value)
    index = int(value)
    if not 0 <= index < subset.num_labels:
        raise ValueError(f"label {value!r} is outside the task's {subset.num_labels} classes")
    return index


def example(texts: list[str], label: Any, subset: GlueSubset) -> dict:
    return {"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": label_of(label, subset)}


def read_rows(path: Path) -> list[list[str]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}).") from None


def read_tsv(path: Path, subset: GlueSubset) -> list[dict]:
    """GLUE TSVs: tab-separated with quoting off (fields hold unbalanced quotes), MRPC's UTF-8 BOM, CoLA's
    missing header, STS-B's 10 columns, string labels for QNLI/RTE/MNLI. Every row's label is checked, naming the
    file and line; an empty file is refused."""
    if not path.exists():
        raise ConfigError(f"GLUE file missing: {path} (classic layout glue_data/<TASK>/train.tsv, dev.tsv).")
    first = 2 if subset.header else 1  # the line number of the first data row
    rows = [(number, row) for number, row in enumerate(read_rows(path)[first - 1:], first) if row]
    if not rows:
        raise ConfigError(f"{path} holds no examples.")
    examples = []
    for number, row in rows:
        try:
            examples.append(example([row[i] for i in subset.tsv_fields], row[subset.tsv_label], subset))
        except (IndexError, ValueError) as exc:
            raise ConfigError(f"{path} line {number} does not fit the {subset.folder} GLUE layout ({exc}).") from None
    return examples


def from_hub_rows(rows, subset: GlueSubset) -> list[dict]:
    return [example([row[f] for f in subset.hub_fields], row["label"], subset) for row in rows]


def load_hub(name: str, subset: GlueSubset) -> tuple[list[dict], list[dict]]:
    from datasets import load_dataset

    try:
        data = load_dataset("nyu-mll/glue", name)
    except (OSError, ConnectionError, ValueError) as exc:
        raise ConfigError(f"could not load GLUE '{name}' from the hub (nyu-mll/glue: {type(exc).__name__}); set "
                          f"task.data_dir to a local glue_data folder of the classic TSVs.") from None
    return from_hub_rows(data["train"], subset), from_hub_rows(data[subset.hub_validation], subset)


def carve_validation(train: list, fraction: float, limit: int | None, seed: int) -> tuple[list, list]:
    """Split the training examples in two with a permutation seeded by ``seed`` alone: the held-out part
    (``fraction`` of them, at most ``limit``) and the rest. The same for every run, method and training seed."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    size = min(max(1, round(fraction * len(train))), limit or len(train))
    held_out = set(order[:size])
    return ([e for i, e in enumerate(train) if i not in held_out], [train[i] for i in sorted(held_out)])


def check_split_settings(**values: float | int | None) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"task.{key} must be positive, got {value}.")
    fraction = values.get("val_fraction")
    if fraction is not None and not fraction < 1:
        raise ConfigError(f"task.val_fraction is the share of the training file held out, in (0, 1); got {fraction}.")


class GlueTask:
    """One GLUE subset: training and validation examples ({text_a, text_b, label}), metric, label count.

    By default the checkpoint is selected on the dev split, which is also the split reported (the paper's rule,
    ``best_epoch``). With ``val_fraction`` a part of the training file is held out for selection and the dev split
    is tested once with the selected weights (``val_selected``): dev then never informs a choice."""

    scoring_version = 1  # bump when how this task scores changes: older records then count as outdated

    def __init__(self, subset: str, data_dir: str | None = None, max_length: int = 512,
                 train_limit: int | None = None, eval_limit: int | None = None, subsample_seed: int = 0,
                 val_fraction: float | None = None, val_max: int | None = None, val_seed: int = 0):
        """``train_limit`` keeps a random subsample of that size, drawn with ``subsample_seed`` (fixed across
        runs, so every method and seed trains on the same examples) from what the held-out split left;
        ``eval_limit`` keeps the first examples of each evaluation split."""
        if subset not in SUBSETS:
            raise ConfigError(f"unknown GLUE task '{subset}'; one of {sorted(SUBSETS)}.")
        check_split_settings(max_length=max_length, train_limit=train_limit, eval_limit=eval_limit,
                             val_fraction=val_fraction, val_max=val_max)
        self.name, self.subset, self.max_length = subset, SUBSETS[subset], max_length
        if data_dir is None:
            train, validation = load_hub(subset, self.subset)
        else:
            folder = Path(data_dir).expanduser() / self.subset.folder
            if not folder.parent.is_dir():
                raise ConfigError(f"task.data_dir '{folder.parent}' does not exist.")
            train, validation = read_tsv(folder / "train.tsv", self.subset), read_tsv(folder / self.subset.dev_file,
                                                                                      self.subset)
        held_out = None
        if val_fraction is not None:
            train, held_out = carve_validation(train, val_fraction, val_max, val_seed)
        if train_limit is not None and train_limit < len(train):
            train = random.Random(subsample_seed).sample(train, train_limit)
        self.train = train
        if held_out is None:
            self.validation, self.final = validation[:eval_limit], None
        else:
            self.validation, self.final = held_out[:eval_limit], validation[:eval_limit]
            self.splits = {"train": f"train minus held-out {val_fraction:g} (val_seed {val_seed})",
                           "selection": "held-out part of train", "final": "validation (GLUE dev)"}
            self.selection_rule = "val_selected"
        self.model_kwargs = {"num_labels": self.subset.num_labels}

    @property
    def is_regression(self) -> bool:
        return self.subset.num_labels == 1

    @property
    def num_classes(self) -> int:
        return self.subset.num_labels

    @property
    def main_metric(self) -> str:
        return f"val/{self.subset.main_metric}"

    @functools.cached_property
    def metric(self):
        import evaluate

        return evaluate.load(METRIC_MODULE, self.name)

    def score(self, split: str, predictions: list, references: list) -> dict[str, float]:
        scores = self.metric.compute(predictions=predictions, references=references)
        return {f"{split}/{k}": v for k, v in scores.items()}

    # What the shared classification loop (recipes/classify.py) asks of a task (the paper's rule; a held-out
    # selection split replaces the last three in __init__).
    splits = {"train": "train", "selection": "validation", "final": None}
    selection_rule = "best_epoch"
    selection_split = "val"
    eval_every_epochs = 1
    eval_batch_size = None   # the official GLUE code evaluates at the training batch size

    def prepare(self, tokenizer: Any, examples: list[dict]) -> list[dict]:
        """Single-sentence or sentence-pair tokenisation up to ``max_length`` (padding comes per batch)."""
        return [{**tokenizer(e["text_a"], e["text_b"], truncation=True, max_length=self.max_length),
                 "labels": e["label"]} for e in examples]

    def collate(self, tokenizer: Any, features: list[dict]) -> dict:
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.float if self.is_regression else torch.long)
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
        return {**batch, "labels": labels}

    @staticmethod
    def logits(model: Any, batch: dict) -> torch.Tensor:
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits
