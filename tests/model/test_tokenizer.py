"""Tokenizer files: a damaged one is a ValueError naming the file."""
from __future__ import annotations

import json

import pytest

from mxroll.model.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer, load_tokenizer

GOOD = {"type": "byte", "offset": 3, "bos_token_id": 0, "eos_token_id": 1}


def test_byte_tokenizer_round_trip(tmp_path):
    ByteTokenizer().save(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode("héllo")[1:]) == "héllo" and tok.encode("a")[0] == 0


@pytest.mark.parametrize("text", [
    "{not json", "[1, 2]", json.dumps({k: v for k, v in GOOD.items() if k != "offset"}),
    json.dumps(dict(GOOD, offset="3")), json.dumps(dict(GOOD, offset=-1)), json.dumps(dict(GOOD, type="bpe")),
    json.dumps(dict(GOOD, bos_token_id="<s>")), json.dumps(dict(GOOD, eos_token_id=1.5)),
])
def test_garbage_byte_tokenizer_names_the_file(tmp_path, text):
    (tmp_path / BYTE_TOKENIZER_FILE).write_text(text)
    with pytest.raises(ValueError, match=BYTE_TOKENIZER_FILE):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "{}", json.dumps({"model": {"type": "Nonsense"}})])
def test_garbage_hf_tokenizer_names_the_file(tmp_path, text):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
