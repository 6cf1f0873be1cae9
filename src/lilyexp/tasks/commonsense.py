"""Commonsense reasoning as LLM-Adapters and the Lily code run it (commonsense-reasoning/finetune_*.py, evaluate_*.py).

The training and evaluation prompts are byte-exact copies of what the official scripts produce (they differ
in whitespace), answers are extracted with LLM-Adapters' per-set patterns, and the 120-example validation split
uses ``datasets.train_test_split(seed=42)`` as ``finetune_*.py`` does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lilyexp.errors import ConfigError
from lilyexp.settings import knob
from lilyexp.tasks import TaskSettings

_INDENT = " " * 16
# finetune_*.py generate_prompt (no-input variant): two spaces after the header, a blank line of 16 spaces.
TRAIN_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    f"{_INDENT}\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}{{output}}"
)
# evaluate_*.py generate_prompt: one space after the header, an empty blank line, ends in newline + 16 spaces.
EVAL_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    "\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}"
)
RESPONSE_MARKER = "### Response:"

# The file the official code trained on (LLM-Adapters' ft-training_set), fetched at a pinned commit.
DEFAULT_TRAIN_FILE = "llm-adapters:ft-training_set/commonsense_170k.json"

# Answer formats of the eight test sets, as LLM-Adapters' extract_answer matches them (first match wins).
ANSWER_PATTERNS = {
    "true_false": ["true", "false"],
    "solution": ["solution1", "solution2"],
    "answer": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "ending": ["ending1", "ending2", "ending3", "ending4"],
    "option": ["option1", "option2"],
}


SCORINGS = ("generation", "loglikelihood", "both")
ANSWER_FORMAT_LINE = re.compile(r"Answer format: *([^\n]+?)\s*$")


def answer_options(instruction: str, answer_format: str) -> list[str]:
    """The options a question offers: its "Answer format: a/b/c" line (ARC has 4, SIQA 3), else the format's
    alternatives."""
    found = ANSWER_FORMAT_LINE.search(instruction)
    return found.group(1).split("/") if found else list(ANSWER_PATTERNS[answer_format])


def scoring_choices(example: dict, options: list[str]) -> tuple[str, list[str], int]:
    """(context, continuations, index of the right one) for log-likelihood scoring: the training prompt and the
    response up to the answer (``the correct answer is``), then each option with its leading space — the text
    training taught, so the score reads the answer token where training put it."""
    output, answer = example["output"], example["answer"]
    prefix = output[:-len(answer)] if answer and output.endswith(answer) else "the correct answer is "
    context = train_prompt(example) + prefix.rstrip()
    space = prefix[len(prefix.rstrip()):] or " "
    if answer not in options:
        raise ConfigError(f"answer {answer!r} is none of the question's options {options}.")
    return context, [space + option for option in options], options.index(answer)


@dataclass
class GenerationSettings:
    """How the test questions are answered: the official evaluation is 4-beam search at batch size 1."""

    num_beams: int = 4
    batch_size: int = 1
    max_new_tokens: int = 32


@dataclass
class InstructionSettings(TaskSettings):
    """What an instruction-tuning task with generation-based evaluation lets a user set."""

    subset: Optional[list] = knob(None, help="the test sets to evaluate (None: all of them)")
    val_size: int = knob(120, help="held-out training examples for checkpoint selection (seed 42)")
    cutoff_len: int = knob(256, help="tokens per training example (official: 256)")
    train_on_inputs: bool = knob(True, help="loss on the whole prompt (official) or on the answer only")
    ignore_case: bool = knob(False, help="match answers ignoring case (evaluate_mamba.py) or not (evaluate_llama.py)")
    align_eval_prompt: bool = knob(False, help="drop the eval prompt's last space (see eval_prompt)")
    generation: GenerationSettings = field(default_factory=GenerationSettings, metadata={"kind": "knob"})
    scoring: str = knob("generation", choices=SCORINGS,
                        help="generation: the paper's protocol (generate, extract the answer); loglikelihood: pick "
                             "the option the model finds most likely (lm-evaluation-harness style, not the "
                             "paper's); both: each, side by side")


@dataclass
class CommonsenseSettings(InstructionSettings):
    """task=commonsense: Commonsense170K training and the eight LLM-Adapters test sets."""

    data_dir: Optional[str] = knob(None, help="LLM-Adapters' dataset/ folder; None = download the pinned files")
    train_file: str = knob(DEFAULT_TRAIN_FILE, help="comma-separated: llm-adapters:<path>, hub:<id> or JSON files")


def train_text(example: dict) -> str:
    return TRAIN_TEMPLATE.format(instruction=example["instruction"], output=example["output"])


def train_prompt(example: dict) -> str:
    """The training text without the answer (what ``train_on_inputs=False`` masks)."""
    return TRAIN_TEMPLATE.format(instruction=example["instruction"], output="")


def eval_prompt(example: dict, align_to_training: bool = False) -> str:
    """The official evaluation prompt. It ends in a newline + 16 spaces, which BPE tokenizers (LLaMA-3's,
    SmolLM2's) encode as one token that training never shows before the answer (training sees newline + 15
    spaces, then " the"). ``align_to_training`` drops that last space so generation starts on the training
    token boundary; the official code does not."""
    prompt = EVAL_TEMPLATE.format(instruction=example["instruction"])
    return prompt[:-1] if align_to_training else prompt


def response_of(decoded: str) -> str:
    """The text after the first "### Response:" of a decoded prompt+generation, stripped (official)."""
    parts = decoded.split(RESPONSE_MARKER)
    return parts[1].strip() if len(parts) > 1 else decoded.strip()


def extract_answer(answer_format: str, response: str, ignore_case: bool = False) -> str:
    """First match of the format's alternatives, "" when none (counted wrong). The LLaMA script matches
    case-sensitively; the Falcon-Mamba script ignores case and lower-cases (``ignore_case``)."""
    pattern = "|".join(ANSWER_PATTERNS[answer_format])
    found = re.findall(pattern, response, flags=re.IGNORECASE if ignore_case else 0)
    if not found:
        return ""
    return found[0].lower() if ignore_case else found[0]


def is_correct(prediction: str, answer: str, ignore_case: bool = False) -> bool:
    return prediction == (answer.lower() if ignore_case else answer)


@dataclass
class InstructionData:
    """Training records and named test sets, each a list of LLM-Adapters records
    (``instruction``, ``input``, ``output``, ``answer``)."""

    train: list[dict]
    eval_sets: dict[str, list[dict]]


RECORD_FIELDS = ("instruction", "output", "answer")


def read_examples(path: Path) -> list[dict]:
    """An LLM-Adapters file: a non-empty JSON list of records whose ``instruction``, ``output`` and ``answer``
    are text (``input``, when present, too); every record is checked, naming the file and the record."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}).") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path} is not an LLM-Adapters file (a JSON list of instruction/output/answer records).")
    if not records:
        raise ConfigError(f"{path} holds no records.")
    for number, record in enumerate(records):
        check_record(record, path, number)
    return records


