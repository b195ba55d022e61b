"""What a sequence produced besides its tokens (per-token logprobs, top logprobs, routed experts,
weight versions), and the sglang-shaped output dicts built from it.

Routed experts (rollout routing replay): for every token that passed through the model as input
(prompt then outputs: prompt_tokens + completion_tokens - 1 of them), per MoE layer, the top-k
expert ids the router chose, in its slot order, and their fp32 weights (routed scaling included).
Legend: N tokens, L MoE layers, K experts per token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np
import torch


@dataclass
class Record:
    """Engine-side outputs of one sequence (the scheduler only knows its tokens)."""

    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_routed_experts: bool = False
    text_in_logprobs: bool = False  # sglang's return_text_in_logprobs: token texts in the logprob tuples
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int, None]]] = field(default_factory=list)
    # routes of positions [0, routed_positions): int32 ids and float32 weights [capacity, L, K], grown by doubling
    # (rows are written once per step; nothing is gathered when the sequence ends)
    route_ids: np.ndarray | None = None
    route_weights: np.ndarray | None = None
    routed_positions: int = 0  # positions recorded so far (a recompute after preemption skips them)
    versions: list[tuple[int, str]] = field(default_factory=list)  # (output index, weight version) at each change
    created: float = field(default_factory=time.perf_counter)
    # sglang's input_token_logprobs: prompt tokens from input_start on (the first has none, as in sglang); entry i
    # is the logprob of prompt[input_start + 1 + i], scored from position input_start + i
    input_start: int = 0
    input_logprobs: list[float] = field(default_factory=list)
    input_top: list[list[tuple[float, int, None]]] = field(default_factory=list)
    # streamed partial outputs, built incrementally (`format_output(partial=True)`): the text so far and the
    # (prefix, read) offsets of its incremental decode, and the output_token_logprobs tuples so far
    stream_text: tuple[str, int, int] = ("", 0, 0)
    stream_logprobs: list[tuple] = field(default_factory=list)

    def add_token(self, logprob: float, top: list | None, version: str, index: int) -> None:
        if self.return_logprob:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        if not self.versions or self.versions[-1][1] != version:
            self.versions.append((index, version))

    def top_of(self, lps_rows, ids_rows, i: int) -> list | None:
        """Row i of a step's top-logprob arrays as this record's (logprob, id, None) tuples; None when it asked none."""
        k = self.top_logprobs_num
        return [(lp, t, None) for lp, t in zip(lps_rows[i][:k], ids_rows[i][:k])] if k else None

    def scored_from(self) -> int:
        """The next prompt position whose next-token logprob is still missing."""
        return self.input_start + len(self.input_logprobs)

    def add_input(self, position: int, logprob: float, top: list | None) -> None:
        if position != self.scored_from():  # scored again (a recompute after preemption)
            return
        self.input_logprobs.append(logprob)
        if top is not None:
            self.input_top.append(top)

    def add_routes(self, start: int, ids_NLK: np.ndarray, weights_NLK: np.ndarray) -> None:
        """Routes of positions [start, start + N) (host arrays, copied); positions already recorded are skipped."""
        n = ids_NLK.shape[0]
        if start + n <= self.routed_positions:
            return
        if start > self.routed_positions:
            raise ValueError(f"routes of position {start} before those of {self.routed_positions}")
        if self.route_ids is None or start + n > len(self.route_ids):
            cap = max(start + n, 2 * (0 if self.route_ids is None else len(self.route_ids)), 64)
            self.route_ids = _grown(self.route_ids, cap, ids_NLK, self.routed_positions)
            self.route_weights = _grown(self.route_weights, cap, weights_NLK, self.routed_positions)
        skip = self.routed_positions - start
        self.route_ids[start + skip:start + n] = ids_NLK[skip:]
        self.route_weights[start + skip:start + n] = weights_NLK[skip:]
        self.routed_positions = start + n

    def routes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int32, weights float32) [routed_positions, L, K] as tensors (views of the record's buffers)."""
        if self.route_ids is None:
            return torch.zeros(0, 0, 0, dtype=torch.int32), torch.zeros(0, 0, 0)
        n = self.routed_positions
        return torch.from_numpy(self.route_ids[:n]), torch.from_numpy(self.route_weights[:n])

    def fork(self) -> "Record":
        """A sibling of a group starts with the prompt's routes (a copy: its own rows follow)."""
        n = self.routed_positions
        return Record(self.return_logprob, self.top_logprobs_num, self.return_routed_experts, self.text_in_logprobs,
                      route_ids=None if self.route_ids is None else self.route_ids[:n].copy(),
                      route_weights=None if self.route_weights is None else self.route_weights[:n].copy(),
                      routed_positions=n, created=self.created, input_start=self.input_start,
                      input_logprobs=list(self.input_logprobs), input_top=list(self.input_top))


def _grown(buf: np.ndarray | None, capacity: int, like: np.ndarray, keep: int) -> np.ndarray:
    """A [capacity, ...] buffer of `like`'s row shape and dtype holding buf's first `keep` rows (np.zeros: pages
    never written stay unallocated)."""
    out = np.zeros((capacity, *like.shape[1:]), dtype=like.dtype)
    if buf is not None:
        out[:keep] = buf[:keep]
    return out


