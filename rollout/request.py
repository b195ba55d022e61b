"""Requests and sequences as the scheduler sees them: pure Python, no tensors.

A request with n samples is a Group of n sequences sharing its prompt. The group's first sequence
(the leader) prefills the prompt once; the step that finishes that prefill samples n first tokens
from the same logits, and the n - 1 siblings fork off the leader, sharing its cache pages
(copy-on-write for a partially filled last page).
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued: new, or preempted / retracted (recomputes its tokens when admitted again)
    RUNNING = "running"  # holds cache pages; prefilling or decoding
    FINISHED = "finished"
    ABORTED = "aborted"


ENDED = (SeqStatus.FINISHED, SeqStatus.ABORTED)


@dataclass(eq=False)
class Group:
    """One request: a prompt and its n samples."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    seeds: list[int]  # one noise stream per sample (len == params.n)
    arrival: int  # FCFS order
    seqs: list["Sequence"] = field(default_factory=list)  # the leader first, siblings appended at the fork
    compute_from: int | None = None  # positions from here on are computed, never taken from the prefix cache

    @property
    def done(self) -> bool:
        """Every sample ended; a leader that ended before forking ends its group (no siblings will come)."""
        return bool(self.seqs) and all(s.status in ENDED for s in self.seqs)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    group: Group
    index: int  # sample index in the group; its noise stream is group.seeds[index]
    tokens: list[int]  # prompt then outputs
    num_prompt: int
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # leading tokens whose latents are in the cache
    pages: list[int] = field(default_factory=list)  # cache pages of positions [0, num_computed) (+ this step's)
    fork: int = 1  # > 1: a leader whose prompt prefill is not done; that step samples `fork` tokens
    finish_reason: dict | None = None
    num_cached: int = 0  # leading prompt tokens whose KV came from the prefix cache
    epoch: int = 0  # the scheduler's prefix-cache epoch when it was last admitted (its KV computed since)

    @property
    def num_outputs(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def rid(self) -> str:
        return self.group.rid

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def arrival_key(self) -> tuple[int, int]:
        return (self.group.arrival, self.seq_id)


def stop_reason(seq: Sequence, token: int, eos_ids: tuple[int, ...], max_context: int | None,
                decode: Callable[[list[int]], str] | None = None,
                token_text: Callable[[int], str] | None = None) -> dict | None:
    """sglang's finish_reason for a sequence that just appended `token`, or None to go on. decode: the tokenizer's,
    for stop strings (the last output tokens are decoded; a string found there ends the sample). token_text: one
    token's text, when every output token is checked as it is appended (the scheduler's case): a string that was
    not there before must then end in the new token's text, so the tail is decoded only when that text could end
    one (it holds the last character of a stop string, or is empty or partial, or a string ends in whitespace that
    a token's own decoding may drop)."""
    p = seq.params
    if token in p.stop_token_ids:
        return {"type": "stop", "matched": token}
    if not p.ignore_eos and token in eos_ids:
        return {"type": "stop", "matched": token}
    if p.stop and decode is not None and (token_text is None or _may_end_stop(p, token_text(token))):
        matched = next((s for s in p.stop if s in _tail_text(seq, decode)), None)
        if matched is not None:
            return {"type": "stop", "matched": matched}
    if seq.num_outputs >= p.max_new_tokens:
        return {"type": "length", "length": seq.num_outputs}
    if max_context is not None and len(seq.tokens) >= max_context:
        return {"type": "length", "length": seq.num_outputs}
    return None


def _may_end_stop(p: SamplingParams, text: str) -> bool:
    ends = p.stop_ends
    return not text or "\ufffd" in text or ends is None or any(c in text for c in ends)


def _tail_text(seq: Sequence, decode: Callable[[list[int]], str]) -> str:
    """The text of the last output tokens, long enough to hold any of the sequence's stop strings: as many tokens as
    the longest string has UTF-8 bytes, + 1, and more while tokens that decode to nothing keep it shorter."""
    n, longest = seq.params.stop_tail, max(len(s) for s in seq.params.stop)
    while True:
        start = max(seq.num_prompt, len(seq.tokens) - n)
        text = decode(seq.tokens[start:])
        if start == seq.num_prompt or len(text) > longest:
            return text
        n *= 2
