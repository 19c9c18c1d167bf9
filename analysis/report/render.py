"""One document, two renderings: Markdown (figures as relative links) and a self-contained
HTML page (figures embedded as base64 PNG data URIs), from the same list of blocks.

Inline text may use ``code`` and **bold**; everything else is escaped for HTML.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    """A section heading (level 1-3)."""

    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of inline text."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of inline-text items."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    """A PNG figure with a title and caption; ``path`` is the file on disk."""

    path: Path
    title: str
    caption: str


Block = Heading | Paragraph | Bullets | Table | Image
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;line-height:1.45;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left}
th{background:#f3f3f3}
figure{margin:1.5em 0}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.9em;color:#555}
code{background:#f5f5f5;padding:0 0.2em}
.verdict-Supported{color:#17692f;font-weight:bold}
.verdict-Not-supported{color:#a11;font-weight:bold}
.verdict-Not-enough-data{color:#8a6d00;font-weight:bold}
"""


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], relative_to: Path) -> str:
    """GitHub-flavoured Markdown; images link to their files relative to ``relative_to``."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |"]
            lines.append("|" + "---|" * len(b.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            rel = b.path.relative_to(relative_to).as_posix()
            out.append(f"![{b.title}]({rel})\n\n*{b.title}.* {b.caption}")
    return "\n\n".join(out) + "\n"


def inline_html(text: str) -> str:
    """Escape text, then turn ``code`` and **bold** into tags; verdicts get a colour class."""
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(
        r"\*\*(Supported|Not supported|Not enough data)\*\*",
        lambda m: f'<span class="verdict-{m.group(1).replace(" ", "-")}">{m.group(1)}</span>',
        s,
    )
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def data_uri(path: Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: list[Block], title: str) -> str:
    """A self-contained HTML page: inline CSS, every figure embedded."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            items = "".join(f"<li>{inline_html(i)}</li>" for i in b.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{inline_html(h)}</th>" for h in b.header)
            rows = "".join(
                "<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>"
                for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            body.append(
                f'<figure><img src="{data_uri(b.path)}" alt="{html.escape(b.title)}">'
                f"<figcaption><strong>{html.escape(b.title)}.</strong> "
                f"{inline_html(b.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
