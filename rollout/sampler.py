"""Batched token sampling and logprobs.

Batch invariance: a row's token depends only on its logits row, its params, its 64-bit stream seed
and the position the token will occupy; never on its slot, its neighbours or the batch size. The
randomness is Gumbel-max with noise from a counter-based hash of (seed, position, token id), so a
seeded request replays exactly on any device (up to float near-ties) and the samples of a request
never share a stream (`sample_seed`).

Per row, with x = logits / temperature (IEEE fp32 division; exact at T = 1):
  allowed = x >= threshold, the smallest x that top_k, then top_p (over the tempered probabilities
            of the top_k survivors), then min_p keep; every token equal to the threshold is kept,
            so exact ties at a cut are all in (`filtered_probs` does the same).
  token   = argmax over allowed of x + g,  g = -log(E),  E = -log(1 - w) ~ Exp(1),
            w = (hash32 + 0.5) / 2^32 (the exact fp32 recipe is `gumbel_from_hash`);
  greedy rows: argmax of the logits (ties -> lowest id, as torch.argmax).
Logprobs follow DESIGN.md: log_softmax(logits / logprob_temperature) in fp32 over the full
vocabulary, before filtering; greedy and raw_logprob rows report temperature-1 logprobs.

The torch code here is the reference and the CPU path; rollout.sampling_kernel fuses the same pass
for CUDA. Legend: S rows (one token to sample each), V vocab, R a subset of the rows.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
GOLDEN32 = 0x9E3779B9
_FLT_MAX = 3.4028234663852886e38


# ---------------------------------------------------------------- stream seeds

def _splitmix64(x: int) -> int:
    """SplitMix64 step: a bijection of 64-bit integers with full avalanche."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """64-bit stream seed of sample `sample_index` of prompt `prompt_index` of a request seeded
    with `seed`. Each step of the chain is a bijection, so for one seed distinct (prompt, sample)
    pairs differ in the input of the last mix; across seeds streams collide with probability
    2^-64 per pair (RL loops seed with the step number: step s and s+1 share nothing)."""
    for name, v in (("seed", seed), ("prompt_index", prompt_index), ("sample_index", sample_index)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _M64:
            raise ValueError(f"sample_seed: {name}={v!r} must be an integer in [0, 2**64)")
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ prompt_index) ^ sample_index)


# ---------------------------------------------------------------- per-step rows

@dataclass
class FilterPlan:
    """Host-side facts about the rows that filter, so the threshold pass needs no device sync."""
    rows: torch.Tensor  # int64 [R]: non-greedy rows with top_k, top_p or min_p active
    k_max: int          # largest active top_k among them (0 = none)
    any_top_p: bool


@dataclass
class SamplingRows:
    """One entry per token to sample this step; tensors on the logits' device."""
    temperature: torch.Tensor  # fp32 [S]; greedy rows ignore it
    greedy: torch.Tensor       # bool [S] (params.greedy: temperature < GREEDY_EPS)
    top_k: torch.Tensor        # int64 [S]; 0 (or >= V) when off
    top_p: torch.Tensor        # fp32 [S]; 1.0 when off
    min_p: torch.Tensor        # fp32 [S]; 0.0 when off
    seed: torch.Tensor         # int64 [S]: the 64-bit stream seed reinterpreted as int64
    position: torch.Tensor     # int64 [S]: the sequence position the sampled token will occupy
    logprob_temperature: torch.Tensor  # fp32 [S]: 1.0 for greedy or raw_logprob rows
    top_logprobs_num: int      # max over rows of the requested top-logprobs count (0 = none)
    needs_filter: bool         # some non-greedy row has top_k/top_p/min_p active
    filter_plan: FilterPlan | None = None  # derived from the tensors (with a sync) when None
    top_logprobs_rows: torch.Tensor | None = None  # int64 [R] rows that asked; None = all rows

    host: "RowArrays | None" = None  # the host arrays these tensors came from (`advance` reuses them)

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], positions: list[int], device,
              top_logprobs_num: list[int] | None = None) -> "SamplingRows":
        S = len(params)
        if len(seeds) != S or len(positions) != S:
            raise ValueError(f"SamplingRows.build: {S} params, {len(seeds)} seeds, {len(positions)} positions")
        for s in seeds:
            if not 0 <= s <= _M64:
                raise ValueError(f"SamplingRows.build: seed {s} is not in [0, 2**64)")
        counts = list(top_logprobs_num or [0] * S)
        if len(counts) != S:
            raise ValueError(f"SamplingRows.build: {S} params, {len(counts)} top_logprobs_num")
        greedy = [p.greedy for p in params]
        # inf would turn -inf logits into NaN (-inf / inf); FLT_MAX flattens the row just the same
        temp = [min(float(p.temperature), _FLT_MAX) for p in params]
        lp_temp = [min(p.logprob_temperature, _FLT_MAX) for p in params]
        f32 = np.array([temp, [float(p.top_p) for p in params], [float(p.min_p) for p in params], lp_temp],
                       dtype=np.float32).reshape(4, S)
        signed_seeds = [s - (1 << 64) if s >> 63 else s for s in seeds]
        i64 = np.array([[max(p.top_k, 0) for p in params], signed_seeds, list(positions), greedy],
                       dtype=np.int64).reshape(4, S)
        filters = np.array([not g and (p.top_k != -1 or p.top_p < 1.0 or p.min_p > 0.0)
                            for p, g in zip(params, greedy)], dtype=bool)
        return cls.from_host(RowArrays(f32, i64, filters, np.array(counts, dtype=np.int64)), device)

    def advance(self, src: list[int], positions: list[int], device) -> "SamplingRows":
        """The rows of the next decode step: row i is this step's row src[i] (same request, same sample) at
        `positions[i]`; built from the host arrays without going through the params again."""
        h = self.host
        if h is None or len(positions) != len(src):
            raise ValueError("SamplingRows.advance: rows built without host arrays, or src / positions differ")
        idx = np.array(src, dtype=np.int64)
        i64 = np.take(h.i64, idx, axis=1)  # C order, as build's (each row of it becomes a contiguous tensor)
        i64[2] = positions
        return self.from_host(RowArrays(np.take(h.f32, idx, axis=1), i64, h.filters[idx], h.counts[idx]), device)

    @classmethod
    def from_host(cls, h: "RowArrays", device) -> "SamplingRows":
        f32 = host_to_device(torch.from_numpy(np.ascontiguousarray(h.f32)), device)
        i64 = host_to_device(torch.from_numpy(np.ascontiguousarray(h.i64)), device)
        filt = np.flatnonzero(h.filters)
        plan = None
        if len(filt):
            plan = FilterPlan(host_to_device(torch.from_numpy(filt.astype(np.int64)), device),
                              int(h.i64[0, filt].max()), bool((h.f32[1, filt] < 1.0).any()))
        asked = np.flatnonzero(h.counts > 0)
        S = h.f32.shape[1]
        return cls(temperature=f32[0], greedy=i64[3] != 0, top_k=i64[0], top_p=f32[1], min_p=f32[2],
                   seed=i64[1], position=i64[2], logprob_temperature=f32[3],
                   top_logprobs_num=int(h.counts.max()) if S else 0, needs_filter=plan is not None, filter_plan=plan,
                   top_logprobs_rows=(None if len(asked) == S
                                      else host_to_device(torch.from_numpy(asked.astype(np.int64)), device)),
                   host=h)


