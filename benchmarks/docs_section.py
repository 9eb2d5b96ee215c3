"""Replace one marked section of a docs page, so each benchmark rewrites only its own figures
(the figure scripts in ``benchmarks/`` and ``benchmarks.finetune_grid``)."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, body: str, *, title: str = "# Performance") -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``
    (appended when the markers are absent; the page is created with ``title`` if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else f"{title}\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
