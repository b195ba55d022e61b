"""Tokenizers: a byte-level one for the built-in tiny model, or the checkpoint's HF tokenizer.json."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger(__name__)

BYTE_TOKENIZER_FILE = "mxroll_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes shifted by `offset`; ids below the offset are special tokens (bos, eos, pad)."""

    def __init__(self, offset: int = 3, bos_token_id: int | None = 0, eos_token_id: int | None = 1):
        self.offset, self.bos_token_id, self.eos_token_id = offset, bos_token_id, eos_token_id
        self.vocab_size = offset + 256

    @classmethod
    def for_config(cls, cfg) -> "ByteTokenizer":
        eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
        specials = [t for t in (cfg.bos_token_id, eos) if t is not None]
        offset = max(specials, default=-1) + 2  # leave room for a pad id
        if offset + 256 > cfg.vocab_size:
            raise ValueError(f"vocab_size {cfg.vocab_size} too small for a byte tokenizer with offset {offset}")
        return cls(offset, cfg.bos_token_id, eos)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Special tokens have no text here: skipped either way."""
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        """The id of a token spelled `text` (None: none)."""
        return None

    def save(self, directory: str | Path) -> None:
        Path(directory, BYTE_TOKENIZER_FILE).write_text(json.dumps(
            {"type": "byte", "offset": self.offset, "bos_token_id": self.bos_token_id,
             "eos_token_id": self.eos_token_id}) + "\n")


def byte_level_bpe(specials=()) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` without merges: the `specials` (special tokens) take ids 0.., then the
    256 byte symbols. For building small checkpoints with a real tokenizer.json (`.save(path)`); needs `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return tok


class HFTokenizer:
    """A checkpoint's tokenizer.json through the `tokenizers` library (no hub access), or a `tokenizers.Tokenizer`
    already built (`HFTokenizer.of`)."""

    def __init__(self, path: Path, bos_token_id: int | None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"{path} needs the `tokenizers` package: pip install 'mxroll[tokenizers]'") from e
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise ValueError(f"{path}: not a tokenizer file the `tokenizers` library can read ({e})") from None
        self.bos_token_id = bos_token_id

    @classmethod
    def of(cls, tok: tokenizers.Tokenizer, bos_token_id: int | None = None) -> "HFTokenizer":
        self = cls.__new__(cls)
        self._tok, self.bos_token_id = tok, bos_token_id
        return self

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """add_bos=False for text that spells its own special tokens (a rendered chat template)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        """The id of a token spelled `text` (special tokens included; None: none)."""
        return self._tok.token_to_id(text)


def load_tokenizer(directory: str | Path, bos_token_id: int | None = None):
    """The checkpoint's tokenizer, or None (then only input_ids prompts work)."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory / "tokenizer.json", bos_token_id)
    path = directory / BYTE_TOKENIZER_FILE
    if path.is_file():
        return _byte_tokenizer(path)
    log.info("no tokenizer in %s: text prompts are unavailable, pass input_ids", directory)
    return None


def read_json_object(path: Path) -> dict:
    """A JSON object file (tokenizer side files); anything else is a ValueError naming the file."""
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(spec).__name__}")
    return spec


def _byte_tokenizer(path: Path) -> ByteTokenizer:
    spec = read_json_object(path)
    if spec.get("type") != "byte":
        raise ValueError(f"{path}: unknown tokenizer type {spec.get('type')!r}")
    offset = spec.get("offset")
    if not _token_id(offset):
        raise ValueError(f"{path}: 'offset' must be an integer >= 0, got {offset!r}")
    for key in ("bos_token_id", "eos_token_id"):
        if spec.get(key) is not None and not _token_id(spec[key]):
            raise ValueError(f"{path}: {key!r} must be a token id (integer >= 0) or null, got {spec[key]!r}")
    return ByteTokenizer(offset, spec.get("bos_token_id"), spec.get("eos_token_id"))


def _token_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
