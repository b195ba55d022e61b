"""Describing a config dataclass for `--help`: every key (dotted), its type, its default and the comment
written beside (or just above) the field in the dataclass, which stays the one place a key is documented."""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from functools import cache


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its comment}: the comment that ends the field's line, else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    docs: dict[str, str] = {}
    above: list[str] = []  # comment-only lines since the last statement
    field = None  # the field whose statement is being read
    depth = 0  # INDENT level: fields sit at 1 (the class body)
    line_start = True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if field is not None:
                docs[field] = text  # a trailing comment wins over the lines above
            elif line_start:
                above.append(text)
        elif tok.type == tokenize.NL:
            if line_start and not tok.line.strip():
                above = []  # a blank line ends a comment block (a section heading, not a field's doc)
        elif tok.type == tokenize.NEWLINE:
            field, above, line_start = None, [], True
        elif line_start:
            line_start = False
            if tok.type == tokenize.NAME and depth == 1 and tok.line.lstrip().startswith(f"{tok.string}:"):
                field = tok.string
                if above:
                    docs[field] = " ".join(above)
    return docs


def config_keys(obj, prefix: str = "") -> list[tuple[str, str, object, str]]:
    """(dotted key, type, default, doc) for every leaf of a dataclass instance, nested sections flattened."""
    rows = []
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += config_keys(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, str(f.type), value, docs.get(f.name, "")))
    return rows


def format_config_keys(obj, width: int = 100) -> str:
    """Two lines a key: `key: type = default`, then its description, indented."""
    lines = []
    for key, typ, default, doc in config_keys(obj):
        shown = json.dumps(default) if not isinstance(default, str) else default
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"  {key}: {typ} = {shown}")
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
