"""The Python blocks of README.md and docs/*.md, with the marker that says how each one runs.

A fenced ```python block runs on its own, in a fresh namespace, in one process. An HTML comment
on the last non-blank line before the fence changes that:

- ``<!-- run: continues -->``: run in the namespace the previous block of the same file left
  (the README's recipes continue its quick start);
- ``<!-- run: torchrun 2 -->``: a multi-rank block, run on every rank of the shared process
  group by ``tests/distributed/test_docs_blocks_multirank.py`` (it must work inside an existing
  process group; ``continues`` may be added after a comma);
- ``<!-- skip: reason -->``: not run here, for the reason given (counted by the tests).

``chains`` groups the blocks into runs: a block and the ``continues`` blocks after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*(run|skip):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    path: Path
    line: int          # 1-based line of the opening fence
    code: str
    mode: str          # "single", "torchrun" or "skip"
    continues: bool
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _marker(lines: list[str], fence: int) -> tuple[str, bool, str]:
    i = fence - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    match = MARKER.match(lines[i].strip()) if i >= 0 else None
    if match is None:
        return "single", False, ""
    kind, text = match.groups()
    if kind == "skip":
        if not text:
            raise ValueError(f"skip marker without a reason before line {fence + 1}")
        return "skip", False, text
    words = [w.strip() for w in text.split(",")]
    continues = "continues" in words
    words = [w for w in words if w != "continues"]
    if words == ["torchrun 2"]:
        return "torchrun", continues, ""
    if words == []:
        return "single", continues, ""
    raise ValueError(f"unknown run marker {text!r} before line {fence + 1}")


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        lang, start = match.group(1), i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if lang in ("python", "py"):
            mode, continues, reason = _marker(lines, start)
            found.append(Block(path, start + 1, "\n".join(lines[start + 1:i]) + "\n", mode,
                               continues, reason))
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in blocks(path)]


def chains(mode: str) -> list[list[Block]]:
    """Runs of blocks of ``mode``: each starts a namespace, ``continues`` blocks extend it."""
    runs: list[list[Block]] = []
    for path in doc_files():
        for block in blocks(path):
            if block.mode != mode:
                continue
            if block.continues:
                if not runs or runs[-1][0].path != path:
                    raise ValueError(f"{block.where}: 'continues' without a block before it")
                runs[-1].append(block)
            else:
                runs.append([block])
    return runs


def run_chain(chain: list[Block]) -> dict:
    namespace: dict = {"__name__": "__main__"}
    for block in chain:
        exec(compile(block.code, block.where, "exec"), namespace)
    return namespace
