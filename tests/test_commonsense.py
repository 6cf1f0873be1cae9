"""Prompt templates (byte-exact to the official scripts), answer extraction for all eight formats, the label
masking switch, the validation split, and the synthetic demo task's generator."""

from __future__ import annotations

from collections import Counter

import pytest

from lilyexp.backbones.byte_tokenizer import build as byte_tokenizer
from lilyexp.errors import ConfigError
from lilyexp.recipes.causal_lm import IGNORE_INDEX, left_pad, tokenize_for_training
from lilyexp.tasks import commonsense as cs
from lilyexp.tasks.commonsense_synthetic import FORMATS, GENERATORS, generate

EXAMPLE = {"instruction": "Q?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true",
           "answer": "true"}
S16 = " " * 16


def test_training_prompt_is_byte_exact():
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.  \n\n" + S16 + "### Instruction:\n" + S16 + "Q?\n\nAnswer format: true/false\n" + S16
                + "\n" + S16 + "### Response:\n" + S16 + "the correct answer is true")
    assert cs.train_text(EXAMPLE) == expected
    assert cs.train_prompt(EXAMPLE) == expected.removesuffix("the correct answer is true")


def test_evaluation_prompt_is_byte_exact_and_differs_from_training():
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request. \n\n" + S16 + "### Instruction:\n" + S16 + "Q?\n\nAnswer format: true/false\n\n" + S16
                + "### Response:\n" + S16)
    assert cs.eval_prompt(EXAMPLE) == expected
    assert cs.eval_prompt(EXAMPLE) != cs.train_prompt(EXAMPLE)


@pytest.mark.parametrize("answer_format,response,expected", [
    ("true_false", "the correct answer is false", "false"),
    ("true_false", "true or false? the correct answer is false", "true"),  # first match wins (official)
    ("true_false", "The correct answer is True", ""),  # case-sensitive like evaluate_llama.py
    ("solution", "the correct answer is solution2", "solution2"),
    ("answer", "the correct answer is answer3", "answer3"),
    ("answer", "the correct answer is answer5", "answer5"),
    ("ending", "the correct answer is ending4", "ending4"),
    ("option", "the correct answer is option1", "option1"),
    ("option", "", ""),
    ("ending", "ending", ""),
    ("answer", "the correct answer is answer", ""),
])
def test_answer_extraction(answer_format, response, expected):
    assert cs.extract_answer(answer_format, response) == expected


def test_ignore_case_mode_lowercases_like_the_mamba_script():
    assert cs.extract_answer("solution", "The Correct Answer Is Solution1", ignore_case=True) == "solution1"
    assert cs.is_correct("solution1", "Solution1", ignore_case=True)


def test_response_is_the_text_after_the_first_marker():
    decoded = cs.eval_prompt(EXAMPLE) + "the correct answer is true ### Response: false"
    assert cs.response_of(decoded) == "the correct answer is true"


def official_texts(cutoff_len: int):
    """A stand-in task with the official training texts (what the recipe asks of an instruction task)."""
    return type("T", (), {"cutoff_len": cutoff_len, "train_on_inputs": True, "train_text": staticmethod(cs.train_text),
                          "train_prompt": staticmethod(cs.train_prompt)})()


def test_label_masking_switch():
    tokenizer = byte_tokenizer()
    task = official_texts(cutoff_len=512)
    whole = tokenize_for_training(tokenizer, task, EXAMPLE)
    assert whole["labels"] == whole["input_ids"] and whole["input_ids"][-1] == tokenizer.eos_token_id
    task.train_on_inputs = False
    masked = tokenize_for_training(tokenizer, task, EXAMPLE)
    prompt_len = len(tokenizer(cs.train_prompt(EXAMPLE))["input_ids"])
    assert masked["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert masked["labels"][prompt_len:] == masked["input_ids"][prompt_len:]
    decoded = tokenizer.decode(masked["input_ids"][prompt_len:], skip_special_tokens=True)
    assert decoded == "the correct answer is true"


def test_cutoff_truncates_without_eos():
    tokenizer = byte_tokenizer()
    task = official_texts(cutoff_len=20)
    feature = tokenize_for_training(tokenizer, task, EXAMPLE)
    assert len(feature["input_ids"]) == 20 and feature["input_ids"][-1] != tokenizer.eos_token_id


def test_left_padding_to_a_multiple_of_8():
    batch = left_pad([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [9], "labels": [9]}], pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [0] * 7 + [9]
    assert batch["attention_mask"][1].tolist() == [0] * 7 + [1]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 7 + [9]


def test_synthetic_generator_is_deterministic_and_covers_the_eight_formats():
    first, second = generate(seed=3, n_train=64, n_eval=5), generate(seed=3, n_train=64, n_eval=5)
    assert first == second
    assert generate(seed=4, n_train=64, n_eval=5).train != first.train
    assert set(first.eval_sets) == set(GENERATORS) and len(GENERATORS) == 8
    assert set(FORMATS.values()) == set(cs.ANSWER_PATTERNS)
    for name, records in first.eval_sets.items():
        for record in records:
            assert cs.extract_answer(FORMATS[name], record["output"]) == record["answer"]
            assert record["output"] == f"the correct answer is {record['answer']}"


def test_synthetic_answers_follow_the_rule_and_are_balanced():
    data = generate(seed=0, n_train=8, n_eval=400)
    for name, records in data.eval_sets.items():
        counts = Counter(r["answer"] for r in records)
        assert len(counts) >= 2 and max(counts.values()) < 0.75 * len(records), (name, counts)
    for boolq in data.eval_sets["syn_boolq"]:
        a, b = [int(w) for w in boolq["instruction"].split("is ", 1)[1].split("?")[0].split(" the same number as ")]
        assert boolq["answer"] == ("true" if a == b else "false")


def test_official_validation_split_is_seeded_and_disjoint():
    records = [{"instruction": str(i), "answer": "true"} for i in range(300)]
    train, val = cs.split_validation(records, 120, 42)
    again, _ = cs.split_validation(records, 120, 42)
    assert len(val) == 120 and len(train) == 180 and train == again
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in val}