@dataclass
class RowArrays:
    """SamplingRows' host side: f32 [4, S] temperature, top_p, min_p, logprob temperature; i64 [4, S] top_k (0 =
    off), signed seed, position, greedy; which rows filter; top-logprobs counts."""
    f32: np.ndarray
    i64: np.ndarray
    filters: np.ndarray
    counts: np.ndarray


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: CUDA copies go through pinned memory, non_blocking
    (the caching host allocator keeps the pinned block until the copy ran)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class SampleOutput:
    tokens: torch.Tensor    # int64 [S]
    logprobs: torch.Tensor  # fp32 [S]: log_softmax(logits / logprob_temperature) at the token, before filtering
    top_ids: torch.Tensor | None = None       # int64 [S, top_logprobs_num]; -1 in rows that did not ask
    top_logprobs: torch.Tensor | None = None  # fp32 [S, top_logprobs_num]; -inf in rows that did not ask


class Sampler:
    """backend: "torch" (reference, any device), "triton" (fused kernel; CUDA, or CPU tensors under
    TRITON_INTERPRET=1), None = triton on CUDA when importable, else torch."""

    def __init__(self, device: torch.device | str, backend: str | None = None):
        self.device = torch.device(device)
        if backend is None:
            backend = "triton" if self.device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
        if backend not in ("torch", "triton"):
            raise ValueError(f"Sampler: backend={backend!r} must be 'torch', 'triton' or None")
        if backend == "triton":
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(f"Sampler: the triton backend needs a CUDA device (or TRITON_INTERPRET=1), "
                                 f"got {self.device}")
            from .sampling_kernel import sample_triton
            self._sample = sample_triton
        else:
            self._sample = sample_ref
        self.backend = backend
        logger.info("sampler: %s path on %s", backend, self.device)

    def __call__(self, logits_SV: torch.Tensor, rows: SamplingRows) -> SampleOutput:
        S, V = logits_SV.shape
        assert logits_SV.dtype == torch.float32, f"sampler: logits must be fp32, got {logits_SV.dtype}"
        assert rows.temperature.shape == (S,), (tuple(rows.temperature.shape), S)
        thr_S = filter_thresholds(logits_SV, rows)
        lse = torch.empty(S, dtype=torch.float32, device=logits_SV.device) if rows.top_logprobs_num else None
        tokens, lps = self._sample(logits_SV, rows.temperature, rows.greedy, thr_S, rows.seed, rows.position,
                                   rows.logprob_temperature, lse_out=lse)
        out = SampleOutput(tokens, lps)
        if rows.top_logprobs_num:
            out.top_ids, out.top_logprobs = top_logprobs(logits_SV, rows, lse)
        return out


