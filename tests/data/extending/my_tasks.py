"""A task as one module: sentence classification from two JSON-lines files (``train.jsonl``, ``dev.jsonl`` in
``task.data_dir``, one ``{"text": ..., "label": <int>}`` per line), scored by accuracy and trained by lilyexp's
classification recipe, whose protocol (lilyexp.contracts.ClassificationTask) this class keeps."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lilyexp.errors import ConfigError
from lilyexp.settings import knob
from lilyexp.tasks import TaskSettings


@dataclass
class JsonlSettings(TaskSettings):
    """The settings of task=jsonl_classification (its yaml's schema)."""

    data_dir: Optional[str] = knob(None, help="the folder holding train.jsonl and dev.jsonl")
    num_labels: int = knob(2)
    max_length: int = knob(128, help="tokens per example")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (task.data_dir holds train.jsonl and dev.jsonl).")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlClassification:
    scoring_version = 1  # bump when score() changes: records scored before then count as outdated
    splits = {"train": "train.jsonl", "selection": "dev.jsonl", "final": None}
    selection_rule, selection_split, main_metric = "best_epoch", "val", "val/accuracy"
    eval_every_epochs, eval_batch_size, is_regression, final = 1, None, False, None

    def __init__(self, data_dir: Optional[str], num_labels: int, max_length: int, train_limit: Optional[int] = None,
                 eval_limit: Optional[int] = None):
        if data_dir is None:
            raise ConfigError("task.data_dir is not set: point it at the folder holding train.jsonl and dev.jsonl.")
        self.train = read_jsonl(Path(data_dir) / "train.jsonl")[:train_limit]
        self.validation = read_jsonl(Path(data_dir) / "dev.jsonl")[:eval_limit]
        self.num_classes, self.max_length = num_labels, max_length
        self.model_kwargs = {"num_labels": num_labels}  # what the backbone's classification head needs

    def prepare(self, tokenizer, examples: list[dict]) -> list[dict]:
        return [{**tokenizer(e["text"], truncation=True, max_length=self.max_length), "labels": e["label"]}
                for e in examples]

    def collate(self, tokenizer, features: list[dict]) -> dict:
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
        return {**batch, "labels": torch.tensor([f["labels"] for f in features])}

    @staticmethod
    def logits(model, batch: dict) -> torch.Tensor:
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def score(self, split: str, predictions: list, references: list) -> dict[str, float]:
        correct = sum(p == r for p, r in zip(predictions, references))
        return {f"{split}/accuracy": correct / max(len(references), 1)}