def check_record(record: Any, path: Path, number: int) -> None:
    if not isinstance(record, dict):
        raise ConfigError(f"{path} record {number} is not an object with {', '.join(RECORD_FIELDS)}.")
    for field_name in RECORD_FIELDS + (("input",) if "input" in record else ()):
        if not isinstance(record.get(field_name), str):
            raise ConfigError(f"{path} record {number}: '{field_name}' is {record.get(field_name)!r}, not text.")


HUB_PREFIX, PINNED_PREFIX = "hub:", "llm-adapters:"
LLM_ADAPTERS = "github.com/AGI-Edgerunners/LLM-Adapters (dataset/ and ft-training_set/)"


def hub_records(dataset_id: str, load=None) -> list[dict]:
    """Training records from a hub dataset in LLM-Adapters format (e.g. ``zwhe99/commonsense_170k``)."""
    if load is None:
        from datasets import load_dataset as load
    try:
        rows = load(dataset_id, split="train")
    except (OSError, ConnectionError, ValueError) as exc:
        raise ConfigError(f"could not load '{dataset_id}' from the hub ({type(exc).__name__}); set "
                          f"task.train_file to a local commonsense_170k.json (from {LLM_ADAPTERS}).") from None
    records = [dict(row) for row in rows]
    for number, record in enumerate(records):
        check_record(record, Path(f"hub:{dataset_id}"), number)
    return records


