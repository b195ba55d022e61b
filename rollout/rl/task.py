"""The RL loop's task: continue in the prompt's character set (e.g. its letter case).

A prompt is bos + `prompt_len` random characters drawn from one of the task's character sets (by
default lowercase and uppercase letters); a sample's reward is the fraction of its `max_new_tokens`
output tokens that are characters of the prompt's set. The reward is verifiable from token ids alone,
gives partial credit per token (a randomly initialised model starts near |set| / vocab and has a
gradient from the first step), and depends on the prompt: emitting one set regardless of the prompt
earns half the reward with two sets, so a high reward means the policy reads its prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    charset: int  # index of its character set


def check_task(charsets: list[str], prompt_len: int) -> None:
    """What needs no tokenizer: non-empty, disjoint character sets and a positive prompt length."""
    if len(charsets) < 1 or any(not isinstance(s, str) or not s for s in charsets):
        raise ValueError(f"task.charsets={list(charsets)!r}: needs at least one non-empty string")
    overlap = {c for i, a in enumerate(charsets) for b in charsets[i + 1:] for c in set(a) & set(b)}
    if overlap:
        raise ValueError(f"task.charsets share characters {sorted(overlap)}: each must belong to one set")
    if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or prompt_len < 1:
        raise ValueError(f"task.prompt_len={prompt_len!r}: must be an integer >= 1")


class CharsetTask:
    """Prompts and rewards over token ids; `tokenizer` maps each character to its single token id."""

    def __init__(self, charsets: list[str], prompt_len: int, max_new_tokens: int, tokenizer):
        check_task(charsets, prompt_len)
        if tokenizer is None:
            raise ValueError("the RL task needs the model's tokenizer (the checkpoint has none)")
        self.charsets = list(charsets)
        self.prompt_len, self.max_new_tokens = prompt_len, max_new_tokens
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.set_ids = [[self._char_id(c) for c in s] for s in self.charsets]
        self.members = [frozenset(ids) for ids in self.set_ids]

    def _char_id(self, char: str) -> int:
        ids = self.tokenizer.encode(char)
        if self.bos is not None and ids[:1] == [self.bos]:
            ids = ids[1:]
        if len(ids) != 1:
            raise ValueError(f"task.charsets: {char!r} is {len(ids)} tokens for this tokenizer; the task needs "
                             "characters that are one token each")
        return ids[0]

    def sample(self, rng: random.Random, count: int) -> list[Prompt]:
        prompts = []
        for _ in range(count):
            k = rng.randrange(len(self.set_ids))
            body = [rng.choice(self.set_ids[k]) for _ in range(self.prompt_len)]
            prompts.append(Prompt(([self.bos] if self.bos is not None else []) + body, k))
        return prompts

    def reward(self, prompt: Prompt, output_ids: list[int]) -> float:
        """Output tokens in the prompt's set over max_new_tokens (a sample that stops early earns less)."""
        members = self.members[prompt.charset]
        return sum(t in members for t in output_ids[:self.max_new_tokens]) / self.max_new_tokens

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
