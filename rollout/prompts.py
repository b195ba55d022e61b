"""A rollout job's prompts: records (dicts) from a jsonl file, a built-in set or the config's list.

A record has "prompt" (text, tokenized by the model's tokenizer), "messages" (a chat, rendered by the
checkpoint's chat template with the generation prompt, then tokenized) or "input_ids" (token ids, used as given;
when several are present the ids are generated from, then the messages). Any other field (e.g. "answer") is kept
and handed to the reward function with the record.
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path

from .. import configs
from .chat import chat_messages

PROMPT_KEYS = ("prompt", "messages", "input_ids")


def load_prompts(prompts: list[str], prompts_file: str | None, prompts_preset: str | None,
                 max_prompts: int | None = None) -> tuple[list[dict], str]:
    """(records, where they came from). The file or the preset, when given, replaces the inline list."""
    if prompts_file is not None and prompts_preset is not None:
        raise ValueError(f"prompts_file={prompts_file!r} and prompts_preset={prompts_preset!r}: set at most one")
    if max_prompts is not None and (isinstance(max_prompts, bool) or max_prompts < 1):
        raise ValueError(f"max_prompts={max_prompts!r}: must be null (all) or an integer >= 1")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise ValueError(f"prompts_file={prompts_file!r}: no such file")
        records, source = read_jsonl(path), str(path)
    elif prompts_preset is not None:
        path = configs.prompt_preset_path(prompts_preset)
        records, source = read_jsonl(path), f"prompt preset {prompts_preset!r}"
    else:
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts={prompts!r:.80}: must be a non-empty list of strings (or set prompts_file "
                             "or prompts_preset)")
        records, source = [{"prompt": p} for p in prompts], "prompts"
    return records[:max_prompts], source


def read_jsonl(path: Path) -> list[dict]:
    """Prompt records of a jsonl file; blank lines are skipped, each bad line is an error naming it."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        problem = _record_problem(record)
        if problem:
            raise ValueError(f"{path}:{lineno}: {problem}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts (expected one JSON object per line)")
    return records


def _record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return f'expected a JSON object with "prompt", "messages" or "input_ids", got {type(record).__name__}'
    if not any(k in record for k in PROMPT_KEYS):
        return (f'expected "prompt" (a string), "messages" (a list of chat messages) or "input_ids" (a list of '
                f'token ids); keys: {sorted(record)}')
    if "prompt" in record and not isinstance(record["prompt"], str):
        return f'"prompt" must be a string, got {type(record["prompt"]).__name__}'
    if "messages" in record:
        try:
            chat_messages(record["messages"])
        except ValueError as e:
            return f'"messages" must be a non-empty list of {{"role": ..., "content": ...}} ({e})'
    if "input_ids" in record:
        ids = record["input_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in ids)):
            return f'"input_ids" must be a non-empty list of token ids (integers >= 0), got {json.dumps(ids):.80}'
    return None


def prompt_token_ids(records: list[dict], tokenizer, source: str, chat_template=None) -> list[list[int]]:
    """The token ids each record generates from: its "input_ids", else its "messages" rendered by `chat_template`
    (the text spells its own special tokens: no BOS is added), else its tokenized "prompt"."""
    ids = []
    for i, record in enumerate(records):
        if "input_ids" in record:
            ids.append(list(record["input_ids"]))
        elif tokenizer is None:
            raise ValueError(f"{source}: prompt {i} is text but the engine has no tokenizer; give input_ids instead")
        elif "messages" in record:
            if chat_template is None:
                raise ValueError(f"{source}: prompt {i} has messages but the model has no chat template "
                                 "(tokenizer_config.json chat_template or chat_template.jinja)")
            try:
                text = chat_template.render(record["messages"], add_generation_prompt=True)
            except ValueError as e:
                raise ValueError(f"{source}: prompt {i}: {e}") from None
            ids.append(tokenizer.encode(text, add_bos=False))
        else:
            ids.append(tokenizer.encode(record["prompt"]))
    return ids