def training_records(root: Path | None, train_file: str | None) -> list[dict]:
    """``train_file``: JSON files joined by commas (mixed in order; relative to ``data_dir`` allowed) or
    ``hub:<dataset id>``."""
    records = []
    for item in (train_file or "").split(","):
        if item.startswith(HUB_PREFIX):
            records.extend(hub_records(item.removeprefix(HUB_PREFIX)))
        elif item.startswith(PINNED_PREFIX):
            hint = "set task.train_file to a local copy (a JSON file of LLM-Adapters records)"
            records.extend(read_examples(pinned_file(item.removeprefix(PINNED_PREFIX), hint)))
        elif item:
            path = Path(item).expanduser()
            path = path if path.is_absolute() or root is None else root / item
            if not path.exists():
                raise ConfigError(f"task.train_file '{path}' does not exist.")
            records.extend(read_examples(path))
    return records


def pinned_file(path: str, hint: str) -> Path:
    """A file of LLM-Adapters at the commit the manifest pins (downloaded once, hash-checked, cached)."""
    from lilyexp.downloads import fetch_file, load_manifest

    return fetch_file(load_manifest("llm_adapters"), path, hint=hint)


LLM_ADAPTERS_SETS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                     "openbookqa")


def llm_adapters_files(data_dir: str | None, train_file: str | None, subset: list[str] | None) -> InstructionData:
    """The test sets (``<data_dir>/<set>/test.json``, LLM-Adapters' dataset/ folder; without ``data_dir`` the
    pinned files, downloaded once) and the training records of ``train_file``."""
    names = list(subset or LLM_ADAPTERS_SETS)
    if data_dir is None:
        hint = "set task.data_dir to LLM-Adapters' dataset/ folder holding <set>/test.json"
        tests = {name: read_examples(pinned_file(f"dataset/{name}/test.json", hint)) for name in names}
        return InstructionData(training_records(None, train_file), tests)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"task.data_dir '{root}' does not exist.")
    tests = {}
    for name in names:
        path = root / name / "test.json"
        if not path.exists():
            raise ConfigError(f"test set '{name}' is missing: expected {path}.")
        tests[name] = read_examples(path)
    return InstructionData(training_records(root, train_file), tests)


