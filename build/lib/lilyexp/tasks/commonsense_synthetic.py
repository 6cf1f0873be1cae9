"""`commonsense_synthetic`: questions generated from a seed in the eight answer formats of the Commonsense170K
test sets (true/false, solution1/2, answer1-3, ending1-4, option1/2, answer1-4 ×3), each with a simple rule a
small model can learn (five ask which option matches a given number, three need arithmetic: the successor, the
largest), so fine-tuned accuracy clearly beats the untuned model's. No copied text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from lilyexp.settings import knob
from lilyexp.tasks.commonsense import GenerationSettings, InstructionData, InstructionSettings


@dataclass
class SyntheticSettings(InstructionSettings):
    """task=commonsense_synthetic: the generated questions; the loss is on the answer and the eval prompt is
    aligned to the training token boundary by default, so a few demo steps go to the rule."""

    data_seed: int = knob(0)
    n_train: int = knob(800)
    n_eval: int = knob(50, help="questions per test set")
    val_size: int = knob(80)
    train_on_inputs: bool = knob(False)
    align_eval_prompt: bool = knob(True)
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(1, 16, 16),
                                           metadata={"kind": "knob"})


CHOOSE = "Please choose the correct answer to the question: "


def _distinct(rng: random.Random, k: int, low: int = 10, high: int = 99) -> list[int]:
    return rng.sample(range(low, high + 1), k)


def _listing(label: str, options: list, sep: str = " ") -> str:
    return sep.join(f"{label}{i + 1}: {option}" for i, option in enumerate(options))


def _pick(rng: random.Random, options: list[int], correct: int) -> tuple[list[int], int]:
    rng.shuffle(options)
    return options, options.index(correct) + 1


def boolq(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(10, 99)
    b = a if rng.random() < 0.5 else rng.choice([v for v in range(10, 100) if v != a])
    question = f"Please answer the following question with true or false, question: is {a} the same number as {b}?"
    return f"{question}\n\nAnswer format: true/false", "true" if a == b else "false"


def piqa(rng: random.Random) -> tuple[str, str]:
    target, other = _distinct(rng, 2)
    options, index = _pick(rng, [target, other], target)
    text = (f"Please choose the correct solution to the question: How do I write the number {target}?\n\n"
            f"Solution1: write {options[0]}\n\nSolution2: write {options[1]}\n\nAnswer format: solution1/solution2")
    return text, f"solution{index}"


def _multiple_choice(question: str, options: list[int], index: int, label: str = "Answer") -> tuple[str, str]:
    formats = "/".join(f"{label.lower()}{i + 1}" for i in range(len(options)))
    return f"{question}\n\n{_listing(label, options)}\n\nAnswer format: {formats}", f"{label.lower()}{index}"


def social_i_qa(rng: random.Random) -> tuple[str, str]:
    values = _distinct(rng, 3)
    return _multiple_choice(CHOOSE + f"Which answer is the number {values[0]}?", *_pick(rng, values, values[0]))


def hellaswag(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 90)
    distractors = rng.sample([v for v in range(10, 99) if v != n + 3], 3)
    options, index = _pick(rng, [n + 3, *distractors], n + 3)
    question = f"Please choose the correct ending to complete the given sentence: Counting up: {n}, {n + 1}, {n + 2},"
    return _multiple_choice(question, options, index, label="Ending")


def winogrande(rng: random.Random) -> tuple[str, str]:
    target, other = _distinct(rng, 2)
    options, index = _pick(rng, [target, other], target)
    text = (f"Please choose the correct answer to fill in the blank to complete the given sentence: "
            f"The number _ is the same as {target}.\n\n{_listing('Option', options)} Answer format: option1/option2")
    return text, f"option{index}"


def arc_easy(rng: random.Random) -> tuple[str, str]:
    values = _distinct(rng, 4)
    return _multiple_choice(CHOOSE + f"Which number is {values[0]}?", *_pick(rng, values, values[0]))


def arc_challenge(rng: random.Random) -> tuple[str, str]:
    values = _distinct(rng, 4)
    return _multiple_choice(CHOOSE + "Which number is the largest?", *_pick(rng, values, max(values)))


def openbookqa(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 97)
    distractors = rng.sample([v for v in range(10, 99) if v != n + 1], 3)
    return _multiple_choice(CHOOSE + f"Which number comes right after {n}?", *_pick(rng, [n + 1, *distractors], n + 1))


# eval-set name -> (generator, answer format of the real test set it imitates)
GENERATORS: dict[str, tuple[Callable[[random.Random], tuple[str, str]], str]] = {
    "syn_boolq": (boolq, "true_false"),
    "syn_piqa": (piqa, "solution"),
    "syn_social_i_qa": (social_i_qa, "answer"),
    "syn_hellaswag": (hellaswag, "ending"),
    "syn_winogrande": (winogrande, "option"),
    "syn_arc_easy": (arc_easy, "answer"),
    "syn_arc_challenge": (arc_challenge, "answer"),
    "syn_openbookqa": (openbookqa, "answer"),
}
FORMATS = {name: answer_format for name, (_, answer_format) in GENERATORS.items()}


def record(generator: Callable[[random.Random], tuple[str, str]], rng: random.Random) -> dict:
    instruction, answer = generator(rng)
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def generate(seed: int = 0, n_train: int = 800, n_eval: int = 50) -> InstructionData:
    """``n_train`` training records (formats in turn) and ``n_eval`` test records per format, from ``seed``."""
    rng = random.Random(f"train-{seed}")
    names = list(GENERATORS)
    train = [record(GENERATORS[names[i % len(names)]][0], rng) for i in range(n_train)]
    tests = {}
    for name, (generator, _) in GENERATORS.items():
        test_rng = random.Random(f"test-{seed}-{name}")
        tests[name] = [record(generator, test_rng) for _ in range(n_eval)]
    return InstructionData(train, tests)
