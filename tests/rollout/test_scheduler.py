"""Scheduler and page pool (pure Python): chunked prefill, decode batches, group forks with shared
pages and copy-on-write, preemption by recompute, stops, aborts, retract; and a randomized run that
checks every page is freed exactly once, every request ends, and every sequence only ever sees its
own tokens in the cache (a shadow cache written through the scheduled pages and copies)."""
from __future__ import annotations

import random

import pytest

from mxroll.rollout.pages import PagePool
from mxroll.rollout.request import ENDED, Group, Sequence, SeqStatus, stop_reason
from mxroll.rollout.sampling_params import SamplingParams
from mxroll.rollout.scheduler import RequestError, Scheduler


def group(rid, prompt, arrival, **params) -> Group:
    p = SamplingParams.from_dict(params)
    return Group(rid, list(prompt), p, list(range(p.n)), arrival)


def make(pages=64, page_size=4, max_running=8, budget=16, **kw) -> Scheduler:
    return Scheduler(PagePool(pages), page_size=page_size, max_running=max_running, max_batch_tokens=budget, **kw)


def step(s: Scheduler, pick=lambda row, j: 100 + j):
    batch = s.schedule()
    tokens = [[pick(r, j) for j in range(r.num_samples)] for r in batch.rows]
    return batch, s.update(batch, tokens)


def test_page_pool_refcounts_and_double_free():
    pool = PagePool(2)
    a = pool.alloc()
    pool.ref(a)
    pool.free(a)
    assert pool.num_free == 1 and pool.refcount(a) == 1
    pool.free(a)
    assert pool.num_free == 2
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(a)
    assert pool.alloc() is not None and pool.alloc() is not None and pool.alloc() is None


def test_chunked_prefill_then_decode():
    s = make(budget=8)
    s.add(group("a", range(1, 21), 0, max_new_tokens=3))
    rows = []
    for _ in range(3):
        batch, _ = step(s)
        rows.append([(r.start, r.length, r.num_samples) for r in batch.rows])
    assert rows == [[(0, 8, 0)], [(8, 8, 0)], [(16, 4, 1)]]  # prompt in budget-sized chunks, sampling at the end
    batch, _ = step(s)
    assert [(r.start, r.length, r.num_samples) for r in batch.rows] == [(20, 1, 1)] and batch.is_decode
    batch, done = step(s)
    assert done and done[0].finish_reason == {"type": "length", "length": 3}
    assert s.pool.num_free == 64 and not s.has_work()