# ---------------------------------------------------------------- reference (torch)

def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for a in [0, 2^32) held in int64; split in 16-bit halves so nothing overflows."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finalizer: a bijection of 32-bit integers with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_keys(seed_S: torch.Tensor, position_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys (in int64) per row: a 3-round Feistel network over the seed's halves keyed by
    the position, so at any one position distinct seeds never share keys."""
    a, b = seed_S & _M32, (seed_S >> 32) & _M32
    q = _fmix32((position_S & _M32) ^ _fmix32(((position_S >> 32) & _M32) ^ GOLDEN32))
    b = b ^ _fmix32(a ^ q)
    a = a ^ _fmix32(b ^ ((q + GOLDEN32) & _M32))
    b = b ^ _fmix32(a ^ ((q + 2 * GOLDEN32) & _M32))
    return a, b


def hash32(k0_S: torch.Tensor, k1_S: torch.Tensor, token_V: torch.Tensor) -> torch.Tensor:
    """[S, V] 32-bit hash (in int64) of (row keys, token id); a bijection of the token for one row."""
    h = _fmix32(k0_S[:, None] ^ _mul32(token_V, 0x9E3779B1)[None, :])
    return _fmix32(h ^ k1_S[:, None])


def gumbel_from_hash(h: torch.Tensor) -> torch.Tensor:
    """Gumbel noise -log(-log(1 - w)), w = (h + 0.5) / 2^32 in fp32. -log(1 - w) is a polynomial
    for w < 1/16 (1 - w would round away the small values that decide the winners) and a log
    elsewhere, so no log near 1 is needed. Every fp32 step here is mirrored by the kernel."""
    w = ((h.to(torch.float32) + 0.5) * 2.0 ** -32).clamp_max(1.0 - 2.0 ** -24)  # h near 2^32 rounds to 1
    poly = 1.0 / 6.0 + w * (1.0 / 7.0)
    for c in (1.0 / 5.0, 1.0 / 4.0, 1.0 / 3.0, 1.0 / 2.0, 1.0):
        poly = c + w * poly
    e = torch.where(w < 0.0625, w * poly, -torch.log(1.0 - w))
    return -torch.log(e)


def gumbel_ref(seed_S: torch.Tensor, position_S: torch.Tensor, V: int) -> torch.Tensor:
    """fp32 [S, V] Gumbel noise of each row's (seed, position) stream."""
    k0, k1 = row_keys(seed_S, position_S)
    return gumbel_from_hash(hash32(k0, k1, torch.arange(V, device=seed_S.device)))


