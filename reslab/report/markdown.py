"""A small Markdown report: a title, an introduction and a list of sections."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from reslab.train.checkpoint import atomic_write_text


@dataclass
class ReportSection:
    """One section: a ``##`` heading, Markdown body, figures (path relative to the report, caption)."""

    title: str
    body: str
    figures: list[tuple[str, str]] = field(default_factory=list)

    def render(self) -> str:
        parts = [f"## {self.title}", "", self.body.strip(), ""]
        for rel, caption in self.figures:
            parts += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
        return "\n".join(parts)


def render_report(title: str, sections: Sequence[ReportSection], intro: str = "") -> str:
    """The whole report as Markdown text."""
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro.strip(), ""]
    parts += [s.render() for s in sections]
    return "\n".join(parts).rstrip() + "\n"


def write_report(path: str | os.PathLike, title: str, sections: Sequence[ReportSection], intro: str = "") -> Path:
    """Render and write atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_report(title, sections, intro))
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-style Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
