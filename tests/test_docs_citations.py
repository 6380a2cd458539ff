"""The repository stands alone: its code cites only its own docs, and those citations resolve.

Checked for every file under `iosm_cuse/`, `udev/` and `bench/`:
- no file names a document outside the repository: a `shared/` or `reference/` path,
  `DESIGN.md`, or one of the design-time fact sheets (`iosm-protocol.md`, `mbim-host.md`, ...)
  without the `docs/` prefix that makes it this repository's page;
- no comment or docstring cites a bare section (`§2.9`) without naming, on the same line or in
  the same comment block, the document it belongs to;
- every `docs/X.md` named exists, and every `docs/X.md §N.M` is a numbered heading of that file.
The docs themselves must not lean on outside documents either, and their cross-references to each
other must resolve. The section numbers the code relies on are pinned here as well, so that
renumbering a page fails loudly instead of leaving citations pointing at the wrong facts.
"""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCANNED = ("iosm_cuse", "udev", "bench")

# Fact sheets that lived beside the repository while it was designed; only docs/ copies count.
OUTSIDE_SHEETS = ("iosm-protocol", "mbim-host", "libraries", "peers", "kernel-vm",
                  "modemmanager", "uml-virtpci")
OUTSIDE = re.compile(
    r"shared/|reference/|\bDESIGN\.md\b"
    r"|(?<![\w.-])(?<!docs/)(?:" + "|".join(map(re.escape, OUTSIDE_SHEETS)) + r")\.md\b")
# Outside names in a docs/ page: the sheets may be named relative to docs/ there.
OUTSIDE_IN_DOCS = re.compile(r"shared/|reference/|\bDESIGN\.md\b")
# Anything that names a document a section number can belong to.
DOCUMENT = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*[\w.-]+\.md)\b|\bRFC\s?\d+")
DOCS_PAGE = re.compile(r"(?<![\w.-])docs/([\w.-]+\.md)\b")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
DOCS_SECTION = re.compile(r"(?<![\w.-])docs/([\w.-]+\.md)`?\s*§\s?(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s")


@dataclass(frozen=True)
class Block:
    """A comment block or string of a Python file (or a paragraph of any other file)."""

    first_line: int
    lines: tuple[str, ...]


def headings(page: str) -> set[str] | None:
    """The section numbers of docs/`page`; None if there is no such page."""
    path = DOCS / page
    if not path.is_file():
        return None
    return {m.group(1) for line in path.read_text().splitlines()
            if (m := HEADING.match(line))}


def python_blocks(text: str) -> list[Block]:
    """Comments (consecutive comment lines form one block) and strings (docstrings included)."""
    blocks: list[Block] = []
    comment: list[str] = []
    comment_start = comment_end = 0
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return paragraph_blocks(text)
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            if comment and row == comment_end + 1:
                comment.append(tok.string)
            else:
                if comment:
                    blocks.append(Block(comment_start, tuple(comment)))
                comment, comment_start = [tok.string], row
            comment_end = row
        elif tok.type == tokenize.STRING:
            blocks.append(Block(tok.start[0], tuple(tok.string.splitlines())))
    if comment:
        blocks.append(Block(comment_start, tuple(comment)))
    return blocks


def paragraph_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    current: list[str] = []
    start = 1
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            blocks.append(Block(start, tuple(current)))
            current = []
    if current:
        blocks.append(Block(start, tuple(current)))
    return blocks


def owner(block: Block, row: int, col: int) -> str | None:
    """The document a `§` at (row, col) of the block belongs to: the nearest one named before it
    on its line, else after it on its line, else before it in the block, else after it."""
    def named(line: str) -> list[tuple[int, str]]:
        return [(m.start(), m.group(0)) for m in DOCUMENT.finditer(line)]

    line = block.lines[row]
    before = [d for pos, d in named(line) if pos < col]
    after = [d for pos, d in named(line) if pos > col]
    if before:
        return before[-1]
    if after:
        return after[0]
    earlier = [d for text in block.lines[:row] for _, d in named(text)]
    later = [d for text in block.lines[row + 1:] for _, d in named(text)]
    if earlier:
        return earlier[-1]
    return later[0] if later else None


def check_text(name: str, text: str) -> list[str]:
    """Every citation problem of one file of the code (empty list: none)."""
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        for m in OUTSIDE.finditer(line):
            problems.append(f"{name}:{number}: names {m.group(0)!r}, outside the repository")
        for m in DOCS_PAGE.finditer(line):
            if headings(m.group(1)) is None:
                problems.append(f"{name}:{number}: docs/{m.group(1)} does not exist")
    blocks = python_blocks(text) if name.endswith(".py") else paragraph_blocks(text)
    for block in blocks:
        for row, line in enumerate(block.lines):
            where = f"{name}:{block.first_line + row}"
            for m in SECTION.finditer(line):
                doc = owner(block, row, m.start())
                if doc is None:
                    problems.append(f"{where}: bare §{m.group(1)} names no document")
                    continue
                page = DOCS_PAGE.fullmatch(doc)
                if page is None:
                    continue  # an RFC, or a page OUTSIDE already reported
                found = headings(page.group(1))
                if found is not None and m.group(1) not in found:
                    problems.append(f"{where}: {doc} has no section {m.group(1)}")
    return problems


