"""A report as a list of blocks, rendered to Markdown (images linked) and to one self-contained HTML file
(images inlined as data URIs), so both say exactly the same thing."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:3px 9px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px}.lead{font-size:1.1em}"""


@dataclass
class Block:
    kind: str  # heading | text | table | image | code
    body: Any  # str, (header, rows) for a table, a Path for an image
    level: int = 2
    caption: str = ""


def heading(text: str, level: int = 2) -> Block:
    return Block("heading", text, level)


def text(body: str, lead: bool = False) -> Block:
    return Block("text", body, caption="lead" if lead else "")


def table(header: list[str], rows: list[list]) -> Block:
    return Block("table", (header, rows))


def image(path: str | Path, caption: str) -> Block:
    return Block("image", Path(path), caption=caption)


def code(body: str, lang: str = "") -> Block:
    return Block("code", body, caption=lang)


def fmt(value, digits: int = 4, signed: bool = False) -> str:
    """A table cell: fixed decimals ("–" for a missing value)."""
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def to_markdown(title: str, blocks: list[Block], root: Path) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "heading":
            out += ["#" * b.level + " " + b.body, ""]
        elif b.kind == "text":
            out += [b.body, ""]
        elif b.kind == "table":
            header, rows = b.body
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            out.append("")
        elif b.kind == "image":
            rel = Path(b.body).relative_to(root).as_posix()
            out += [f"![{b.caption}]({rel})", f"*{b.caption}*", ""]
        elif b.kind == "code":
            out += [f"```{b.caption}", b.body.rstrip("\n"), "```", ""]
    return "\n".join(out)


def to_html(title: str, blocks: list[Block]) -> str:
    e = html.escape
    out = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for b in blocks:
        if b.kind == "heading":
            out.append(f"<h{b.level}>{e(b.body)}</h{b.level}>")
        elif b.kind == "text":
            cls = ' class="lead"' if b.caption == "lead" else ""
            out.append(f"<p{cls}>{_inline(b.body)}</p>")
        elif b.kind == "table":
            header, rows = b.body
            out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</table>")
        elif b.kind == "image":
            data = base64.b64encode(Path(b.body).read_bytes()).decode()
            out.append(
                f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(b.caption)}</figcaption></figure>"
            )
        elif b.kind == "code":
            out.append(f"<pre>{e(b.body)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def _inline(s: str) -> str:
    """Escape, then the two bits of Markdown the report uses inline: **bold** and `code`."""
    s = html.escape(s)
    parts = s.split("**")
    s = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
