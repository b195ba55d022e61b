"""Turning a generate() call into validated per-prompt requests (before anything is queued), so a
bad request is that request's error and the engine serves the next one normally."""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass

from .sampling_params import SamplingParams, per_prompt  # noqa: F401 - SamplingParams in annotations


@dataclass
class PromptRequest:
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool
    top_logprobs_num: int
    return_routed_experts: bool
    rid: str | None
    input_start: int = 0  # sglang's logprob_start_len resolved: input_token_logprobs cover prompt[input_start:]


def _token_list(ids, where: str) -> list[int]:
    if hasattr(ids, "tolist") and not isinstance(ids, list):  # numpy arrays, torch tensors
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"{where}: token ids must be a sequence of integers, got {type(ids).__name__}")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"{where}: token ids must be integers, got {t!r} ({type(t).__name__})")
        out.append(int(t))
    return out


def prompt_ids(prompt, input_ids, tokenizer, no_tokenizer: str) -> tuple[list[list[int]], bool]:
    """(one token list per prompt, batched?). no_tokenizer: why there is no tokenizer, for the error."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt= or input_ids=")
    if prompt is not None:
        if tokenizer is None:
            raise ValueError(f"prompt: {no_tokenizer}; pass input_ids instead")
        batched = isinstance(prompt, (list, tuple))
        texts = list(prompt) if batched else [prompt]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("prompt must be a string or a list of strings")
        return [tokenizer.encode(t) for t in texts], batched
    if hasattr(input_ids, "tolist") and not isinstance(input_ids, list):
        input_ids = input_ids.tolist()
    if isinstance(input_ids, (str, bytes)) or not hasattr(input_ids, "__iter__"):
        raise ValueError(f"input_ids must be a list of token ids or a list of such lists, got {type(input_ids).__name__}")
    input_ids = list(input_ids)
    batched = bool(input_ids) and not isinstance(input_ids[0], numbers.Integral) and hasattr(input_ids[0], "__iter__")
    lists = input_ids if batched else [input_ids]
    return [_token_list(ids, f"input_ids[{i}]" if batched else "input_ids") for i, ids in enumerate(lists)], batched


def _each(value, n: int, name: str, default):
    """A scalar applies to every prompt; a list gives one value per prompt."""
    if value is None:
        return [default] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {len(value)} {name} for {n} prompts")
        return list(value)
    return [value] * n


def check_vocab(ids: list[int], vocab_size: int, where: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")


def build_requests(prompts: list[list[int]], sampling_params, return_logprob, top_logprobs_num,
                   return_routed_experts, rid, vocab_size: int, context_length: int,
                   logprob_start_len=None) -> list[PromptRequest]:
    n = len(prompts)
    if n == 0:
        raise ValueError("empty batch: no prompts given")
    params = per_prompt(list(sampling_params) if isinstance(sampling_params, tuple) else sampling_params, n)
    logprob = _each(return_logprob, n, "return_logprob values", False)
    tops = _each(top_logprobs_num, n, "top_logprobs_num values", 0)
    routed = _each(return_routed_experts, n, "return_routed_experts values", False)
    rids = _each(rid, n, "rids", None)
    starts = _each(logprob_start_len, n, "logprob_start_len values", None)
    requests = []
    for i, (ids, p) in enumerate(zip(prompts, params)):
        where = f"prompt {i}" if n > 1 else "prompt"
        if not ids:
            raise ValueError(f"{where}: needs at least one token")
        check_vocab(ids, vocab_size, where)
        p = p.with_prompt(len(ids), context_length)
        check_vocab(p.stop_token_ids, vocab_size, f"{where}'s sampling_params.stop_token_ids")  # could never match
        if len(ids) + p.max_new_tokens > context_length:
            raise ValueError(f"{where}: {len(ids)} tokens + max_new_tokens={p.max_new_tokens} exceeds the "
                             f"context length {context_length}")
        for name, v in (("return_logprob", logprob[i]), ("return_routed_experts", routed[i])):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")
        top = tops[i]
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"top_logprobs_num must be an integer >= 0, got {top!r}")
        if top > vocab_size:
            raise ValueError(f"top_logprobs_num={top} exceeds the vocabulary ({vocab_size})")
        if rids[i] is not None and not isinstance(rids[i], str):
            raise ValueError(f"rid must be a string, got {rids[i]!r}")
        start = starts[i]
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < -1):
            raise ValueError(f"logprob_start_len={start!r}: must be -1 (output tokens only) or a prompt index >= 0")
        if start is not None and start >= len(ids):
            raise ValueError(f"logprob_start_len={start} is not inside the {where}'s {len(ids)} tokens")
        start = len(ids) - 1 if start is None or start == -1 else start
        requests.append(PromptRequest(ids, p, logprob[i] or top > 0, top, routed[i], rids[i], start))
    return requests


def check_sglang_fields(tokenizer, return_text_in_logprobs=False, logprob_start_len=None, lora_path=None,
                        image_data=None, custom_logit_processor=None, token_ids_logprob=None,
                        return_hidden_states=False, data_parallel_rank=None, bootstrap_host=None,
                        bootstrap_port=None, bootstrap_room=None, priority=None, routed_dp_rank=None,
                        session_params=None) -> None:
    """generate()'s sglang arguments that sglang clients pass at their defaults (verl passes image_data=None,
    lora_path=None): those values are accepted, anything else is an error naming the argument (this engine does not
    do it), never silently ignored. logprob_start_len is taken (build_requests checks it per prompt)."""
    if not isinstance(return_text_in_logprobs, bool):
        raise ValueError(f"return_text_in_logprobs={return_text_in_logprobs!r}: must be true or false")
    if return_text_in_logprobs and tokenizer is None:
        raise ValueError("return_text_in_logprobs: this model has no tokenizer")
    for name, value, why in (("lora_path", lora_path, "LoRA adapters are not supported"),
                             ("image_data", image_data, "this engine serves text-only models"),
                             ("custom_logit_processor", custom_logit_processor,
                              "custom logit processors are not supported"),
                             ("token_ids_logprob", token_ids_logprob,
                              "logprobs of chosen token ids are not supported; use top_logprobs_num"),
                             ("bootstrap_host", bootstrap_host, "prefill / decode disaggregation is not supported"),
                             ("bootstrap_port", bootstrap_port, "prefill / decode disaggregation is not supported"),
                             ("bootstrap_room", bootstrap_room, "prefill / decode disaggregation is not supported"),
                             ("priority", priority, "priority scheduling is not supported: requests are served first "
                              "come, first served"),
                             ("session_params", session_params, "sessions are not supported")):
        if value is not None and not (isinstance(value, list) and all(v is None for v in value)):
            raise ValueError(f"{name}: {why}")
    for name, rank in (("data_parallel_rank", data_parallel_rank), ("routed_dp_rank", routed_dp_rank)):
        if rank not in (None, 0) or isinstance(rank, bool):
            raise ValueError(f"{name}={rank!r}: one engine is one data-parallel rank (0)")
    if return_hidden_states is not False:
        raise ValueError(f"return_hidden_states={return_hidden_states!r}: hidden states are not returned")


SGLANG_FIELDS = frozenset(inspect.signature(check_sglang_fields).parameters) - {"tokenizer"}  # generate()'s names
