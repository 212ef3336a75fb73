"""README.md stays true: its Python examples run as pasted against a real
broker (the documented default URL rewritten to the test broker's), and
its quickstart commands are the ones CI runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
async def test_readme_example_runs(start_broker: Any, tmp_path: Path, index: int) -> None:
    b = start_broker()
    code = BLOCKS[index]
    assert "tidings://127.0.0.1:7421" in code
    path = tmp_path / f"readme_{index}.py"
    path.write_text(code.replace("tidings://127.0.0.1:7421", b.url), encoding="utf-8")
    with anyio.fail_after(45):
        r = await anyio.run_process([sys.executable, str(path)], cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout, "the example prints what it did"


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"^    (python3 -m venv .*pytest.*)$", README, re.MULTILINE)
    assert len(commands) == 1
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[0] in ci
