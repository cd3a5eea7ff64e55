"""The README and the pages under docs/: every relative link resolves (the file exists and,
for ``page.md#anchor``, the page has a heading with that GitHub slug), and the README stays an
entry page of at most 350 lines. The checker is itself tested on a copy with broken links."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 350

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.DOTALL)
# [text](target) or ![alt](target); the text may run over several lines
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """``text`` without fenced code blocks (their lines are blanked, so line numbers stay)."""
    out, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other than
    ``-`` and ``_`` removed, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings; a repeated slug gets ``-1``, ``-2``, ... as on
    GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in ``page`` outside code blocks and code spans."""
    text = prose(page.read_text(encoding="utf-8"))
    text = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


def broken_links(pages: list[Path]) -> list[str]:
    """One message per relative link of ``pages`` whose file or anchor does not exist."""
    problems = []
    for page in pages:
        for line, target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http(s), mailto...
                continue
            path, _, anchor = target.partition("#")
            where = f"{page.name}:{line}: {target}"
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.name}")
    return problems


def test_every_relative_link_resolves():
    pages = markdown_pages(ROOT)
    assert len(pages) > 5 and all(p.exists() for p in pages)
    assert sum(len(links(p)) for p in pages) > 50  # the links are found at all
    assert broken_links(pages) == []


def too_long(readme: Path) -> str | None:
    """A message when ``readme`` has more than README_MAX_LINES lines."""
    n = len(readme.read_text(encoding="utf-8").splitlines())
    if n <= README_MAX_LINES:
        return None
    return f"{readme.name} has {n} lines (at most {README_MAX_LINES})"


def test_readme_is_an_entry_page():
    assert too_long(ROOT / "README.md") is None


def test_slugs_follow_github():
    assert slug("Scoring files: `specs score`") == "scoring-files-specs-score"
    assert slug("torchrun or Ray?") == "torchrun-or-ray"
    assert slug("Which details are wrong: `specs bench details`") == (
        "which-details-are-wrong-specs-bench-details"
    )
    assert slug("Pre-training at scale on a GPU: the current demo models") == (
        "pre-training-at-scale-on-a-gpu-the-current-demo-models"
    )
    assert slug("snake_case and 2.5x, [a link](x.md)") == "snake_case-and-25x-a-link"


def test_the_checker_finds_broken_links(tmp_path):
    """A copy of the README and docs/ with broken links, and links that only look like
    links (in fences and code spans), must give exactly the broken ones."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    before = set(broken_links(markdown_pages(tmp_path)))  # links to files left out of the copy
    readme = tmp_path / "README.md"
    readme.write_text(
        readme.read_text(encoding="utf-8")
        + "\nSee [a missing page](docs/no-such-page.md) and [a missing\n"
        "heading](docs/models.md#no-such-heading), [this page](#no-such-section),\n"
        "[a good one](docs/models.md#named-models), [the web](https://example.com/x.md).\n"
        "`[in a code span](docs/nowhere.md)`\n"
        "```markdown\n[in a fence](docs/nowhere-either.md)\n```\n",
        encoding="utf-8",
    )
    (tmp_path / "docs" / "extra.md").write_text(
        "# Extra page\n\n## Twice\n\n## Twice\n\n"
        "[ok](#twice-1) [ok](../README.md#license) [bad](#twice-2) [bad](../NOTICE)\n",
        encoding="utf-8",
    )
    problems = [p for p in broken_links(markdown_pages(tmp_path)) if p not in before]
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/no-such-page.md: no such file",
        "docs/models.md#no-such-heading: no heading #no-such-heading in models.md",
        "#no-such-section: no heading #no-such-section in README.md",
        "#twice-2: no heading #twice-2 in extra.md",
        "../NOTICE: no such file",
    ]


def test_the_length_check_can_fail(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("line\n" * README_MAX_LINES, encoding="utf-8")
    assert too_long(readme) is None
    readme.write_text("line\n" * (README_MAX_LINES + 1), encoding="utf-8")
    assert too_long(readme) == f"README.md has {README_MAX_LINES + 1} lines (at most 350)"
