"""README.ru.md mirrors README.md section for section: the same headings (count and level, in
order) and, in each section, the same code blocks, character for character."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCED = re.compile(r"^```[^\n]*\n.*?^```$", flags=re.S | re.M)


def sections(path: Path) -> list[tuple[str, list[str]]]:
    """(heading level, the code blocks under it) for each heading, in order."""
    text = path.read_text(encoding="utf-8")
    # Headings inside code blocks (shell comments) are not headings.
    spans = [m.span() for m in FENCED.finditer(text)]
    out: list[tuple[str, list[str]]] = []
    for match in re.finditer(r"^(#{1,6}) .*$", text, flags=re.M):
        if any(a <= match.start() < b for a, b in spans):
            continue
        out.append((match.group(1), []))
    heads = [m for m in re.finditer(r"^(#{1,6}) .*$", text, flags=re.M)
             if not any(a <= m.start() < b for a, b in spans)]
    for block in FENCED.finditer(text):
        index = sum(h.start() < block.start() for h in heads) - 1
        out[index][1].append(block.group(0))
    return out


def test_same_heading_structure():
    en, ru = sections(ROOT / "README.md"), sections(ROOT / "README.ru.md")
    assert [level for level, _ in en] == [level for level, _ in ru]


def test_same_code_blocks_in_each_section():
    en, ru = sections(ROOT / "README.md"), sections(ROOT / "README.ru.md")
    assert sum(len(blocks) for _, blocks in en) >= 5
    for i, ((_, en_blocks), (_, ru_blocks)) in enumerate(zip(en, ru)):
        assert en_blocks == ru_blocks, f"section {i}: code blocks differ"


def test_each_links_to_the_other():
    assert "README.ru.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(README.md)" in (ROOT / "README.ru.md").read_text(encoding="utf-8")
