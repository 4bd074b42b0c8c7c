"""The documentation's links: every relative link in README.md and docs/*.md names a file that
exists, and an anchor (`file.md#section`) a heading of that file; README.md stays short."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
README_LIMIT = 10_000  # bytes: the two commands, what it converts, the main uses; the rest in docs/
# `[text](target)`, the target up to a space or `)`; a code span's brackets are not links
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to `-`."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+\s+(.*)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _broken(page: Path) -> list[str]:
    broken = []
    for link in _links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{page.name}: {link} (no such file)")
        elif anchor and (target.suffix != ".md" or anchor not in _anchors(target)):
            broken.append(f"{page.name}: {link} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert _broken(page) == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    """The check above on a page made to fail it: a missing file, a missing heading, while an
    existing file, its heading, a URL and a link inside a code block pass."""
    (tmp_path / "other.md").write_text("# Other page\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[a](other.md) [b](other.md#a-section) [c](https://example.org/x) [d](gone.md) "
        "[e](other.md#nowhere)\n```\n[f](also-gone.md)\n```\n"
    )
    assert _broken(page) == [
        "page.md: gone.md (no such file)",
        "page.md: other.md#nowhere (no such heading)",
    ]


def test_the_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, (
        f"README.md is {size} bytes, over {README_LIMIT}: move detail to docs/"
    )
