"""Streamed partial outputs built incrementally (rollout.output.format_output(partial=True)): the text and the
output_token_logprobs of each partial equal what a whole rebuild gives, up to a held-back incomplete character."""
from __future__ import annotations

import random

import pytest

from mxroll.model.tokenizer import ByteTokenizer
from mxroll.rollout.output import Record, incremental_text

pytest.importorskip("tokenizers")


def hf_byte_level():
    """A byte-level BPE (GPT-2 / DeepSeek style) without merges: a multi-byte character spans several tokens."""
    from tests.rollout.test_tool_calls import Tok
    return Tok()


def texts(tok, n: int, seed: int) -> list[int]:
    """Token ids of text mixing ASCII, accents, CJK and emoji (2-4 byte characters split across tokens)."""
    rng = random.Random(seed)
    words = ["hello", " world", " é", "ça", " 数据", "模型", " 🚀", "!", "\n", "  ", "naïve"]
    return tok.encode("".join(rng.choice(words) for _ in range(n)))


@pytest.mark.parametrize("make", [hf_byte_level, ByteTokenizer], ids=["hf-byte-level", "byte"])
@pytest.mark.parametrize("every", [1, 3, 7])
def test_incremental_text_is_the_whole_decode_up_to_a_held_back_character(make, every):
    tok = make()
    for seed in range(5):
        ids = texts(tok, 60, seed)
        rec = Record()
        for n in list(range(every, len(ids), every)) + [len(ids)]:
            got, whole = incremental_text(tok, ids[:n], rec), tok.decode(ids[:n])
            if whole.endswith("\ufffd"):  # an incomplete character: held back
                assert whole.startswith(got) and len(got) < len(whole)
            else:
                assert got == whole, (seed, n)
        assert incremental_text(tok, ids, rec) == tok.decode(ids)


def test_incremental_text_starts_over_for_other_tokens():
    tok = ByteTokenizer()
    rec = Record()
    ids = tok.encode("abcdef", add_bos=False)
    assert incremental_text(tok, ids, rec) == "abcdef"
    assert incremental_text(tok, ids[:2], rec) == "ab"  # fewer tokens than decoded: not its stream any more


def test_partial_outputs_equal_whole_rebuilds(engine):
    """A streamed request's partial outputs (text, output_token_logprobs) equal the final output's prefixes."""
    params = {"max_new_tokens": 24, "ignore_eos": True, "temperature": 1.0, "seed": 5, "n": 2}
    parts = list(engine.generate(prompt="stream me", sampling_params=params, return_logprob=True, stream=True))
    by_index: dict[int, list[dict]] = {}
    for p in parts:
        by_index.setdefault(p["index"], []).append(p)
    assert sorted(by_index) == [0, 1]
    tok = engine.tokenizer
    for outs in by_index.values():
        last = outs[-1]
        assert last["meta_info"]["finish_reason"] is not None and len(last["output_ids"]) == 24
        for o in outs:
            n = len(o["output_ids"])
            assert o["output_ids"] == last["output_ids"][:n]
            assert o["meta_info"]["output_token_logprobs"] == last["meta_info"]["output_token_logprobs"][:n]
            whole = tok.decode(o["output_ids"])
            assert whole.startswith(o["text"]) and (o["text"] == whole or whole.endswith("\ufffd"))
