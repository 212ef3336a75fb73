"""docs/PATTERNS.md stays true: every ```python block runs as pasted against a
real broker and ends on its own (issue 12, item 6).

The runner is docs/CLIENT.md's (tests/integration/test_docs_examples.py):
each block is written to a file and run in a subprocess outside the
repository, with the documented URL ``tidings://127.0.0.1:7421`` rewritten to
the test broker's. Each block runs on a fresh broker, then all of them run
twice in a row on one broker: the page promises that each can be run again.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from test_docs_examples import BLOCK, run_example

DOC = Path(__file__).resolve().parents[2] / "docs" / "PATTERNS.md"
PATTERNS = ["Pub/sub", "Event streaming", "Event sourcing", "CQRS", "Saga", "Schema evolution", "Batching",
            "Retries with backoff", "Dead-letter queue: inspect and redrive", "Circuit breaker", "Ordering",
            "Event bus with rule-based routing"]


def python_blocks() -> list[tuple[str, int, str]]:
    """(section, line number, code) of every ```python block of the page."""
    text = DOC.read_text(encoding="utf-8")
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.+)$", text, re.MULTILINE)]
    out = []
    for m in BLOCK.finditer(text):
        section = [h for pos, h in heads if pos < m.start()][-1]
        out.append((section, text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


BLOCKS = python_blocks()


def test_every_pattern_has_its_section() -> None:
    heads = re.findall(r"^## (.+)$", DOC.read_text(encoding="utf-8"), re.MULTILINE)
    assert heads[:len(PATTERNS) - 1] == PATTERNS[:-1]
    assert "Event bus with rule-based routing" in heads  # written with the content filters
    with_code = {section for section, _n, _c in BLOCKS}
    # the saga is examples/saga.py (tests/integration/test_saga.py); every other pattern shows its code here
    assert with_code >= set(PATTERNS[:-1]) - {"Saga"}


@pytest.mark.parametrize("section,line,code", BLOCKS, ids=[f"line{n}" for _s, n, _c in BLOCKS])
async def test_pattern_runs_as_pasted(start_broker: Any, tmp_path: Path, section: str, line: int, code: str) -> None:
    b = start_broker()
    out = await run_example(code, b.url, tmp_path, f"pattern_line{line}")
    assert out.strip(), f"{section}: every example prints what it did"


async def test_patterns_run_in_a_row_and_again(start_broker: Any, tmp_path: Path) -> None:
    """One broker, every pattern in page order, twice: they do not depend on
    a fresh broker, on each other, or on running only once."""
    b = start_broker()
    for round_ in (1, 2):
        for _section, line, code in BLOCKS:
            await run_example(code, b.url, tmp_path, f"round{round_}_line{line}")
