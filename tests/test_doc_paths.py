"""The docs name only files that exist (issue 11, item 7): every repository path
written in README.md, docs/*.md and benchmarks/README.md, such as
`broker/durable/queue.py` or `tests/storage/test_store_contract.py`, is there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path that starts at one of the repository's top-level folders and names a file or folder
PATH = re.compile(r"(?<![\w./-])((?:broker|client|protocol|benchmarks|tests|docs|examples)/[\w./-]*\w)")


def test_every_path_the_docs_name_exists() -> None:
    missing = []
    seen = 0
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in PATH.finditer(line):
                seen += 1
                if not (ROOT / m.group(1)).exists():
                    missing.append(f"{doc.relative_to(ROOT)}:{n}: {m.group(1)}")
    assert seen > 20  # the pattern finds the docs' paths at all
    assert not missing, "docs name files that are not in the repository:\n" + "\n".join(missing)
