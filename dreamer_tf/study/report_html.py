"""The report's Markdown as one self-contained HTML page: figures embedded as base64 data URIs.

Renders the subset of Markdown that `dreamer_tf.study.report` writes (headings, paragraphs, pipe
tables, bullet lists, images, fenced code, block quotes; inline code, bold, italics and links), so
the report needs no Markdown package and the page opens anywhere, offline, as one file.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

__all__ = ["render"]

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1320px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.7em; border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { font-size: 1.35em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .15em; }
h3 { font-size: 1.1em; margin-top: 1.3em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f4f8; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; font-size: 90%; }
pre { background: #f6f8fa; padding: .6em .9em; overflow-x: auto; border-radius: 4px; }
img { max-width: 100%; border: 1px solid #eee; }
blockquote { margin: .8em 0; padding: .4em 1em; background: #fff8e5; border-left: 4px solid #f0b400; }
.warn { color: #b35900; }
"""

_NUMBER = re.compile(r"^[\s*]*[-+]?\d[\d.,]*( ± [\d.]+)?( \[.*\])?[\s*]*$")


def _inline(text: str) -> str:
    """Escape, then inline code, links, bold and italics."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        part = html.escape(part, quote=False)
        part = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>',
                      part)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", part)
        part = part.replace("⚠", '<span class="warn">⚠</span>')
        out.append(part)
    return "".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def _table(lines: list[str]) -> str:
    header, body = _cells(lines[0]), [_cells(l) for l in lines[2:]]
    rows = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>"]
    for cells in body:
        rows.append("<tr>" + "".join(
            f'<td class="num">{_inline(c)}</td>' if _NUMBER.match(c) else f"<td>{_inline(c)}</td>"
            for c in cells) + "</tr>")
    return "<table>\n<thead>" + rows[0] + "</thead>\n<tbody>\n" + "\n".join(rows[1:]) + "\n</tbody></table>"


def _image(alt: str, src: str, base: Path) -> str:
    path = base / src
    if path.suffix.lower() == ".png" and path.exists():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    return f'<figure><img alt="{html.escape(alt)}" src="{src}"></figure>'


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render(markdown: str, base: str | Path, title: str = "report") -> str:
    """HTML for `markdown`; images are read relative to `base` and embedded."""
    base = Path(base)
    lines = markdown.splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
        elif stripped.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:end])) + "</pre>")
            i = end + 1
        elif m := re.match(r"^(#{1,4})\s+(.*)$", stripped):
            level, text = len(m.group(1)), m.group(2)
            out.append(f'<h{level} id="{_slug(text)}">{_inline(text)}</h{level}>')
            i += 1
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", stripped):
            out.append(_image(m.group(1), m.group(2), base))
            i += 1
        elif stripped.startswith("|"):
            end = i
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            out.append(_table(lines[i:end]))
            i = end
        elif stripped.startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].strip().startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[i].strip()[2:])}</li>")
                i += 1
            out.append("<ul>\n" + "\n".join(items) + "\n</ul>")
        elif stripped.startswith(">"):
            quote = []
            while i < len(lines) and lines[i].strip().startswith(">"):
                quote.append(lines[i].strip()[1:].strip())
                i += 1
            out.append(f"<blockquote>{_inline(' '.join(quote))}</blockquote>")
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||!\[|```|- |\* |>)", lines[i].strip()):
                paragraph.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(out) + "\n</body>\n</html>\n")
