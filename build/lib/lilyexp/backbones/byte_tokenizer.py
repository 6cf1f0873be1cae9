"""A byte-level tokenizer built in code, for the random-init `tiny_*` text backbones (no download).

Ids 0-4 are the special tokens, then one id per byte, so any text round-trips exactly.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")


def build(style: str = "causal", model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """``style='causal'`` prepends <s> (LLaMA-like); ``style='encoder'`` wraps as <s> A </s></s> B </s> (RoBERTa)."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    bos, eos = ("<s>", 1), ("</s>", 2)
    if style == "encoder":
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[bos, eos])
    else:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[bos])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", model_max_length=model_max_length)
