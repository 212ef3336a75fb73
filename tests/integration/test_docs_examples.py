"""docs/CLIENT.md stays true: every ```python block runs as pasted against a
real broker and ends on its own, and its generated tables match the code.

Each example is written to a file and run in a subprocess (outside the
repository, as a user would) with the documented default URL
``tidings://127.0.0.1:7421`` rewritten to the test broker's. Every example
runs on a fresh broker, then all of them run twice in a row on one broker:
the guide promises that each can be run again.

The tables between ``<!-- ...:start -->`` / ``<!-- ...:end -->`` markers are
generated; print them with
``PYTHONPATH=. python tests/integration/test_docs_examples.py``.
"""

from __future__ import annotations

import builtins
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "CLIENT.md"
DEFAULT_URL = "tidings://127.0.0.1:7421"
EXAMPLE_TIMEOUT = 45.0
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block in the guide."""
    text = DOC.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


BLOCKS = python_blocks()


async def run_example(code: str, url: str, workdir: Path, name: str) -> str:
    assert DEFAULT_URL in code, "every example connects to the documented default URL"
    path = workdir / f"{name}.py"
    path.write_text(code.replace(DEFAULT_URL, url), encoding="utf-8")
    with anyio.fail_after(EXAMPLE_TIMEOUT):  # examples must end on their own
        r = await anyio.run_process([sys.executable, str(path)], cwd=workdir, check=False)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, f"{name} failed ({r.returncode}):\n{out}\n{err}"
    assert "Traceback" not in err, err
    return out


def test_the_guide_has_examples() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
async def test_example_runs_as_pasted(start_broker: Any, tmp_path: Path, line: int, code: str) -> None:
    b = start_broker()
    out = await run_example(code, b.url, tmp_path, f"example_line{line}")
    assert out.strip(), "every example prints what it did"


async def test_examples_run_in_a_row_and_again(start_broker: Any, tmp_path: Path) -> None:
    """One broker, every example in document order, twice: they do not
    depend on a fresh broker, on each other, or on running only once."""
    b = start_broker()
    for round_ in (1, 2):
        for line, code in BLOCKS:
            await run_example(code, b.url, tmp_path, f"round{round_}_line{line}")


# ------------------------------------------------------------ generated tables


def _section(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
    assert start in text and end in text, name
    return text[text.index(start) + len(start):text.index(end)]


def client_error_table() -> str:
    """Every class of client/errors.py, in definition order, with the wire
    codes that map to it through BY_CODE / for_code."""
    from tidings.client import errors
    from tidings.protocol.errors import REGISTRY

    classes = [c for c in vars(errors).values()
               if inspect.isclass(c) and issubclass(c, errors.TidingsError) and c.__module__ == errors.__name__]
    classes.sort(key=lambda c: inspect.getsourcelines(c)[1])
    codes: dict[type, list[tuple[int, bool]]] = {}
    for code in sorted(REGISTRY):
        exc = errors.for_code(code, "")
        codes.setdefault(type(exc), []).append((code, exc.retriable))
    rows = ["| Exception | Base | Retriable | Wire codes | Meaning |", "| --- | --- | --- | --- | --- |"]
    for cls in classes:
        bases = ", ".join("`builtins.TimeoutError`" if b is builtins.TimeoutError else f"`{b.__name__}`"
                          for b in cls.__bases__)
        mine = codes.get(cls, [])
        if len({r for _, r in mine}) > 1:
            retriable = "per code"
            wire = ", ".join(f"{c} ({'yes' if r else 'no'})" for c, r in mine)
        else:
            retriable = "yes" if cls.retriable else "no"
            wire = ", ".join(str(c) for c, _ in mine)
        doc = " ".join((cls.__doc__ or "").split())
        if cls is errors.TidingsError:
            doc = doc.split(". ")[0] + "."  # the rest explains the attributes, described above the table
        rows.append(f"| `{cls.__name__}` | {bases} | {retriable} | {wire} | {doc} |")
    return "\n".join(rows)


def test_error_table_matches_client_errors() -> None:
    assert _section("client-error-table") == client_error_table(), \
        "regenerate the table: see this module's docstring"


def test_every_server_code_maps_to_a_retriable_flag_like_the_registry() -> None:
    from tidings.client import errors
    from tidings.protocol.errors import REGISTRY

    for code, info in REGISTRY.items():
        exc = errors.for_code(code, "x")
        assert isinstance(exc, errors.TidingsError)
        if code in errors.BY_CODE:
            assert type(exc) is errors.BY_CODE[code] and exc.code == code
        assert exc.retriable == info.retriable or code in (1, 2, 3, 4, 8), (code, type(exc), info)


def options_defaults() -> dict[str, str]:
    """What the options table says each connect() option defaults to."""
    out = {}
    for row in _section("options-table").splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`(\w+)`", cells[0]):
            out[name] = cells[1].strip("`")
    return out


def test_options_table_matches_the_client_signature() -> None:
    from tidings.client import Client

    params = {n: p for n, p in inspect.signature(Client.__init__).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
    documented = options_defaults()
    assert set(documented) == set(params), "document every option of Client (and only those)"
    for name, p in params.items():
        assert documented[name] == repr(p.default), f"{name}: the guide says {documented[name]}, code {p.default!r}"


if __name__ == "__main__":
    print(client_error_table())