class CommonsenseTask:
    """An instruction-tuning task with generation-based multiple-choice evaluation (the causal-LM recipe):
    training texts and prompts, the held-out validation split, the test sets, answer extraction and scoring."""

    scoring_version = 1  # bump when how this task scores changes: older records then count as outdated

    model_kwargs: dict[str, Any] = {}

    def __init__(self, data: InstructionData, *, formats: dict[str, str], subset: list[str] | None = None,
                 val_size: int = 120, split_seed: int = 42, train_limit: int | None = None,
                 eval_limit: int | None = None, cutoff_len: int = 256, token_scale: int = 1,
                 train_on_inputs: bool = True, ignore_case: bool = False, align_eval_prompt: bool = False,
                 generation: dict | None = None, scoring: str = "generation"):
        names = checked_eval_sets(data, formats, subset)
        check_positive(cutoff_len=cutoff_len, train_limit=train_limit, eval_limit=eval_limit)
        if val_size < 0 or val_size >= len(data.train):
            raise ConfigError(f"task.val_size={val_size} must be in [0, {len(data.train)}) (training records).")
        self.train, self.validation = split_validation(data.train, val_size, split_seed)
        self.train = self.train[:train_limit]
        self.eval_sets = {n: data.eval_sets[n][:eval_limit] for n in names}
        self.formats = {n: formats[n] for n in names}
        # the tokenizer's tokens per BPE token (byte-level test tokenizers need ~4x the official 256)
        self.cutoff_len, self.token_scale = cutoff_len * token_scale, token_scale
        self.train_on_inputs, self.ignore_case, self.align_eval_prompt = train_on_inputs, ignore_case, align_eval_prompt
        self.generation = {**vars(GenerationSettings()), **(generation or {})}
        check_positive(**{f"generation.{k}": v for k, v in self.generation.items()})
        for name in names:
            check_answers(name, self.eval_sets[name], formats[name], ignore_case)
        if scoring not in SCORINGS:
            raise ConfigError(f"task.scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}.")
        self.scoring = scoring

    @staticmethod
    def train_text(example: dict) -> str:
        return train_text(example)

    @staticmethod
    def train_prompt(example: dict) -> str:
        return train_prompt(example)

    def prompt(self, example: dict) -> str:
        return eval_prompt(example, self.align_eval_prompt)

    def extract(self, eval_set: str, decoded: str) -> tuple[str, str]:
        """(response, extracted answer) of one decoded prompt + generation."""
        response = response_of(decoded)
        return response, extract_answer(self.formats[eval_set], response, self.ignore_case)

    def is_correct(self, prediction: str, answer: str) -> bool:
        return is_correct(prediction, answer, self.ignore_case)

    def choices(self, eval_set: str, example: dict) -> tuple[str, list[str], int]:
        """Log-likelihood scoring of one question: (context, continuations, index of the right one)."""
        return scoring_choices(example, answer_options(example["instruction"], self.formats[eval_set]))

    def score(self, split: str, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Accuracy of the extracted answers of one test set (``split``) against its answers."""
        correct = sum(self.is_correct(p, r) for p, r in zip(predictions, references))
        return {f"test/accuracy/{split}": correct / max(len(references), 1)}


def checked_eval_sets(data: InstructionData, formats: dict[str, str], subset: list[str] | None) -> list[str]:
    names = list(subset) if subset is not None else list(data.eval_sets)
    unknown = [n for n in names if n not in data.eval_sets or n not in formats]
    if unknown:
        raise ConfigError(f"unknown test set(s) {unknown} in task.subset; available: {sorted(data.eval_sets)}.")
    bad = {n: formats[n] for n in names if formats[n] not in ANSWER_PATTERNS}
    if bad:
        raise ConfigError(f"unknown answer format(s) {bad}; known: {sorted(ANSWER_PATTERNS)}.")
    return names


def check_answers(name: str, records: list[dict], answer_format: str, ignore_case: bool) -> None:
    """Every test answer is one of its question's options: an answer the extraction can never produce (a BoolQ
    file with "yes" for "true") would score 0 without a word."""
    fold = str.lower if ignore_case else (lambda text: text)
    for number, record in enumerate(records):
        options = answer_options(record["instruction"], answer_format)
        if fold(record["answer"]) not in map(fold, options):
            raise ConfigError(f"test set '{name}' record {number}: answer {record['answer']!r} is none of its "
                              f"options {'/'.join(options)} (format '{answer_format}'); such an answer can never "
                              f"be extracted and would score 0.")


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"task.{name} must be positive, got {value}.")


def split_validation(records: list[dict], val_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The official hold-out: ``Dataset.train_test_split(test_size=val_size, shuffle=True, seed=seed)``."""
    if val_size == 0:
        return list(records), []
    from datasets import Dataset

    split = Dataset.from_list([{"index": i} for i in range(len(records))]).train_test_split(
        test_size=val_size, shuffle=True, seed=seed)
    return [records[i] for i in split["train"]["index"]], [records[i] for i in split["test"]["index"]]
