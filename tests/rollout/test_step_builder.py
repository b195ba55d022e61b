"""StepBuilder (reused buffers, host padding for graphs) against the plain StepInputs.build."""
from __future__ import annotations

import random

import pytest
import torch

from mxroll.rollout.step_builder import StepBuilder
from mxroll.rollout.step_inputs import PageTable, RowPages, StepInputs

G, SCRATCH = 4, 999


class Seq:
    def __init__(self, tokens, pages):
        self.tokens, self.pages = tokens, pages


class Row:
    def __init__(self, seq, start, length, num_samples):
        self.seq, self.start, self.length, self.num_samples = seq, start, length, num_samples


def random_rows(rng: random.Random, n: int, decode: bool) -> list[Row]:
    rows, next_page = [], 0
    for _ in range(n):
        computed = rng.randrange(0, 40)
        length = 1 if decode else rng.choice([1, 1, 3, 17])
        end = computed + length
        pages = list(range(next_page, next_page + -(-end // G) + rng.randrange(0, 2)))  # sometimes one spare page
        rng.shuffle(pages)
        next_page += len(pages)
        tokens = [rng.randrange(5, 1000) for _ in range(end + rng.randrange(0, 3))]
        rows.append(Row(Seq(tokens, pages), computed, length, rng.choice([0, 1, 1, 3])))
    return rows


def assert_same(got: StepInputs, ref: StepInputs) -> None:
    T = ref.num_tokens
    assert got.ids_T[:T].tolist() == ref.ids_T.tolist()
    assert got.pos_T[:T].tolist() == ref.pos_T.tolist()
    assert got.slots_T[:T].tolist() == ref.slots_T.tolist()
    assert got.sample_T.tolist() == ref.sample_T.tolist()
    assert (got.qo_indptr, got.kv_lens, got.pages, got.is_decode) == (ref.qo_indptr, ref.kv_lens, ref.pages,
                                                                       ref.is_decode)
    assert got.sample_rows_in_order == ref.sample_rows_in_order


def table_lists(t: PageTable) -> list[list[int]]:
    return [t.qo_indptr.tolist(), t.kv_indptr.tolist(), t.kv_indices.tolist(), t.kv_lens.tolist()]


@pytest.mark.parametrize("decode", [False, True])
def test_builder_matches_reference_across_reused_buffers(decode):
    rng = random.Random(int(decode))
    b = StepBuilder(G, max_tokens=512, max_samples=256, device=torch.device("cpu"), scratch_page=SCRATCH)
    for n in (7, 1, 30, 3, 0, 12):  # grow and shrink: stale buffer contents must not leak into a step
        rows = random_rows(rng, n, decode)
        ref = StepInputs.build(rows, G, torch.device("cpu"))
        got = b.build(rows)
        assert_same(got, ref)
        assert not got.graph and got.pad_rows == 0
        assert table_lists(got.page_table()) == table_lists(ref.page_table())
        for t in (got.table.qo_indptr, got.table.kv_indptr, got.table.kv_indices, got.table.kv_lens):
            assert t.dtype == torch.int32 and t.is_contiguous()
            if t.numel():  # parts on 256-byte boundaries of one buffer
                assert (t.data_ptr() - got.table.qo_indptr.data_ptr()) % 256 == 0


def test_reference_page_table_matches_kv_indices_lists():
    rows = random_rows(random.Random(3), 9, decode=False)
    ref = StepInputs.build(rows, G, torch.device("cpu"))
    indptr, indices = ref.kv_indices()
    assert table_lists(ref.page_table()) == [ref.qo_indptr, indptr, indices, ref.kv_lens]


def test_decode_step_pads_to_graph_size_on_host():
    rng = random.Random(5)
    b = StepBuilder(G, max_tokens=64, max_samples=64, device=torch.device("cpu"), scratch_page=SCRATCH)
    rows = random_rows(rng, 5, decode=True)
    for r in rows:
        r.num_samples = 1
    ref = StepInputs.build(rows, G, torch.device("cpu"))
    got = b.build(rows, pad_to=8)
    assert_same(got, ref)
    assert got.graph and got.pad_rows == 3 and got.num_rows == 5 and got.sample_rows_in_order
    assert got.ids_T.tolist()[5:] == [0, 0, 0] and got.pos_T.tolist()[5:] == [0, 0, 0]
    assert got.slots_T.tolist()[5:] == [SCRATCH * G] * 3
    qo, indptr, indices, lens = table_lists(got.page_table())
    _, ref_indptr, ref_indices = [None, *ref.kv_indices()]
    assert qo == list(range(9))
    assert indptr == ref_indptr + [ref_indptr[-1] + i for i in (1, 2, 3)]
    assert indices == ref_indices + [SCRATCH] * 3
    assert lens == ref.kv_lens + [1, 1, 1]
    # a graph of size 8 always finds its inputs at the same addresses
    views = [v.data_ptr() for v in b.token_views(8)]
    again = b.build(random_rows(rng, 8, decode=True), pad_to=8)
    assert [again.ids_T.data_ptr(), again.pos_T.data_ptr(), again.slots_T.data_ptr()] == views
    assert all((v - views[0]) % 128 == 0 for v in views)


def test_only_decode_batches_pad_and_buffers_are_bounded():
    b = StepBuilder(G, max_tokens=16, max_samples=4, device=torch.device("cpu"), scratch_page=SCRATCH)
    rows = random_rows(random.Random(1), 2, decode=True)
    with pytest.raises(ValueError, match="pad"):
        b.build(rows, pad_to=1)
    prefill = [Row(Seq(list(range(40)), list(range(10))), 0, 20, 1)]
    with pytest.raises(ValueError, match="pad"):
        b.build(prefill, pad_to=4)
    with pytest.raises(ValueError, match="exceed"):
        b.build(prefill)


def test_next_ids_take_the_place_of_tokens_the_host_does_not_have():
    """A decode step built before its tokens reached the host (overlap schedule): the ids come from a device
    tensor, everything else as if the tokens were known; a prefill step or a wrong length is refused."""
    rng = random.Random(5)
    b = StepBuilder(G, max_tokens=512, max_samples=256, device=torch.device("cpu"), scratch_page=SCRATCH)
    rows = random_rows(rng, 9, decode=True)
    ref = StepInputs.build(rows, G, torch.device("cpu"))
    known = [r.seq.tokens[r.start] for r in rows]
    for r in rows:  # the host has not appended the step's input tokens yet
        del r.seq.tokens[r.start:]
    got = b.build(rows, pad_to=16, next_ids=torch.tensor(known))
    assert_same(got, ref)
    assert got.ids_T[9:].tolist() == [0] * 7  # padding rows keep token 0
    with pytest.raises(ValueError, match="next_ids"):
        b.build(rows, next_ids=torch.tensor(known[:3]))
    prefill = random_rows(rng, 3, decode=False)
    prefill[0].length = 3
    with pytest.raises(ValueError, match="prefill"):
        b.build(prefill, next_ids=torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("seed", range(24))
def test_steady_decode_steps_build_as_the_plain_path(seed):
    """The overlap schedule's decode steps (`ahead_of`) take `_build_next` (the last step's arrays, numpy): over
    randomized scheduler runs (forks, copy-on-write, preemption, stops, rows dropped, pages appended, graph padding)
    every step equals the plain build of the same rows, and the fast path does run."""
    from tests.rollout.test_scheduler import _random_run
    rng = random.Random(seed)
    builders: dict = {}
    fast_steps = 0

    def launched(batch, page_size, pages):
        nonlocal fast_steps
        if page_size not in builders:  # the scratch page is the one after the pool's
            builders[page_size] = [StepBuilder(page_size, 512, 512, torch.device("cpu"), pages, steady_min_rows=1)
                                   for _ in range(2)]
        fast, plain = builders[page_size]
        decode = all(r.length == 1 for r in batch.rows)
        pad = len(batch.rows) + rng.choice([0, 0, 3]) if decode and rng.random() < 0.5 else None
        next_ids = torch.arange(len(batch.rows)) + 7 if batch.ahead_of is not None else None
        before = fast._last
        got = fast.build(batch.rows, pad_to=pad, next_ids=next_ids, ahead_of=batch.ahead_of)
        fast_steps += fast._last is not None and fast._last is not before and isinstance(got.pages, RowPages)
        ref = plain.build(batch.rows, pad_to=pad, next_ids=next_ids)
        n = ref.num_tokens + ref.pad_rows
        for a, b in ((got.ids_T, ref.ids_T), (got.pos_T, ref.pos_T), (got.slots_T, ref.slots_T)):
            assert a.shape == b.shape and a.tolist() == b.tolist()
        assert got.sample_T.tolist() == ref.sample_T.tolist() and got.ids_T.numel() == n
        assert (got.qo_indptr, got.kv_lens, got.is_decode, got.graph, got.pad_rows, got.sample_rows_in_order) == (
            ref.qo_indptr, ref.kv_lens, ref.is_decode, ref.graph, ref.pad_rows, ref.sample_rows_in_order)
        assert got.pages == ref.pages and list(got.pages) == [list(p) for p in ref.pages]
        assert table_lists(got.page_table()) == table_lists(ref.page_table())
        for r, row in enumerate(batch.rows):  # the pages a row reads are its sequence's
            assert got.pages[r] == row.seq.pages[:-(-(row.start + row.length) // page_size)]

    _random_run(seed, overlap=True, launched=launched)
    if seed == 0:
        assert fast_steps > 0
