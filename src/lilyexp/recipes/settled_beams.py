"""Beam search that stops computing a prompt once its answer is settled, for batched evaluation.

transformers' beam search (``GenerationMixin._beam_search``) runs every row of the batch until the last prompt's
search ends: a prompt whose finished hypotheses can no longer change (its early-stop heuristic is satisfied) keeps
its ``num_beams`` rows in every later forward call and in the KV cache. A batch of 16 questions of the commonsense
evaluation thereby computed 1.6x the decode rows that answering them one at a time needs (``make bench-eval``
counts them); with this loop it computes exactly batch 1's.

:func:`settled_beam_search` is handed to ``generate(custom_generate=...)``, transformers' hook for a decoding
loop of one's own: ``generate`` prepares the inputs, cache, logits processors and stopping criteria as always,
and every scoring step below is transformers' own helper (top-k continuations, running beams, finished beams,
the early-stop heuristic, output cropping), applied to the whole batch as ``_beam_search`` applies them. What
differs: the forward call, the logits processors and the cache hold only the rows of prompts still searching, and
a settled prompt's rows get placeholder log-probabilities. Its results cannot change: once its heuristic is
satisfied, ``_update_finished_beams`` adds -1e9 to every new candidate of that prompt, below each of its
``num_beams`` finished scores, and the heuristic never becomes unsatisfied again. The answers are therefore
``generate``'s token for token (tests/test_settled_beams.py: in float64 on tiny models, in float32 on SmolLM2 and
in ``make bench-eval``), for any routing that does not couple the rows of a call (Lily's ``eval_pooling: sample``
with beam groups, LoRA, a batch of one prompt). As with any change of batch shape, half precision on a GPU may
still flip a near-tie, which was not measured here.

Only for a dynamic attention cache (transformers' ``DynamicCache`` of ``DynamicLayer`` s, whose rows can be selected);
other caches, sampling and dictionary outputs run ``_beam_search`` unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.utils import GenerationMixin

from lilyexp.methods.routing import current_routing_groups, routing_groups


def selectable(cache) -> bool:
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


# The transformers helpers this loop calls, and the processors it lets score only the live rows: each scores a row
# from that row alone. Any other processor (one reading a row's batch position, such as prefix-constrained
# generation, or holding one entry per row, such as a repetition penalty that skips each row's padding) sends the
# generation to transformers' own loop; a processor of one's own can declare ``row_local = True``.
HELPERS = ("_prefill", "_get_top_k_continuations", "_get_running_beams_for_next_iteration", "_update_finished_beams",
           "_check_early_stop_heuristic", "_beam_search_has_unfinished_sequences",
           "_update_model_kwargs_for_generation")
ROW_LOCAL_PROCESSORS = ("MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "NoRepeatNGramLogitsProcessor",
                        "NoBadWordsLogitsProcessor", "SequenceBiasLogitsProcessor", "SuppressTokensLogitsProcessor",
                        "SuppressTokensAtBeginLogitsProcessor", "ForcedBOSTokenLogitsProcessor",
                        "ForcedEOSTokenLogitsProcessor", "InfNanRemoveLogitsProcessor", "ExponentialDecayLengthPenalty",
                        "LogitNormalization")


def row_local(processor) -> bool:
    return type(processor).__name__ in ROW_LOCAL_PROCESSORS or getattr(processor, "row_local", False) is True


def supported(model, logits_processor, generation_config, model_kwargs: dict) -> bool:
    """Whether this loop reproduces ``_beam_search`` here (else it runs ``_beam_search`` itself)."""
    position_ids = model_kwargs.get("position_ids")
    return (not generation_config.do_sample and not generation_config.return_dict_in_generate
            and generation_config.num_return_sequences == 1 and not generation_config.low_memory
            and not model.config.is_encoder_decoder and not hasattr(model, "_reorder_cache")
            and all(callable(getattr(model, name, None)) for name in HELPERS)
            and (position_ids is None or position_ids.dim() == 2)
            and selectable(model_kwargs.get("cache")) and all(row_local(p) for p in logits_processor))


def rows_of(prompts: torch.Tensor, num_beams: int) -> torch.Tensor:
    """The flat rows of ``prompts`` (each prompt's ``num_beams`` rows are contiguous)."""
    return (prompts[:, None] * num_beams + torch.arange(num_beams, device=prompts.device)).reshape(-1)


def keep_rows(model_kwargs: dict, rows: torch.Tensor, current: int) -> None:
    """Select ``rows`` of the cache (reordering beams too) and of every per-row input (of ``current`` rows; a
    tensor shared by all rows stays), in place."""
    model_kwargs["cache"].reorder_cache(rows)
    for key, value in model_kwargs.items():
        if torch.is_tensor(value) and value.dim() and value.shape[0] == current:
            model_kwargs[key] = value.index_select(0, rows.to(value.device))


def placed(live_values: torch.Tensor, rows: torch.Tensor, total_rows: int) -> torch.Tensor:
    """The live rows' values at their places among all rows; zeros for the settled ones."""
    full = live_values.new_zeros((total_rows, *live_values.shape[1:]))
    full[rows] = live_values
    return full


def settled_beam_search(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                        synced_gpus: bool = False, **model_kwargs) -> torch.LongTensor:
    """``generate``'s beam search, computing only the prompts still searching (see the module docstring)."""
    if synced_gpus or not supported(model, logits_processor, generation_config, model_kwargs):
        return GenerationMixin._beam_search(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                            synced_gpus=synced_gpus, **model_kwargs)
    beams, eos = generation_config.num_beams, generation_config._eos_token_tensor
    total_rows, prompt_len = input_ids.shape
    batch = total_rows // beams
    device = input_ids.device
    keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * beams
    top_mask = torch.cat((torch.ones(beams, dtype=torch.bool), torch.zeros(keep - beams, dtype=torch.bool))).to(device)
    pad = generation_config._pad_token_tensor
    fill = (pad or eos[0]) if eos is not None else -1  # as _beam_search: a pad id of 0 is falsy, so EOS fills
    running = torch.full((batch, beams, generation_config.max_length), fill_value=int(fill), dtype=torch.int64,
                         device=device)
    running[:, :, :prompt_len] = input_ids.view(batch, beams, prompt_len)
    sequences = running.detach().clone()
    running_scores = torch.zeros((batch, beams), dtype=torch.float, device=device)
    running_scores[:, 1:] = -1e9
    scores = torch.full((batch, beams), fill_value=-1e9, dtype=torch.float, device=device)
    finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    searching = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_indices = torch.full((batch, beams, generation_config.max_length - prompt_len), fill_value=-1,
                                 dtype=torch.int32, device=device)
    indices = running_indices.detach().clone()
    groups = current_routing_groups(model)
    live = torch.arange(batch, device=device)  # the prompts whose rows the cache and the per-row inputs hold
    cur_len = prompt_len
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    while True:
        rows = rows_of(live, beams)
        live_sequences = running[live, :, :cur_len].reshape(-1, cur_len)
        if outputs is None:
            inputs = model.prepare_inputs_for_generation(live_sequences, next_sequence_length=1, **model_kwargs)
            with routing_groups(model, groups[rows]) if groups is not None else contextlib.nullcontext():
                outputs = model(**inputs, return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        logits = outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=device)
        outputs = None
        log_probs = logits_processor(live_sequences, torch.nn.functional.log_softmax(logits, dim=-1))
        log_probs = placed(log_probs, rows, total_rows).view(batch, beams, -1) + running_scores[:, :, None]
        top_scores, top_sequences, top_indices = model._get_top_k_continuations(
            accumulated_log_probs=log_probs.reshape(batch, -1), running_sequences=running,
            running_beam_indices=running_indices, cur_len=cur_len, decoder_prompt_len=prompt_len, do_sample=False,
            beams_to_keep=keep, num_beams=beams, batch_size=batch)
        hits = stopping_criteria(top_sequences[:, :, :cur_len + 1].reshape(batch * keep, -1), None)
        hits = hits.view(batch, keep)
        running, running_scores, running_indices = model._get_running_beams_for_next_iteration(
            topk_log_probs=top_scores, topk_running_sequences=top_sequences,
            topk_running_beam_indices=top_indices, next_token_hits_stopping_criteria=hits, num_beams=beams)
        sequences, scores, indices, finished = model._update_finished_beams(
            sequences=sequences, topk_running_sequences=top_sequences, beam_scores=scores,
            topk_log_probs=top_scores, beam_indices=indices, topk_running_beam_indices=top_indices,
            is_early_stop_heuristic_unsatisfied=searching, is_sent_finished=finished,
            next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_mask, num_beams=beams, cur_len=cur_len,
            decoder_prompt_len=prompt_len, length_penalty=generation_config.length_penalty,
            early_stopping=generation_config.early_stopping)
        source = running_indices[..., cur_len - prompt_len].reshape(-1).long()  # row each new beam continues
        cur_len += 1
        searching = model._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=searching, running_beam_scores=running_scores, beam_scores=scores,
            is_sent_finished=finished, cur_len=cur_len, max_length=generation_config.max_length,
            decoder_prompt_len=prompt_len, early_stopping=generation_config.early_stopping,
            length_penalty=generation_config.length_penalty)
        if not model._beam_search_has_unfinished_sequences(searching, finished, hits,
                                                           generation_config.early_stopping):
            break
        still = searching[:, 0].nonzero().reshape(-1)
        position = torch.full((batch,), -1, dtype=torch.long, device=device)
        position[live] = torch.arange(len(live), device=device)
        continued = source[rows_of(still, beams)]  # flat rows b * beams + k of the same prompts
        keep_rows(model_kwargs, position[continued // beams] * beams + continued % beams, len(rows))
        live = still
    length = prompt_len + int(((indices[:, 0] + 1).bool()).sum(dim=-1).max())  # as generate crops the best beams
    return sequences[:, 0, :length]
