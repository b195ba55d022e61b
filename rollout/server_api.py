"""Request bodies of the HTTP server (sglang and OpenAI names) and the OpenAI completion shapes.

Bodies are strict: a field of the wrong JSON type, or a field the server does not know, is a 400
that names it, rather than a value silently coerced or ignored. Sampling params pass through to
the engine, which checks them (and names the bad one) itself.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Json = dict[str, Any]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- sglang-style endpoints ----------------------------------------------------------------
class GenerateRequest(_Body):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: Json | list[Json] | None = None
    return_logprob: bool | list[bool] = False
    top_logprobs_num: int | list[int] | None = None
    return_routed_experts: bool | list[bool] = False
    rid: str | list[str] | None = None
    stream: bool = False
    return_text_in_logprobs: bool = False  # the third element of each logprob tuple: the token's text
    logprob_start_len: int | list[int] | None = None  # >= 0: input_token_logprobs from there; -1: the last token
    # fields sglang clients send at these values (its bench_serving, RL frameworks): the engine refuses others
    # (`intake.check_sglang_fields`)
    lora_path: str | list[str | None] | None = None
    image_data: Any = None
    custom_logit_processor: str | list[str | None] | None = None
    token_ids_logprob: list[int] | list[list[int]] | None = None
    data_parallel_rank: int | None = None
    bootstrap_host: str | list[str | None] | None = None
    bootstrap_port: int | list[int | None] | None = None
    bootstrap_room: int | list[int | None] | None = None
    return_hidden_states: bool = False
    priority: int | list[int | None] | None = None
    routed_dp_rank: int | None = None
    session_params: dict | list[dict | None] | None = None


class InitGroupRequest(_Body):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateDistributedRequest(_Body):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: str | None = None
    load_format: str | None = None
    abort_all_requests: bool = False  # sglang: end every request in flight before updating
    commit: bool = True  # mxroll: false stages the bucket; the next call with true applies all at once
    bucket_sizes: list[int] | None = None  # mxroll: consecutive flattened buckets of these counts, one request


class UpdateDiskRequest(_Body):
    model_path: str
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: str | None = None
    abort_all_requests: bool = False  # sglang: end every request in flight before updating


class UpdateTensorRequest(_Body):
    # base64 from mxroll.sync.receiver.serialize_named_tensors; sglang sends a list, one per TP rank (here one)
    serialized_named_tensors: str | list[str]
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: str | None = None
    abort_all_requests: bool = False  # sglang: end every request in flight before updating


class DestroyGroupRequest(_Body):
    group_name: str = "weight_update_group"


class WeightVersionRequest(_Body):
    new_version: str
    abort_all_requests: bool = True


class TokenizeRequest(_Body):
    prompt: str | list[str]
    add_special_tokens: bool = True  # the BOS the engine puts before a text prompt
    model: str | None = None


class DetokenizeRequest(_Body):
    tokens: list[int]
    model: str | None = None


class ParseFunctionCallRequest(_Body):  # sglang's ParseFunctionCallReq
    text: str
    tool_call_parser: str
    tools: list[dict] = []  # OpenAI tools: a call's tool_index is its function's place here (-1: not listed)


class SeparateReasoningRequest(_Body):  # sglang's SeparateReasoningReqInput
    text: str
    reasoning_parser: str


class GetWeightsRequest(_Body):
    name: str
    truncate_size: int = 100


class PauseRequest(_Body):
    mode: str = "abort"


class AbortRequest(_Body):
    rid: str = ""
    abort_all: bool = False


class MemoryRequest(_Body):
    tags: list[str] | None = None


class ProfileRequest(_Body):  # sglang's ProfileReqInput (the options an engine of one GPU has)
    output_dir: str | None = None
    start_step: int | None = None
    num_steps: int | None = None
    activities: list[str] | None = None
    with_stack: bool | None = None
    record_shapes: bool | None = None
    profile_by_stage: bool = False
    merge_profiles: bool = False
    profile_prefix: str | None = None


# ---- OpenAI /v1/completions ----------------------------------------------------------------
class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None  # stop strings: the text ends before the one matched
    seed: int | None = None
    logprobs: int | None = None  # top logprobs per token (0: only the sampled token's)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False  # the prompt before the completion (text, and logprobs: the first token has none)
    user: str | None = None
    # extensions (sglang/vLLM names)
    top_k: int = -1
    min_p: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    rid: str | None = Field(default=None, description="request id, for /abort_request")

    def engine_args(self) -> Json:
        """Keyword arguments of `Engine.async_generate` (ValueError names an unsupported field)."""
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens}: must be an integer >= 0")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs}: must be an integer >= 0")
        args: Json = {"sampling_params": openai_sampling(self, self.max_tokens),
                      "return_logprob": self.logprobs is not None or self.echo,
                      "top_logprobs_num": self.logprobs or 0}
        if self.echo:  # the prompt's tokens and logprobs come back in input_token_logprobs
            args["logprob_start_len"] = 0
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, str) for x in p)):
            args["prompt"] = p
        elif isinstance(p, list) and p:
            args["input_ids"] = p
        else:
            raise ValueError("prompt: empty; give a string, a list of strings, or token ids")
        if self.rid is not None:
            args["rid"] = self.rid
        return args


def openai_sampling(req, max_new_tokens: int) -> Json:
    """The engine's sampling params from an OpenAI body's fields (completions and chat completions share them)."""
    sampling = {"max_new_tokens": max_new_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "top_k": req.top_k, "min_p": req.min_p, "n": req.n, "ignore_eos": req.ignore_eos, "seed": req.seed}
    if req.stop_token_ids:
        sampling["stop_token_ids"] = req.stop_token_ids
    if req.stop:
        sampling["stop"] = req.stop
    return sampling


def finish_reason(reason: dict | None) -> str | None:
    """sglang's {"type": "length", ...} -> OpenAI's "length" / "stop" ("abort" stays "abort")."""
    return None if reason is None else reason.get("type")


class CompletionFormatter:
    """Engine outputs -> OpenAI `text_completion` objects, whole or as streamed deltas.

    Streams carry cumulative outputs; each chunk holds what is new since the last one of its index.
    Text that ends inside a multi-byte character (decoded as U+FFFD) is held back until it completes.
    """

    def __init__(self, model: str, tokenizer, logprobs: int | None, echo: bool = False):
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model, self.tokenizer, self.logprobs, self.echo = model, tokenizer, logprobs, echo
        self._sent_text: dict[int, str] = {}
        self._sent_tokens: dict[int, int] = {}
        self._echoed: dict[int, int] = {}  # characters of prompt text sent before each choice's completion

    def _envelope(self, choices: list[Json]) -> Json:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def _logprobs(self, out: Json, start: int, text_offset: int, echo: bool = False) -> Json | None:
        if self.logprobs is None:
            return None
        meta = out["meta_info"]
        sampled = meta.get("output_token_logprobs", [])[start:]
        tops = meta.get("output_top_logprobs", [])[start:]
        if echo:  # the prompt's tokens first
            sampled = meta["input_token_logprobs"] + sampled
            tops = (meta.get("input_top_logprobs") or [None] * len(meta["input_token_logprobs"])) + tops
        tokens = [self._token_str(t) for _, t, _ in sampled]
        offsets = []
        for s in tokens:
            offsets.append(text_offset)
            text_offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in sampled],
                "top_logprobs": [None if top is None else {self._token_str(t): lp for lp, t, _ in top}
                                 for top in tops] if self.logprobs else None, "text_offset": offsets}

    @staticmethod
    def _prompt_ids(out: Json) -> list[int]:
        return [t for _, t, _ in out["meta_info"]["input_token_logprobs"]]

    def _choice(self, index: int, out: Json, text: str, start: int, text_offset: int, echo: bool = False) -> Json:
        """echo: this choice's first text, led by the prompt's (and its logprobs by the prompt tokens')."""
        lead = self.tokenizer.decode(self._prompt_ids(out)) if echo and self.tokenizer is not None else ""
        choice = {"index": index, "text": lead + text,
                  "logprobs": self._logprobs(out, start, text_offset, echo),
                  "finish_reason": finish_reason(out["meta_info"]["finish_reason"])}
        if "text" not in out:  # no tokenizer: the ids are the completion
            choice["token_ids"] = (self._prompt_ids(out) if echo else []) + out["output_ids"][start:]
        return choice

    def _text(self, out: Json, index: int) -> str:
        """The text of choice `index`'s output as the reply shows it."""
        return out.get("text", "")

    def response(self, outputs: list[Json]) -> Json:
        choices = [self._choice(i, o, self._text(o, i), 0, 0, self.echo) for i, o in enumerate(outputs)]
        return {**self._envelope(choices), "usage": usage(outputs)}

    def chunk(self, out: Json) -> Json:
        """The delta of one cumulative streamed output (its "index" says which choice)."""
        i = out.get("index", 0)
        final = out["meta_info"]["finish_reason"] is not None
        text = self._text(out, i)
        sent = self._sent_text.get(i, "")
        stable = text if final else text.rstrip("\ufffd")
        delta = stable[len(sent):] if stable.startswith(sent) else stable
        if len(stable) >= len(sent):
            self._sent_text[i] = stable
        echo = self.echo and i not in self._sent_tokens  # the prompt leads the first chunk of each choice
        start = self._sent_tokens.get(i, 0)
        self._sent_tokens[i] = len(out["output_ids"])
        choice = self._choice(i, out, delta, start, 0 if echo else self._echoed.get(i, 0) + len(sent), echo)
        if echo:
            self._echoed[i] = len(choice["text"]) - len(delta)  # the prompt text it led with
        return self._envelope([choice])

    def usage_chunk(self, outputs: list[Json]) -> Json:
        return {**self._envelope([]), "usage": usage(outputs)}


def usage(outputs: list[Json]) -> Json:
    """Prompt tokens count once per prompt (its n samples share it), completion tokens per sample."""
    prompts = {o["meta_info"]["id"]: o["meta_info"]["prompt_tokens"] for o in outputs}
    completion = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion,
            "total_tokens": sum(prompts.values()) + completion}


