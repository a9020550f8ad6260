"""Generated parts of hand-written markdown docs: the text between ``<!-- begin KEY -->`` and
``<!-- end KEY -->`` is rewritten, the prose around it kept."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from .._utils import atomic_path


def _span(key: str, body: str) -> str:
    inner = f"{body}\n" if body else ""
    return f"<!-- begin {key} -->\n{inner}<!-- end {key} -->"


def write_sections(doc: str | os.PathLike, sections: Mapping[str, str], title: str = "") -> None:
    """Replace the span of each key in `doc` with its new text, atomically. Spans the doc
    lacks are added at its end; a doc that does not exist yet is made of `title` and them."""
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else (f"# {title}\n" if title else "")
    for key, body in sections.items():
        pattern = re.compile(
            rf"<!-- begin {re.escape(key)} -->.*?<!-- end {re.escape(key)} -->", re.S
        )
        new = _span(key, body)
        if pattern.search(text):
            text = pattern.sub(lambda _, new=new: new, text)  # a function: `new` is no pattern
        else:
            text = f"{text.rstrip()}\n\n{new}\n".lstrip()
    with atomic_path(doc) as tmp:
        tmp.write_text(text)