def check_doc(name: str, text: str) -> list[str]:
    """A docs/ page: no outside document, and its `docs/X.md §N` cross-references resolve."""
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        for m in OUTSIDE_IN_DOCS.finditer(line):
            problems.append(f"{name}:{number}: names {m.group(0)!r}, outside the repository")
        for m in DOCS_PAGE.finditer(line):
            if headings(m.group(1)) is None:
                problems.append(f"{name}:{number}: docs/{m.group(1)} does not exist")
        for m in DOCS_SECTION.finditer(line):
            found = headings(m.group(1))
            if found is not None and m.group(2) not in found:
                problems.append(f"{name}:{number}: docs/{m.group(1)} has no section "
                                f"{m.group(2)}")
    return problems


def scanned_files() -> list[Path]:
    files: list[Path] = []
    for top in SCANNED:
        files += [p for p in sorted((ROOT / top).rglob("*"))
                  if p.is_file() and "__pycache__" not in p.parts]
    return files


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return None  # binary: names nothing


# ---- the repository -------------------------------------------------------------------------


def test_code_cites_only_the_repositorys_own_documents() -> None:
    problems: list[str] = []
    files = scanned_files()
    assert any(p.name == "engine.py" for p in files), "the scan found no code"
    for path in files:
        text = read(path)
        if text is not None:
            problems += check_text(str(path.relative_to(ROOT)), text)
    assert not problems, "\n".join(problems)


def test_docs_stand_alone_and_their_cross_references_resolve() -> None:
    pages = sorted(DOCS.glob("*.md"))
    assert pages
    problems = [p for page in pages
                for p in check_doc(str(page.relative_to(ROOT)), page.read_text())]
    assert not problems, "\n".join(problems)


# Sections the code cites; renumbering one of them must update its citations too.
PINNED = {
    "iosm-protocol.md": {"1", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "2", "2.1",
                         "2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8", "2.9", "3", "4",
                         "4.1", "4.2", "4.3", "4.4", "5", "6"},
    "mbim-port.md": {"1", "2", "3", "4", "4.1", "4.2", "5", "5.1", "5.2"},
    "cuse.md": {"1", "2", "3", "4", "5", "6", "7", "8"},
    "tun.md": {"1", "2", "3"},
}


@pytest.mark.parametrize("page", sorted(PINNED))
def test_the_sections_code_cites_keep_their_numbers(page: str) -> None:
    found = headings(page)
    assert found is not None, f"docs/{page} is missing"
    assert PINNED[page] <= found, f"docs/{page} lost sections {sorted(PINNED[page] - found)}"


# ---- the checker itself ---------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    '"""Why (about 1 Gbit/s, shared/reference/libraries.md §5)."""\n',
    "X = 0x10  # BAR0 offset of doorbell 0 (iosm-protocol.md §1.4)\n",
    '"""The design (DESIGN.md §7)."""\n',
    "# see ../reference/notes.txt\n",
    '"""Sizes after include/uapi/linux/fuse.h (see libraries.md §1.4)."""\n',
    "# somewhere/mbim-host.md says so\n",
])
def test_an_outside_document_is_reported(line: str) -> None:
    problems = check_text("x.py", line)
    assert any("outside the repository" in p for p in problems), problems


def test_a_bare_section_is_reported() -> None:
    text = "CMD_TIMEOUT = 1.0  # §2.9 MUX command\n"
    assert check_text("x.py", text) == ["x.py:1: bare §2.9 names no document"]


def test_a_bare_section_is_reported_in_a_docstring_and_a_plain_file() -> None:
    doc = 'def f() -> None:\n    """One interrupt (§1.5): exec stage."""\n'
    assert check_text("x.py", doc) == ["x.py:2: bare §1.5 names no document"]
    assert check_text("rules", "# keep this (§3)\n") == ["rules:1: bare §3 names no document"]


def test_a_missing_section_or_page_is_reported() -> None:
    assert check_text("x.py", "# docs/iosm-protocol.md §9.9\n") == [
        "x.py:1: docs/iosm-protocol.md has no section 9.9"]
    assert check_text("x.py", "# docs/no-such-page.md\n") == [
        "x.py:1: docs/no-such-page.md does not exist"]
    assert check_doc("docs/a.md", "see `docs/cuse.md §42`\n") == [
        "docs/a.md:1: docs/cuse.md has no section 42"]
    assert check_doc("docs/a.md", "see ../shared/DESIGN.md\n") == [
        "docs/a.md:1: names 'shared/', outside the repository",
        "docs/a.md:1: names 'DESIGN.md', outside the repository"]


@pytest.mark.parametrize("text", [
    "X = 0x10  # BAR0 offset of doorbell 0 (docs/iosm-protocol.md §1.4)\n",
    '"""Wire layouts, as data\n(docs/iosm-protocol.md §1-§2, and §4.2/§4.3)."""\n',
    "# The handshake is in docs/iosm-protocol.md; here its\n# step for §1.6 only.\n",
    '"""Multiplying by 256 (RFC 1071 §2(B))."""\n',
    "# udev/README.md and README.md are this repository's\n",
    '"""See `docs/cuse.md §8`."""\n',
])
def test_citations_of_the_repositorys_own_docs_pass(text: str) -> None:
    assert check_text("x.py", text) == []


def test_a_section_belongs_to_the_document_named_nearest_to_it() -> None:
    # The second line's § belongs to docs/cuse.md named on it, not to the page named above.
    text = "# docs/iosm-protocol.md §1.4, and further\n# docs/cuse.md §1.4 too\n"
    assert check_text("x.py", text) == ["x.py:2: docs/cuse.md has no section 1.4"]