def test_task_rejects_bad_settings():
    data = generate(seed=0, n_train=50, n_eval=2)
    with pytest.raises(ConfigError, match="unknown test set.*task.subset"):
        cs.CommonsenseTask(data, formats=FORMATS, subset=["nope"], val_size=10)
    with pytest.raises(ConfigError, match="val_size"):
        cs.CommonsenseTask(data, formats=FORMATS, val_size=50)
    with pytest.raises(ConfigError, match="train_limit"):
        cs.CommonsenseTask(data, formats=FORMATS, val_size=10, train_limit=0)


def test_llm_adapters_files_read_the_shared_layout(tmp_path):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text(
        '[{"instruction": "q", "input": "", "output": "o", "answer": "true"}]')
    (tmp_path / "train.json").write_text('[{"instruction": "t", "input": "", "output": "o", "answer": "false"}]')
    data = cs.llm_adapters_files(str(tmp_path), "train.json", ["boolq"])
    assert data.train[0]["instruction"] == "t" and data.eval_sets["boolq"][0]["answer"] == "true"
    with pytest.raises(ConfigError, match="does not exist"):
        cs.llm_adapters_files(str(tmp_path / "missing"), None, ["boolq"])
    with pytest.raises(ConfigError, match="piqa"):
        cs.llm_adapters_files(str(tmp_path), None, ["piqa"])
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        cs.llm_adapters_files(str(tmp_path), "bad.json", ["boolq"])


def test_training_records_come_from_the_hub_or_mixed_local_files(tmp_path, monkeypatch):
    rows = [{"instruction": "h", "input": "", "output": "the correct answer is true", "answer": "true"}]
    seen = []
    monkeypatch.setattr(cs, "hub_records", lambda dataset_id: seen.append(dataset_id) or rows)
    (tmp_path / "a.json").write_text('[{"instruction": "a", "input": "", "output": "o", "answer": "x"}]')
    mixed = cs.training_records(tmp_path, "a.json,hub:zwhe99/commonsense_170k")
    assert [r["instruction"] for r in mixed] == ["a", "h"] and seen == ["zwhe99/commonsense_170k"]


def test_unreachable_hub_training_set_is_one_sentence_naming_the_id_and_the_local_switch():
    def offline(dataset_id, split):
        raise ConnectionError("Couldn't reach the hub\nTraceback ...")
    with pytest.raises(ConfigError) as info:
        cs.hub_records("zwhe99/commonsense_170k", load=offline)
    message = str(info.value)
    assert "zwhe99/commonsense_170k" in message and "task.train_file" in message and "\n" not in message


def test_paper_cells_train_on_the_pinned_170k_file_and_say_how_to_point_at_local_copies(tmp_path, monkeypatch):
    """Offline with an empty cache: one sentence naming the pinned file and the local-copy switch."""
    from conftest import compose_run
    monkeypatch.setenv("LILYEXP_CACHE", str(tmp_path / "cache"))
    cfg = compose_run(["experiment=table2/lily"], tmp_path)
    assert cfg.task.train_file == "llm-adapters:ft-training_set/commonsense_170k.json" and cfg.group == "table2"
    with pytest.raises(ConfigError) as info:
        cs.llm_adapters_files(None, cfg.task.train_file, cfg.task.subset)
    message = str(info.value)
    assert "AGI-Edgerunners/LLM-Adapters@" in message and "task.data_dir" in message and "\n" not in message
    with pytest.raises(ConfigError, match="commonsense_170k.json.*task.train_file"):
        cs.training_records(None, cfg.task.train_file)
