"""The Lily-within-a-LoRA-budget helper: its closed-form counts equal the counts of the models it describes."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, LlamaConfig

from lilyexp.budget import lily_count, lora_count, main, target_shapes, within_budget
from lilyexp.methods.lily import LilyVariantConfig, LilyVariantModel
from lilyexp.methods.peft_method import PeftMethod
from lilyexp.params import count_parameters

QKV = ["q_proj", "k_proj", "v_proj"]


def tiny(layers: int = 6) -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                                        num_hidden_layers=layers, num_attention_heads=4,
                                                        num_key_value_heads=2))


@pytest.mark.parametrize("r,ne_1,ne_2", [(4, 1, 2), (8, 3, 3), (4, 4, 2), (2, 6, 5)])
def test_closed_form_matches_the_built_model(r, ne_1, ne_2):
    shapes = target_shapes(tiny(), QKV)
    model = LilyVariantModel(tiny(), LilyVariantConfig(r=r, ne_1=ne_1, num_B=ne_2, target_modules=QKV))
    assert count_parameters(model, [])["trainable"] == lily_count(shapes, r, ne_1, ne_2)
    lora = PeftMethod(LoraConfig(r=r, target_modules=QKV)).apply(tiny())
    assert count_parameters(lora, [])["trainable"] == lora_count(shapes, r)


def test_every_suggestion_is_within_budget_and_distinct():
    shapes = target_shapes(tiny(), QKV)
    rows = within_budget(shapes, shapes, lora_r=8, top=50)
    assert rows and all(row["params"] <= lora_count(shapes, 8) for row in rows)
    assert len({(row["r"], row["num_A"], row["ne_2"]) for row in rows}) == len(rows)
    assert rows == sorted(rows, key=lambda row: -row["params"])


def test_cli_on_the_paper_backbone_shapes(capsys):
    main(["backbone=llama3", "lora_r=32", "top=3"])
    out = capsys.readouterr().out
    assert "56,623,104" in out and out.count("\n| ") == 4


def test_cli_arguments_are_checked_without_a_traceback(capsys):
    from lilyexp.budget import main
    for argv, message in ((["lora=3"], "unknown argument"), (["lora_r=x"], "positive integer")):
        with pytest.raises(SystemExit, match=message):
            main(argv)
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out