def sample_ref(logits_SV: torch.Tensor, temperature_S: torch.Tensor, greedy_S: torch.Tensor,
               threshold_S: torch.Tensor | None, seed_S: torch.Tensor, position_S: torch.Tensor,
               lp_temperature_S: torch.Tensor, rows_per_chunk: int | None = None,
               lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64 [S], logprobs fp32 [S]). threshold_S: smallest allowed x per row (None = no filter).
    Rows are processed in chunks only to bound the [rows, V] int64 temporaries; results do not depend on it.
    lse_out: receives each row's logsumexp of logits / lp_temperature, the one the logprobs subtract."""
    S, V = logits_SV.shape
    tokens = torch.empty(S, dtype=torch.int64, device=logits_SV.device)
    step = rows_per_chunk or max(1, (1 << (18 if logits_SV.device.type == "cpu" else 24)) // V)  # cache / launches
    for r in range(0, S, step):
        sl = slice(r, min(r + step, S))
        logits, greedy = logits_SV[sl], greedy_S[sl]
        x = logits / torch.where(greedy, 1.0, temperature_S[sl])[:, None]
        score = x
        if not bool(greedy.all()):
            score = torch.where(greedy[:, None], x, x + gumbel_ref(seed_S[sl], position_S[sl], V))
        if threshold_S is not None:
            score = score.masked_fill(~greedy[:, None] & (x < threshold_S[sl, None]), float("-inf"))
        tokens[sl] = score.argmax(-1)
    x_lp = logits_SV / lp_temperature_S[:, None]
    lse = torch.logsumexp(x_lp, -1)
    lps = x_lp.gather(1, tokens[:, None])[:, 0] - lse
    if lse_out is not None:
        lse_out.copy_(lse)
    return tokens, lps


# ---------------------------------------------------------------- filters

def filter_thresholds(logits_SV: torch.Tensor, rows: SamplingRows) -> torch.Tensor | None:
    """fp32 [S]: smallest allowed x = logits / temperature per row (-inf = all), None when no row filters."""
    if not rows.needs_filter:
        return None
    plan = rows.filter_plan or _plan_from_tensors(rows)
    idx = plan.rows
    if len(idx) == logits_SV.shape[0]:  # every row filters: no gather (a copy of the logits)
        return threshold_rows(logits_SV, rows.temperature, rows.top_k, rows.top_p, rows.min_p, plan.k_max,
                              plan.any_top_p)
    thr_R = threshold_rows(logits_SV.index_select(0, idx), rows.temperature[idx], rows.top_k[idx],
                           rows.top_p[idx], rows.min_p[idx], plan.k_max, plan.any_top_p)
    thr = torch.full((logits_SV.shape[0],), float("-inf"), dtype=torch.float32, device=logits_SV.device)
    return thr.index_copy_(0, idx, thr_R)


def _plan_from_tensors(rows: SamplingRows) -> FilterPlan:
    active = ~rows.greedy & ((rows.top_k > 0) | (rows.top_p < 1.0) | (rows.min_p > 0.0))
    idx = active.nonzero()[:, 0]
    return FilterPlan(idx, int(rows.top_k[idx].max()) if len(idx) else 0, bool((rows.top_p[idx] < 1.0).any()))


TOP_P_CANDIDATES = 1024  # top_p looks for its cut among this many largest logits before sorting whole rows


def threshold_rows(logits_RV: torch.Tensor, t_R: torch.Tensor, top_k_R: torch.Tensor, top_p_R: torch.Tensor,
                   min_p_R: torch.Tensor, k_max: int, any_top_p: bool) -> torch.Tensor:
    """Per row, the smallest x = logits / t kept by top_k, then top_p over the top_k survivors'
    tempered probabilities, then min_p (x >= max x + log(min_p), i.e. p >= min_p * max p).
    Dividing by t > 0 is monotone in fp32, so taking the largest logits and dividing them gives
    the largest x. top_p's cut is searched among the max(k_max, TOP_P_CANDIDATES) largest; rows
    whose cut lies beyond them are sorted whole. k_max (>= every active top_k), any_top_p:
    host-side facts, so only that rare fallback syncs with the device."""
    R, V = logits_RV.shape
    t = t_R[:, None]
    k_on = (top_k_R > 0) & (top_k_R < V)
    k = torch.where(k_on, top_k_R, V)
    thr = logits_RV.amax(-1) / t_R + torch.log(min_p_R)  # log(0) = -inf: min_p off
    n = min(V, max(k_max, TOP_P_CANDIDATES if any_top_p else 0))
    if n == 0:
        return thr
    xs = logits_RV.topk(n, -1).values / t  # the n largest x, descending
    thr = torch.where(k_on, torch.maximum(thr, xs.gather(1, (k.clamp(max=n) - 1)[:, None])[:, 0]), thr)
    if not any_top_p:
        return thr
    p_on = top_p_R < 1.0
    z_all = torch.exp(torch.logsumexp(logits_RV / t, -1) - xs[:, 0])  # row mass, relative to the max
    cut, kept = _top_p_cut(xs, k, top_p_R, torch.where(k <= n, float("nan"), z_all))
    resolved = (k <= n) | (kept < n)  # k_max <= n, so only rows without top_k can be unresolved
    thr = torch.where(p_on & resolved, torch.maximum(thr, cut), thr)
    rest = (p_on & ~resolved).nonzero()[:, 0]
    if len(rest):
        xs_r = logits_RV[rest].sort(-1, descending=True).values / t[rest]
        cut_r, _ = _top_p_cut(xs_r, k[rest], top_p_R[rest], torch.full_like(cut[rest], float("nan")))
        thr[rest] = torch.maximum(thr[rest], cut_r)
    return thr


def _top_p_cut(xs: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, z: torch.Tensor):
    """(cut value, kept count) of top_p over descending x candidates xs [R, n]: keep the prefix
    whose mass strictly above each token is below top_p * z, z = the top_k survivors' mass relative
    to the max (NaN: the candidates' own top_k mass)."""
    e = torch.exp(xs - xs[:, :1]).masked_fill(torch.arange(xs.shape[1], device=xs.device) >= k[:, None], 0.0)
    z = torch.where(torch.isnan(z), e.sum(-1), z)
    before = e.cumsum(-1) - e  # mass strictly above each token
    kept = (before < top_p[:, None] * z[:, None]).sum(-1)  # a prefix, >= 1
    return xs.gather(1, (kept - 1)[:, None])[:, 0], kept


# ---------------------------------------------------------------- top logprobs

def top_logprobs(logits_SV: torch.Tensor, rows: SamplingRows, lse_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top_logprobs_num largest log_softmax(logits / logprob_temperature) of the rows that asked, as x - lse with
    x = logits / logprob_temperature and lse_S the sampler's logsumexp of x: the sampled token's entry is then its
    logprob bit for bit (torch's log_softmax rounds otherwise)."""
    S, V = logits_SV.shape
    n = min(rows.top_logprobs_num, V)
    idx = rows.top_logprobs_rows
    if idx is None:
        xs, ids = (logits_SV / rows.logprob_temperature[:, None]).topk(n, -1)
        return ids, xs - lse_S[:, None]
    sub = logits_SV.index_select(0, idx) / rows.logprob_temperature[idx][:, None]
    xs, ids_R = sub.topk(n, -1)
    vals = xs - lse_S.index_select(0, idx)[:, None]
    out_ids = torch.full((S, n), -1, dtype=torch.int64, device=logits_SV.device).index_copy_(0, idx, ids_R)
    out_vals = torch.full((S, n), float("-inf"), device=logits_SV.device).index_copy_(0, idx, vals)
    return out_ids, out_vals


# ---------------------------------------------------------------- single-sequence runner
# These serve rollout.runner (one sequence at a time, torch.Generator randomness) until the
# batched engine replaces it.

def logprobs(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return torch.log_softmax(logits_BV.float() / params.logprob_temperature, dim=-1)


def filtered_probs(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling distribution after temperature, top-k, top-p and min-p (renormalized); the allowed
    set is the batched sampler's (`threshold_rows`), ties at a cut included."""
    logits = logits_BV.float()
    B = logits.shape[0]
    t = torch.full((B,), params.temperature, dtype=torch.float32, device=logits.device)
    x = logits / t[:, None]
    k = max(params.top_k, 0)
    thr = threshold_rows(logits, t, torch.full((B,), k, device=logits.device),
                         torch.full((B,), params.top_p, device=logits.device),
                         torch.full((B,), params.min_p, device=logits.device), k, params.top_p < 1.0)
    probs = torch.softmax(x, dim=-1).masked_fill(x < thr[:, None], 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B]."""
    if params.greedy:
        return logits_BV.argmax(dim=-1)
    probs = filtered_probs(logits_BV, params)
    return torch.multinomial(probs, 1, generator=generator)[..., 0]
