"""Documents for people, from templates (`evaluation.templates`): `render` fills a Markdown template, and
`markdown_to_html` turns that Markdown into one self-contained HTML file (images inlined as data URIs), so
``report.md`` and ``report.html`` say exactly the same thing.

The HTML side reads the small Markdown subset the templates write: headings, one-line paragraphs (the first one
is the lead), pipe tables, an image line followed by its ``*caption*`` line, fenced code, and inline ``**bold**``
and ```code```.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import jinja2

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:3px 9px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px}.lead{font-size:1.1em}"""


def fmt(value, digits: int = 4, signed: bool = False) -> str:
    """A table cell: fixed decimals ("–" for a missing value)."""
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def _num(value, digits: int = 4) -> str:
    """A model card's number: fixed decimals ("—" for a missing value)."""
    return "—" if value is None else f"{value:.{digits}f}"


_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined,  # a missing value is an error, not an empty cell
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,  # Markdown, not HTML: markdown_to_html escapes
)
_ENV.filters.update(fmt=fmt, num=_num)


def render(template: str, **context: Any) -> str:
    """``template`` (Jinja2 source) filled with ``context``."""
    return _ENV.from_string(template).render(**context)


def markdown_to_html(markdown: str, root: Path) -> str:
    """The Markdown a template rendered, as one HTML file; image paths are relative to ``root``."""
    e = html.escape
    lines = markdown.split("\n")
    out: list[str] = []
    lead, i = True, 0
    while i < len(lines):
        line = lines[i]
        if not line:
            i += 1
        elif line.startswith("```"):
            end = lines.index("```", i + 1)
            out.append("<pre>" + e("\n".join(lines[i + 1 : end]) + "\n") + "</pre>")
            i = end + 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            title = e(line[level + 1 :])
            if level == 1:
                out += [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title>"]
                out += [f"<style>{_CSS}</style></head><body>"]
            out.append(f"<h{level}>{title}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i][2:-2].split(" | "))
                i += 1
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in rows[0]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows[2:]]
            out.append("</table>")
        elif line.startswith("!["):
            caption, path = line[2:].split("](", 1)
            data = base64.b64encode((root / path[:-1]).read_bytes()).decode()
            out.append(
                f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
            i += 2  # the image and its caption line
        else:
            out.append(('<p class="lead">' if lead else "<p>") + _inline(line) + "</p>")
            lead, i = False, i + 1
    out.append("</body></html>")
    return "\n".join(out)


def _inline(s: str) -> str:
    """Escape, then the two bits of Markdown the report uses inline: **bold** and `code`."""
    s = html.escape(s)
    parts = s.split("**")
    s = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
