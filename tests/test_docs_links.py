"""Every relative link and image in README.md and docs/*.md resolves.

A link's file must exist (relative to the page, inside the repository); a `#anchor`, alone or after
a Markdown file, must match a heading of the target under GitHub's slug rule: lowercase, punctuation
other than `-` and `_` removed, spaces to `-`, and a repeated heading gets `-1`, `-2`, ... Links in
fenced code blocks and inline code are not links; http(s) and mailto links are not checked.
"""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("**/*.md"))

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose_lines(text):
    """The lines outside fenced code blocks, with inline code replaced by a placeholder."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield CODE_SPAN.sub("code", line)


def slug(heading):
    """GitHub's anchor for a heading's text (before duplicates are numbered)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: Unicode letters, digits and _
    return text.replace(" ", "-")


def anchors(text):
    """All anchors of a Markdown page: its headings' slugs, numbered when repeated, and HTML anchors."""
    found, seen = set(), {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def links(text):
    for line in _prose_lines(text):
        yield from INLINE_LINK.findall(line)
        m = REFERENCE_DEF.match(line)
        if m:
            yield m.group(1)


def broken_links(page, root=ROOT):
    """(target, reason) for every relative link of `page` that does not resolve."""
    problems = []
    text = page.read_text(encoding="utf-8")
    cache = {}
    for target in links(text):
        if not target or EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        if path:
            if root.resolve() not in file.parents and file != root.resolve():
                problems.append((target, "points outside the repository"))
                continue
            if not file.exists():
                problems.append((target, f"no such file: {file.relative_to(root.resolve())}"))
                continue
        if not anchor:
            continue
        if file.suffix.lower() != ".md" or not file.is_file():
            problems.append((target, "an anchor into a file that is not Markdown"))
            continue
        if file not in cache:
            cache[file] = anchors(file.read_text(encoding="utf-8"))
        if unquote(anchor).lower() not in cache[file]:
            problems.append((target, f"no heading with anchor #{anchor} in {file.name}"))
    return problems


def test_there_are_docs_pages():
    assert (ROOT / "docs" / "README.md") in PAGES
    assert len(PAGES) > 2


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_slug_follows_github():
    assert slug("Results on this machine (2 CPU cores, no GPU)") == "results-on-this-machine-2-cpu-cores-no-gpu"
    assert slug("The paper's other settings") == "the-papers-other-settings"
    assert slug("One writer, damaged checkpoints, full disks") == "one-writer-damaged-checkpoints-full-disks"
    assert slug("Weights & Biases and MLflow") == "weights--biases-and-mlflow"
    assert slug("`precision: bf16` and snake_case") == "precision-bf16-and-snake_case"
    assert slug("See [the docs](docs/README.md)") == "see-the-docs"
    assert anchors("# A\n## A\n```\n# A\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Usage\n\n## Usage\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#usage) [ok](other.md#usage-1) [ok](#page) ![ok](../img.png)\n"
        "[ok](https://example.com/missing.md) `[not a link](nowhere.md)`\n"
        "```\n[not a link](nowhere.md)\n```\n"
        "[bad file](missing.md) [bad anchor](other.md#usage-2) [bad local](#nope) ![bad image](img.png)\n"
        "[outside](../../elsewhere.md)\n"
        "[ref]: gone.md\n")
    bad = [target for target, _ in broken_links(page, root=tmp_path)]
    assert bad == ["missing.md", "other.md#usage-2", "#nope", "img.png", "../../elsewhere.md", "gone.md"]
