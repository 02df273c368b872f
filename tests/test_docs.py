"""The documents hold together: the code cites only what a clone has, and every link resolves.

- No code file cites a document outside the repository or an issue number of a tracker (an
  upstream project's public issue, ``owner/repo#N``, is fine): a comment says what the code does
  and why, and cites the design as "docs/design.md section N".
- Every "docs/design.md section N" cited in code or in a markdown document is a numbered heading
  ("## N. ...") of docs/design.md, whose sections are numbered 1, 2, 3, ... in order.
- Every relative link of the repository's markdown documents resolves to a file inside the
  repository (and an anchor, to a heading of the linked document).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
THIS = Path(__file__).resolve()

SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", "out", "__pycache__"}
GENERATED = ("hybridiff/v1/", "hybridiff/internal/")  # written by the build from proto/
CODE_SUFFIXES = {".py", ".proto", ".sh", ".yaml", ".yml", ".tpl", ".toml", ".cfg"}
CODE_NAMES = {"Dockerfile"}

# A document outside the repository: the design file the project started from (upper-case
# DESIGN, its ".md" or a "section N" of it), or any path that climbs out of the clone to a sibling
# folder. The patterns are spelt in pieces so that this file does not match them itself.
_DESIGN = "DES" + "IGN"
OUTSIDE_DOCUMENT = re.compile(
    _DESIGN + r"\.md|" + _DESIGN + r"\s+(?:section|§)|\.\./shared/|(?<![\w.])shared/" + _DESIGN
)
# An issue or pull-request number: the word issue (or PR, pull request) and a number, or a number
# after a hash, as in a parenthesised hash-number (an upstream "owner/repo" then a hash is fine).
_ISSUE = "iss" + "ues?"
ISSUE_NUMBER = re.compile(
    r"\b" + _ISSUE + r"\s*#?\d+\b|\b(?:PR|pull request)\s*#?\d+\b|(?<![\w&/#])#\d+\b",
    re.IGNORECASE,
)
# "docs/design.md section 4", "docs/design.md sections 5 and 10", wrapped across comment lines too.
DESIGN_CITE = re.compile(
    r"docs/design\.md\s*(?:(?:#|//|\*)\s*)?(?:sections?|§)\s*(\d+(?:(?:\s*,\s*|\s+and\s+)\d+)*)"
)
HEADING = re.compile(r"^##\s+(\d+)\.\s+\S", re.MULTILINE)


def _walk(suffix_ok) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder, name)
            if suffix_ok(path) and not path.relative_to(ROOT).as_posix().startswith(GENERATED):
                found.append(path)
    return found


def _code_files() -> list[Path]:
    return _walk(lambda p: (p.suffix in CODE_SUFFIXES or p.name in CODE_NAMES) and p != THIS)


def _markdown_files() -> list[Path]:
    return _walk(lambda p: p.suffix == ".md")


def _hits(pattern: re.Pattern, paths: list[Path]) -> list[str]:
    hits = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r}")
    return hits


def _design_sections() -> list[int]:
    return [int(n) for n in HEADING.findall(DESIGN.read_text(encoding="utf-8"))]


def test_the_code_cites_no_document_outside_the_repository():
    assert _hits(OUTSIDE_DOCUMENT, _code_files()) == []


def test_the_code_cites_no_issue_number():
    assert _hits(ISSUE_NUMBER, _code_files()) == []


def test_the_markdown_documents_cite_no_design_outside_the_repository():
    assert _hits(OUTSIDE_DOCUMENT, [p for p in _markdown_files() if p.parent.name != "shared"]) == []


def test_the_design_sections_are_numbered_in_order():
    assert _design_sections() == list(range(1, len(_design_sections()) + 1))
    assert len(_design_sections()) >= 5


def test_every_cited_design_section_exists():
    sections = set(_design_sections())
    cited = 0
    missing = []
    for path in _code_files() + _markdown_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in DESIGN_CITE.finditer(text):
            for number in map(int, re.findall(r"\d+", m.group(1))):
                cited += 1
                if number not in sections:
                    missing.append(f"{path.relative_to(ROOT)}: section {number}")
    assert missing == []
    assert cited > 0, "the code cites the design by section; the pattern must find those cites"


def test_every_design_mention_in_code_names_a_section():
    """A cite that wraps oddly or leaves the section out would escape the check above."""
    loose = []
    for path in _code_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        cites = {m.start() for m in DESIGN_CITE.finditer(text)}
        for m in re.finditer(r"docs/design\.md", text):
            if m.start() not in cites:
                line = text.count("\n", 0, m.start()) + 1
                loose.append(f"{path.relative_to(ROOT)}:{line}")
    assert loose == []


# --- links of the markdown documents ------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return LINK.findall(text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def _broken_links(path: Path) -> list[str]:
    broken = []
    for target in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)} -> {target}"
        if not linked.is_relative_to(ROOT):
            broken.append(f"{where} (outside the repository)")
        elif not linked.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{where} (no such heading)")
    return broken


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path):
    assert _broken_links(path) == []


def test_the_readme_links_the_design():
    assert "docs/design.md" in _links(ROOT / "README.md")