def jsonable(value: Any) -> Any:
    """Engine outputs -> JSON values: tensors become (nested) lists, tuples lists, and non-finite
    floats null (strict JSON has no inf/NaN)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    return value


ROUTED_EXPERTS_FORMATS = ("list", "base64")


def check_routed_experts_format(fmt: str) -> None:
    if fmt not in ROUTED_EXPERTS_FORMATS:
        raise ValueError(f"routed_experts_format={fmt!r}; supported: {list(ROUTED_EXPERTS_FORMATS)}")


def routes_base64(outputs: Json | list[Json], moe_layers: list[int], num_layers: int) -> Json | list[Json]:
    """sglang's encoding of `return_routed_experts` (`--routed-experts-format base64`), in place: meta_info's
    `routed_experts` [tokens, moe layers, top_k] becomes base64 of a little-endian int32 C-order array [tokens,
    num_layers, top_k] over all the model's layers (dense layers' rows 0, as sglang leaves them), and
    `routed_expert_weights` the same layout in float32 (an mxroll extra; sglang sends ids only)."""
    import base64

    import numpy as np
    import torch

    for out in outputs if isinstance(outputs, list) else [outputs]:
        meta = out.get("meta_info", {})
        for key, dtype in (("routed_experts", "<i4"), ("routed_expert_weights", "<f4")):
            if key not in meta:
                continue
            moe = torch.as_tensor(meta[key]).cpu().numpy()
            if moe.ndim != 3 or moe.shape[1] not in (0, len(moe_layers)):
                raise ValueError(f"{key}: shape {moe.shape} is not [tokens, {len(moe_layers)} moe layers, top_k]")
            full = np.zeros((moe.shape[0], num_layers, moe.shape[2]), dtype=dtype)
            if moe.shape[1]:
                full[:, moe_layers] = moe
            meta[key] = base64.b64encode(full.tobytes()).decode("ascii")
    return outputs