def test_load_counts_the_tokens_of_running_and_waiting_requests():
    """sglang's /get_load figures: a waiting leader counts its n samples; a fork's samples each hold the prompt."""
    s = make(budget=8)
    assert s.load() == {"load": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
    s.add(group("a", range(1, 6), 0, max_new_tokens=4, n=3))
    s.add(group("b", range(1, 21), 1, max_new_tokens=4))
    assert s.load() == {"load": 25, "num_reqs": 0, "num_waiting_reqs": 4, "num_tokens": 25}
    step(s)  # a's prompt and its first tokens (3 samples of 6 tokens), b's first chunk (b stays running)
    assert s.load() == {"load": 3 * 6 + 20, "num_reqs": 4, "num_waiting_reqs": 0, "num_tokens": 38}
    step(s)
    assert s.load()["load"] == 3 * 7 + 20


def test_decode_rows_come_first_and_budget_is_shared():
    s = make(budget=6)
    s.add(group("a", [1, 2], 0, max_new_tokens=5))
    step(s)
    s.add(group("b", range(10), 1, max_new_tokens=5))
    batch, _ = step(s)
    assert [(r.seq.rid, r.length) for r in batch.rows] == [("a", 1), ("b", 5)]


@pytest.mark.parametrize("prompt_len, copies", [(6, 2), (8, 0)])
def test_fork_shares_prompt_pages_and_copies_the_partial_page(prompt_len, copies):
    s = make(page_size=4)
    g = group("g", range(1, prompt_len + 1), 0, n=3, max_new_tokens=4)
    s.add(g)
    batch, _ = step(s)
    assert batch.rows[0].num_samples == 3
    leader, *sibs = g.seqs
    assert len(g.seqs) == 3 and [q.tokens[-1] for q in g.seqs] == [100, 101, 102]
    full = prompt_len // 4
    for q in g.seqs:
        assert q.pages[:full] == leader.pages[:full]
    assert all(s.pool.refcount(p) == 3 for p in leader.pages)
    batch, _ = step(s)  # each sample writes its first output position
    assert len(batch.copies) == copies
    if copies:  # the shared partial page: two samples got a copy, the last writer keeps the original
        assert len({q.pages[-1] for q in g.seqs}) == 3
        assert {src for src, _ in batch.copies} == {leader.pages[-1]} or len({src for src, _ in batch.copies}) == 1
    assert all(s.pool.refcount(p) == 3 for p in leader.pages[:full])


def test_preemption_recomputes_the_newest_sequence():
    s = make(pages=7, page_size=4, budget=64)
    s.add(group("old", range(1, 12), 0, max_new_tokens=14, ignore_eos=True))
    s.add(group("new", range(1, 12), 1, max_new_tokens=14, ignore_eos=True))
    step(s)  # both prefill: 3 pages each, one page left
    step(s)  # both write position 11 (their third page)
    batch, _ = step(s)  # position 12 needs a 4th page each: "old" takes the last one, "new" is preempted
    assert s.num_preemptions == 1 and [r.seq.rid for r in batch.rows] == ["old"]
    new = s.waiting[0]
    assert new.rid == "new" and new.num_computed == 0 and new.pages == [] and new.num_outputs == 2
    while s.running and s.running[0].rid == "old":
        step(s)
        if not s.running:
            break
    batch = s.schedule()  # "new" recomputes prompt and outputs so far, then samples its next token
    row = batch.rows[0]
    assert row.seq.rid == "new" and row.start == 0 and row.length == 13 and row.num_samples == 1


def test_stop_conditions_and_max_new_tokens_zero():
    s = make(eos_ids=(7,))
    s.add(group("stop", [1, 2], 0, max_new_tokens=10, stop_token_ids=[9]))
    s.add(group("eos", [1, 2], 1, max_new_tokens=10))
    s.add(group("eos-ignored", [1, 2], 2, max_new_tokens=2, ignore_eos=True))
    _, done = step(s, pick=lambda r, j: {"stop": 9, "eos": 7, "eos-ignored": 7}[r.seq.rid])
    assert {q.rid: q.finish_reason for q in done} == {"stop": {"type": "stop", "matched": 9},
                                                    "eos": {"type": "stop", "matched": 7}}
    _, done = step(s, pick=lambda r, j: 7)
    assert done[0].finish_reason == {"type": "length", "length": 2}
    assert s.add(group("zero", [1], 3, max_new_tokens=0))[0].finish_reason == {"type": "length", "length": 0}
    c = make(max_context=5)
    c.add(group("ctx", [1, 2, 3], 0, max_new_tokens=10))
    step(c)
    _, done = step(c)
    assert done[0].finish_reason == {"type": "length", "length": 2}


def test_abort_and_retract():
    s = make(budget=4)
    s.add(group("a", range(1, 10), 0, n=2))  # partially prefilled when aborted
    s.add(group("b", [1], 1))
    step(s)
    aborted = s.abort("a")
    assert [q.status for q in aborted] == [SeqStatus.ABORTED] and aborted[0].finish_reason["type"] == "abort"
    assert s.pool.num_free == 64
    step(s)
    assert s.retract_all() == 1 and s.pool.num_free == 64 and s.waiting[0].rid == "b"
    assert s.schedule().rows[0].start == 0
    assert len(s.abort_all()) == 1 and not s.has_work()


def test_requests_that_can_never_fit_are_rejected():
    s = make(pages=4, page_size=4, max_running=2, max_context=100)
    with pytest.raises(RequestError, match="never fit the KV cache"):
        s.add(group("x", range(10), 0, max_new_tokens=10))
    with pytest.raises(RequestError, match="n=3"):
        s.add(group("y", [1], 0, n=3, max_new_tokens=4))
    with pytest.raises(RequestError, match="context length 100"):
        s.add(group("z", range(100), 0))


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("seed", range(24))
def test_randomized_invariants(seed, overlap):
    _random_run(seed, overlap)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("seed", range(16))
def test_randomized_invariants_with_the_prefix_cache(seed, overlap):
    """As above, prompts sharing prefixes and the prefix cache on: every position a row reads holds its own token
    (cached pages spell the sequence's prefix), refcounts are the sequences' and the cache's, and a flush at the end
    frees every page."""
    _random_run(seed, overlap, prefix=True)


def test_randomized_prefix_cache_runs_hit_and_evict():
    runs = [_random_run(seed, prefix=True) for seed in range(16)]
    assert sum(r["hit_tokens"] for r in runs) > 0 and sum(r["evicted"] for r in runs) > 0


def test_randomized_runs_exercise_preemption_and_copy_on_write():
    runs = [_random_run(seed) for seed in range(24)]
    assert sum(r["preemptions"] for r in runs) > 0 and sum(r["copies"] for r in runs) > 0


def test_randomized_overlap_runs_exercise_ahead_steps_and_dropped_rows():
    runs = [_random_run(seed, overlap=True) for seed in range(24)]
    assert sum(r["ahead"] for r in runs) > 100 and sum(r["dropped"] for r in runs) > 0


def _random_run(seed: int, overlap: bool = False, prefix: bool = False, launched=None) -> dict:
    """Random arrivals (n in 1..3), aborts, retracts, stops and a small pool; checks after every step.
    overlap: as the engine's overlap schedule does, the next decode step is scheduled (and its cache writes
    done) before the current step's tokens are applied; requests, aborts and retracts come between steps
    only (the engine finishes a launched-ahead step before running commands).
    launched(batch, page_size, pages): called for every batch in the engine's launch order."""
    rng = random.Random(seed)
    stats = dict(copies=0, ahead=0, dropped=0)
    page_size = rng.choice([1, 2, 4, 16])
    pages = rng.randint(12, 40) * (4 // min(page_size, 4))
    s = Scheduler(PagePool(pages), page_size=page_size, max_running=rng.randint(3, 10),
                  max_batch_tokens=rng.randint(4, 40), eos_ids=(1,), max_context=rng.choice([None, 60]),
                  prefix_cache=prefix)
    bases = [[rng.randint(2, 50) for _ in range(30)] for _ in range(3)]  # shared leading tokens (prefix runs)
    evicted = 0
    if prefix:
        evict = s.prefix.evict

        def counting_evict(n):
            nonlocal evicted
            done = evict(n)
            evicted += done
            return done
        s.prefix.evict = counting_evict
    shadow: dict[int, dict[int, tuple]] = {}  # page -> offset -> (seq_id, position, token)
    groups, arrivals, ahead = [], 0, None

    def write_and_read(batch, known=None, slots=None):
        for src, dst in batch.copies:
            shadow[dst] = dict(shadow.get(src, {}))
        for i, row in enumerate(batch.rows):  # the fake model writes each new token and reads its visible context
            q = row.seq
            if known is not None and not known[i]:  # launched ahead, ended since: its write lands in the slot it
                page, off = slots[i]                # was given (a page freed since), nothing reads it
                shadow.setdefault(page, {})[off] = None
                continue
            assert row.start == q.num_computed and row.length > 0
            for pos in range(row.start, row.start + row.length):
                shadow.setdefault(q.pages[pos // page_size], {})[pos % page_size] = (q.tokens[pos], pos)
            for pos in range(row.start + row.length):
                assert shadow[q.pages[pos // page_size]][pos % page_size] == (q.tokens[pos], pos)

    def run_step(batch):
        nonlocal ahead
        nxt = s.schedule_next_decode(batch) if overlap else None
        if nxt is not None and launched is not None:
            launched(nxt, page_size, pages)
        slots = [(r.seq.pages[r.start // page_size], r.start % page_size) for r in nxt.rows] if nxt else None
        live = [r.seq.status not in ENDED for r in batch.rows]
        stats["dropped"] += live.count(False)
        s.update(batch, [[rng.randint(1, 50) for _ in range(r.num_samples)] for r in batch.rows])
        if nxt is not None:  # the device runs it after `batch`; the host learns the tokens it reads only now
            assert [batch.rows[i].seq for i in nxt.ahead_of] == [r.seq for r in nxt.rows]
            stats["ahead"] += 1
            write_and_read(nxt, [r.seq.status not in ENDED for r in nxt.rows], slots)
        else:
            _check_pages(s, pages, page_size)
        ahead = nxt

    for t in range(400):
        if ahead is not None:
            run_step(ahead)
            continue
        if rng.random() < 0.3 and arrivals < 30:
            cap = pages * page_size
            plen = rng.randint(1, min(30, cap // 2))
            prompt = [rng.randint(2, 50) for _ in range(plen)]
            if prefix:
                shared = rng.randint(0, plen)
                prompt = rng.choice(bases)[:shared] + prompt[shared:]
            g = group(f"r{arrivals}", prompt, arrivals, n=rng.randint(1, 3),
                      max_new_tokens=rng.randint(0, min(25, cap - plen)), stop_token_ids=[rng.randint(2, 50)],
                      ignore_eos=rng.random() < 0.5)
            if rng.random() < 0.3:  # prompt-token logprobs asked: positions from here on computed, even at 0 tokens
                g.compute_from = rng.randint(0, plen - 1)
            arrivals += 1
            s.add(g)
            groups.append(g)
        if rng.random() < 0.05 and groups:
            s.abort(rng.choice(groups).rid)
        if rng.random() < 0.02:
            s.retract_all()
        if prefix and rng.random() < 0.02:  # a weight update
            s.flush_prefix_cache()
        batch = s.schedule()
        if batch is None:
            continue
        stats["copies"] += len(batch.copies)
        if launched is not None:
            launched(batch, page_size, pages)
        write_and_read(batch)
        run_step(batch)
    while s.has_work() or ahead is not None:
        batch = ahead or s.schedule()
        if ahead is None:
            if launched is not None:
                launched(batch, page_size, pages)
            write_and_read(batch)
        run_step(batch)
    _check_pages(s, pages, page_size)
    hits = s.prefix.hit_tokens if prefix else 0
    s.flush_prefix_cache()
    _check_pages(s, pages, page_size)
    assert s.pool.num_free == pages and s.pool.num_evictable == 0
    for g in groups:
        assert g.done
        if g.seqs[0].status == SeqStatus.FINISHED and g.params.max_new_tokens > 0:
            assert len(g.seqs) == g.params.n
    return dict(stats, preemptions=s.num_preemptions, hit_tokens=hits, evicted=evicted)


def _check_pages(s: Scheduler, pages: int, page_size: int) -> None:
    held: dict[int, int] = {}
    for q in s.running:
        assert len(q.pages) == -(-q.num_computed // page_size)
        for p in q.pages:
            held[p] = held.get(p, 0) + 1
    for q in s.waiting:
        assert q.pages == [] and q.num_computed == 0
    cached = s.prefix.pages() if s.prefix is not None else []
    assert len(set(cached)) == len(cached)
    for p in cached:
        held[p] = held.get(p, 0) + 1
    for p in range(pages):
        assert s.pool.refcount(p) == held.get(p, 0), p
    assert s.pool.num_free == pages - len(held)
    assert s.pool.num_evictable == sum(s.pool.refcount(p) == 1 for p in cached)
    for node in (s.prefix._nodes.values() if s.prefix is not None else ()):  # in use: its whole chain is in use,
        if s.pool.refcount(node.page) > 1 and node.parent is not None:       # so unused pages are all evictable
            assert s.pool.refcount(node.parent.page) > 1


def test_schedule_next_decode():
    """The decode step after a decode step whose tokens are not known yet: every row one position on, rows that
    end by length with the pending token left out, new pages reserved; None whenever schedule() could do
    otherwise (a prefill row, an admissible waiting request, pages short)."""
    s = make(pages=6, page_size=4, max_running=2, budget=16)
    s.add(group("a", [1, 2, 3], 0, max_new_tokens=10))
    s.add(group("b", [1, 2, 3, 4, 5], 1, max_new_tokens=2))
    first = s.schedule()
    assert s.schedule_next_decode(first) is None  # prefill rows
    s.update(first, [[7], [7]])
    decode = s.schedule()
    assert [(r.seq.rid, r.start) for r in decode.rows] == [("a", 3), ("b", 5)]
    nxt = s.schedule_next_decode(decode)
    assert [(r.seq.rid, r.start, r.length, r.num_samples) for r in nxt.rows] == [("a", 4, 1, 1)]  # b ends by length
    assert nxt.ahead_of == [0]  # its row's row in `decode`, where its input token is sampled
    assert len(nxt.rows[0].seq.pages) == 2  # position 4 opened a page
    s.update(decode, [[8], [8]])
    assert [q.rid for q in s.running] == ["a"] and s.running[0].num_computed == 4
    s.update(nxt, [[9]])
    assert s.running[0].tokens[-2:] == [8, 9] and s.running[0].num_computed == 5
    step = s.schedule()
    s.add(group("c", [1, 2], 2, max_new_tokens=3))  # admissible: the next step must come from schedule()
    assert s.schedule_next_decode(step) is None
    s.update(step, [[4]])
    both = s.schedule()  # a decodes, c prefills
    assert s.schedule_next_decode(both) is None
    t = make(pages=3, page_size=2, max_running=4, budget=16)
    t.add(group("d", [1, 2, 3], 0, max_new_tokens=3))
    t.update(t.schedule(), [[5]])
    step = t.schedule()  # position 3 ends page 2: the next position needs a third page
    taken = t.pool.alloc()  # the last free page is gone
    assert t.schedule_next_decode(step) is None and t.pool.num_free == 0  # no preemption on this path
    t.pool.free(taken)
    assert [r.start for r in t.schedule_next_decode(step).rows] == [4] and t.pool.num_free == 0


def test_stop_strings_look_only_at_outputs_and_past_tokens_that_decode_to_nothing():
    """A stop string is looked for in the decoded outputs (never the prompt), across tokens that decode to nothing
    (special tokens, partial bytes), however many; eos and stop_token_ids still end the sample first."""
    pieces = {1: "a", 2: "", 3: "b", 4: "x"}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    seq = Sequence(0, Group("r", [1, 3], SamplingParams(stop=("ab",), max_new_tokens=99), [0], 0), 0, [1, 3], 2)
    for t in [2, 1, 2, 2, 2, 2, 2]:
        seq.tokens.append(t)
        assert stop_reason(seq, t, (), None, decode) is None  # "ab" of the prompt does not count
    seq.tokens.append(3)
    assert stop_reason(seq, 3, (), None, decode) == {"type": "stop", "matched": "ab"}
    assert stop_reason(seq, 3, (3,), None, decode) == {"type": "stop", "matched": 3}  # eos first
    assert stop_reason(seq, 3, (), None, None) is None  # no tokenizer: the engine refuses such requests
    seq.tokens.append(4)
    assert stop_reason(seq, 4, (), None, decode) == {"type": "stop", "matched": "ab"}  # still held in the tail


@pytest.mark.parametrize("stops", [("ab",), ("b:", "xa"), ("a b",), ("ab ",), ("\u00e9!",)])
def test_stop_string_precheck_finds_every_stop_the_full_check_finds(stops):
    """The scheduler decodes a sequence's tail only when the new token's own text could end a stop string
    (`token_text`): over random outputs (tokens decoding to nothing, to half a character, to spaces), checked token
    by token as the scheduler does, the first stop is where checking every tail finds it."""
    utf8 = "\u00e9!".encode()  # a two-byte character and "!": tokens 6 and 7 carry its two bytes
    pieces = {1: b"a", 2: b"", 3: b"b", 4: b"x", 5: b" ", 6: utf8[:1], 7: utf8[1:], 8: b":", 9: b"!"}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    rng = random.Random(len(stops[0]))
    found = 0
    for trial in range(300):
        out = [rng.choice(list(pieces)) for _ in range(30)]
        params = SamplingParams(stop=stops, max_new_tokens=99)
        firsts = []
        for token_text in (None, lambda t: decode([t])):
            seq = Sequence(0, Group("r", [4], params, [0], 0), 0, [4], 1)
            first = None
            for i, t in enumerate(out):
                seq.tokens.append(t)
                if stop_reason(seq, t, (), None, decode, token_text) is not None:
                    first = i
                    break
            firsts.append(first)
        assert firsts[0] == firsts[1], (out, firsts)
        found += firsts[0] is not None
    assert 10 < found < 290  # stops found in some outputs, not in others


def test_sequences_admitted_before_a_flush_never_fill_the_prefix_cache():
    """After flush_prefix_cache (every weight update), sequences already running keep decoding but their pages
    (KV partly of the old weights) are not cached when they end; sequences admitted later are."""
    s = make(pages=16, page_size=2, budget=16, prefix_cache=True)
    s.add(group("old", [5, 6, 7, 8, 9], 0, max_new_tokens=3))
    step(s)
    s.flush_prefix_cache()
    while s.has_work():
        step(s)
    assert len(s.prefix) == 0 and s.pool.num_free == 16
    s.add(group("new", [5, 6, 7, 8, 9], 1, max_new_tokens=3))
    while s.has_work():
        step(s)
    assert len(s.prefix) == 3  # positions 0..6 computed (its last token sampled, never fed back): 3 full pages