def format_output(seq, rec: Record, tokenizer, current_version: str, partial: bool = False) -> dict:
    """The sglang-shaped output of a sequence. partial: a streamed output of a running sequence, whose text and
    output_token_logprobs are extended from the last partial's instead of rebuilt (`incremental_text`): a few
    microseconds a call instead of O(length) (a 1000-token sample: ~160 us, which at hundreds of streamed samples
    outweighs a decode step). The final output is always built whole (the exact full decode)."""
    outputs = seq.tokens[seq.num_prompt:]
    version = rec.versions[-1][1] if rec.versions else current_version
    meta = {"id": seq.group.rid, "finish_reason": seq.finish_reason, "prompt_tokens": seq.num_prompt,
            "completion_tokens": len(outputs), "cached_tokens": seq.group.seqs[0].num_cached, "weight_version": version,
            "e2e_latency": time.perf_counter() - rec.created}
    if len(rec.versions) > 1:
        meta["weight_version_switches"] = [{"output_index": i, "weight_version": v} for i, v in rec.versions]
    named = rec.text_in_logprobs and tokenizer is not None
    text = (lambda t: tokenizer.decode([t])) if named else (lambda t: None)

    def texted(rows):  # top-logprob rows with their token texts, when asked (a copy: the record's lists grow)
        return [[(lp, t, text(t)) for lp, t, _ in row] for row in rows] if rec.text_in_logprobs else list(rows)

    def tuples(lps, ids):  # (logprob, id, text); built in C without texts
        return [(lp, t, text(t)) for lp, t in zip(lps, ids)] if named else list(zip(lps, ids, repeat(None)))

    if rec.return_logprob:
        if partial:  # the tuples so far, extended by this call's new ones (a copy: the cache keeps growing)
            done = rec.stream_logprobs
            if len(done) > len(rec.logprobs):
                done.clear()
            n = len(done)
            done += tuples(rec.logprobs[n:], outputs[n:len(rec.logprobs)])
            meta["output_token_logprobs"] = list(done)
        else:
            meta["output_token_logprobs"] = tuples(rec.logprobs, outputs)
        scored = seq.tokens[rec.input_start:seq.num_prompt]
        meta["input_token_logprobs"] = [(None, scored[0], text(scored[0]))] + tuples(rec.input_logprobs, scored[1:])
    if rec.top_logprobs_num:
        meta["output_top_logprobs"] = texted(rec.top_logprobs)
        meta["input_top_logprobs"] = [None] + texted(rec.input_top)
    if rec.return_routed_experts:
        n = max(len(seq.tokens) - 1, 0)
        ids, w = rec.routes()
        meta["routed_experts"], meta["routed_expert_weights"] = ids[:n], w[:n]
    out = {"output_ids": outputs, "meta_info": meta}
    if tokenizer is not None:
        whole = incremental_text(tokenizer, outputs, rec) if partial else tokenizer.decode(outputs)
        out["text"] = trim_stop(whole, seq.params, seq.finish_reason)
    return out


def incremental_text(tokenizer, ids: list[int], rec: Record) -> str:
    """The text of ids for a streamed output, extended from the record's last one (`Record.stream_text`): the new
    tokens are decoded together with the last emitted chunk (`prefix`: context for tokenizers whose decode of a
    token depends on its neighbours, as a leading space or a ## piece) and the new text is what that decode adds to
    the chunk's. Tokens ending in an incomplete UTF-8 character wait for the rest (nothing that ends in U+FFFD is
    sent). The same text as decoding all of ids, up to such a held-back end."""
    text, prefix, read = rec.stream_text
    if read > len(ids):  # not this record's tokens any more: start over
        text, prefix, read = "", 0, 0
    if read < len(ids):
        done = tokenizer.decode(ids[prefix:read]) if read > prefix else ""
        new = tokenizer.decode(ids[prefix:])
        if len(new) > len(done) and not new.endswith("\ufffd") and new.startswith(done):
            text, prefix, read = text + new[len(done):], read, len(ids)
        elif not new.endswith("\ufffd") and not new.startswith(done):  # a decode that rewrites the past: whole
            text, prefix, read = tokenizer.decode(ids), len(ids), len(ids)
    rec.stream_text = (text, prefix, read)
    return text


def partial_tag(text: str, tags) -> int:
    """Length of the longest end of `text` that begins one of `tags` (shorter than that tag): what a stream holds
    back while it may still become a stop string or a marker."""
    for n in range(min(len(text), max((len(t) for t in tags), default=0) - 1), 0, -1):
        if any(len(t) > n and t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def trim_stop(text: str, params, finish_reason: dict | None) -> str:
    """A sample's text with its stop strings (unless no_stop_trim): ended before the one it matched; while it runs,
    without an end that may begin one (a stream never sends text that the final output takes back)."""
    if not params.stop or params.no_stop_trim:
        return text
    if finish_reason is None:
        return text[:len(text) - partial_tag(text, params.stop)]
    matched = finish_reason.get("matched")
    cut = text.find(matched) if isinstance(matched, str) else -1
    return text[:cut] if cut >= 0 else text
