"""Rollout-job rewards: `fn(prompt_record, output, **reward_args) -> float`, named in the job config as
`reward: "module.path:function"` (or `"path/to/file.py:function"`).

`prompt_record` is the prompt's record (its "prompt" text if any, "input_ids", and any other field of
its jsonl line, e.g. "answer"); `output` is the engine's output dict for one sample (`output_ids`,
`text` when the model has a tokenizer, `meta_info`).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
from pathlib import Path
from typing import Callable

RewardFn = Callable[..., float]


def load_reward(spec: str, reward_args: dict | None = None) -> RewardFn:
    """The function `spec` names, checked to accept (prompt_record, output, **reward_args)."""
    module_name, sep, attr = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError(f"reward={spec!r}: expected 'module.path:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        module = _load_file(Path(module_name), spec)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward={spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward={spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward={spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none; the call will tell
        return fn
    try:
        signature.bind({}, {}, **(reward_args or {}))
    except TypeError as e:
        raise ValueError(f"reward={spec!r} with reward_args={reward_args!r}: cannot be called as "
                         f"fn(prompt_record, output, **reward_args) ({e})") from None
    return fn


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise ValueError(f"reward={spec!r}: no such file {str(path)!r}")
    module_spec = importlib.util.spec_from_file_location(f"mxroll_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def score(fn: RewardFn, reward_args: dict, record: dict, output: dict, where: str) -> float:
    """One sample's reward as a finite float; anything else is an error naming the sample."""
    value = fn(record, output, **reward_args)
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {value!r} for {where}; "
                         "expected a finite number")
    return float(value)


# ---- built-in rewards ------------------------------------------------------------------------
def contains_answer(prompt_record: dict, output: dict, field: str = "answer") -> float:
    """1.0 when the record's answer appears in the output text as a whole word (not inside a longer
    number or word), else 0.0. Pairs with `prompts_preset: arithmetic`."""
    if field not in prompt_record:
        raise ValueError(f"contains_answer: the prompt record has no {field!r} field (keys: {sorted(prompt_record)})")
    text = output.get("text")
    if text is None:
        raise ValueError("contains_answer: the output has no text (the model has no tokenizer)")
    answer = re.escape(str(prompt_record[field]).strip())
    return 1.0 if re.search(rf"(?<!\w){answer}(?!\w)", text) else 0.0


def length_penalty(prompt_record: dict, output: dict, target: int = 16, scale: float = 1.0) -> float:
    """-scale * |completion tokens - target| / target: 0 at the target length, negative elsewhere."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"length_penalty: target={target!r} must be an integer >= 1")
    return -scale * abs(len(output["output_ids"]) - target) / target
