"""Per-request sampling parameters (sglang names), validated with errors naming the field."""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

# Temperatures below this are treated as greedy (argmax), and their logprobs are reported at
# temperature 1 like greedy ones: dividing logits by ~0 would overflow to inf/NaN.
GREEDY_EPS = 1e-5
SEED_LIMIT = 2**64  # seeds are any integer in [0, 2**64), the range of torch.Generator.manual_seed
# sglang keys RL frameworks send with every request: accepted, and ignored, when they do not change the
# tokens. Text-only formatting keys take any bool; the others only their neutral value.
TEXT_ONLY = ("skip_special_tokens", "spaces_between_special_tokens")
NEUTRAL = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_new_tokens": 0,
           "regex": None, "json_schema": None, "ebnf": None, "structural_tag": None, "logit_bias": None,
           "custom_params": None, "stop_regex": None}
# sglang reads null as "the default" for these keys (its SamplingParams.__post_init__); so does this
NULL_IS_DEFAULT = ("temperature", "top_p", "top_k", "min_p", "n", "ignore_eos", "no_stop_trim", "raw_logprob",
                   "skip_special_tokens", "spaces_between_special_tokens", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "min_new_tokens")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = 128  # None (sglang's null): up to the context length (`with_prompt`)
    temperature: float = 1.0  # 0 (anything below GREEDY_EPS) = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    min_p: float = 0.0
    n: int = 1
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # stop strings: a sample ends once its decoded output contains one (finish_reason {"type": "stop", "matched":
    # the string}); its output_ids keep every sampled token, its text ends before the string unless no_stop_trim
    stop: tuple[str, ...] = field(default_factory=tuple)
    no_stop_trim: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    # Logprobs are of the sampling distribution (logits / temperature); True reports raw (temperature 1).
    raw_logprob: bool = False
    stream_interval: int | None = None  # a streamed request's partial output every this many tokens (None: the engine's)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "SamplingParams":
        if d is not None and not isinstance(d, Mapping):
            raise ValueError(f"sampling_params must be a dict (or a list of dicts, one per prompt), got "
                             f"{type(d).__name__} {d!r:.80}")
        d = {k: v for k, v in (d or {}).items() if not (v is None and k in NULL_IS_DEFAULT)}
        if "sampling_seed" in d:  # sglang's name of the per-request seed
            seed = d.pop("sampling_seed")
            if d.get("seed") is not None and seed is not None and d["seed"] != seed:
                raise ValueError(f"sampling_params: seed={d['seed']!r} and sampling_seed={seed!r} disagree (sglang's "
                                 "name for the same seed: pass one)")
            d["seed"] = seed if seed is not None else d.get("seed")
        for key in TEXT_ONLY:
            if key in d and not isinstance(d.pop(key), bool):
                raise ValueError(f"sampling_params.{key} must be true or false")
        for key, neutral in NEUTRAL.items():
            if key in d:
                value = d.pop(key)
                if value != neutral and not (neutral is None and value in ([], "", (), {})):
                    raise ValueError(f"sampling_params.{key}={value!r} is not supported (only {neutral!r}); "
                                     "mxroll samples from the model's own distribution, which the trainer recomputes")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ValueError(f"sampling_params: unknown field(s) {unknown}; known: {sorted(known)}")
        stop = d.pop("stop_token_ids", None)
        if stop is not None:
            if not isinstance(stop, (list, tuple)):
                raise ValueError(f"sampling_params.stop_token_ids={stop!r}: must be a list of non-negative integers")
            d["stop_token_ids"] = tuple(stop)
        stop = d.pop("stop", None)
        if isinstance(stop, str):
            stop = [stop] if stop else []
        if stop is not None:
            if not isinstance(stop, (list, tuple)):
                raise ValueError(f"sampling_params.stop={stop!r}: must be a string or a list of strings")
            d["stop"] = tuple(stop)
        params = cls(**d)
        params.validate()
        return params

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"sampling_params.{name}={getattr(self, name)!r}: {why}")

        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 0):
            bad("max_new_tokens", "must be an integer >= 0, or null (up to the context length)")
        if not _is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            bad("top_k", "must be -1 (off) or an integer >= 1")
        if not _is_num(self.min_p) or not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of non-negative integers")
        if not all(isinstance(t, str) and t for t in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        for name in ("ignore_eos", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT):
            bad("seed", "must be null or an integer in [0, 2**64)")
        if not isinstance(self.raw_logprob, bool):
            bad("raw_logprob", "must be true or false")
        if self.stream_interval is not None and not (_is_int(self.stream_interval) and self.stream_interval >= 1):
            bad("stream_interval", "must be null (the engine's) or an integer >= 1")

    def with_prompt(self, prompt_len: int, context_length: int) -> "SamplingParams":
        """These params for a prompt of `prompt_len` tokens: max_new_tokens None becomes what the context leaves."""
        if self.max_new_tokens is not None:
            return self
        return replace(self, max_new_tokens=max(0, context_length - prompt_len))

    @functools.cached_property
    def stop_ends(self) -> frozenset[str] | None:
        """The last characters of the stop strings (None when one is whitespace: check every token)."""
        ends = frozenset(s[-1] for s in self.stop)
        return None if any(c.isspace() for c in ends) else ends

    @property
    def stop_tail(self) -> int:
        """Output tokens decoded to look for a stop string: enough for the longest one at one byte a token."""
        return max((len(t.encode("utf-8")) for t in self.stop), default=0) + 1

    @property
    def logprob_temperature(self) -> float:
        """The temperature logprobs are reported at (DESIGN.md): 1 for greedy and raw_logprob requests."""
        return 1.0 if self.greedy or self.raw_logprob else float(self.temperature)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def per_prompt(sampling_params: Mapping | list | None, n_prompts: int) -> list[SamplingParams]:
    """One SamplingParams per prompt from None, a dict shared by all, or a list of dicts (one each)."""
    if not isinstance(sampling_params, list):
        return [SamplingParams.from_dict(sampling_params)] * n_prompts
    odd = next((p for p in sampling_params if not isinstance(p, Mapping)), None)
    if odd is not None:
        raise ValueError(f"sampling_params must be a dict or a list of dicts (one per prompt); the list holds "
                         f"{type(odd).__name__} {odd!r:.80}")
    if len(sampling_params) != n_prompts:
        raise ValueError(f"got {len(sampling_params)} sampling_params for {n_prompts} prompts")
    return [SamplingParams.from_dict(p) for p in sampling_params]


def positional_order(input_ids, sampling_params) -> tuple:
    """(input_ids, sampling_params) of a generate call given positionally in either order: this API's (prompt,
    input_ids, sampling_params) or sglang's `Engine.generate(prompt, sampling_params, input_ids)`. Sampling
    parameters (a dict or a list of dicts) in input_ids' place, with no sampling parameters in the other, are
    swapped back; token ids are never dicts, so no call means two things."""
    def params(v) -> bool:
        return isinstance(v, Mapping) or (isinstance(v, list) and bool(v) and all(isinstance(p, Mapping) for p in v))
    if params(input_ids) and not params(sampling_params):
        return sampling_params, input_ids
    return input_ids, sampling_params


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
