"""Smoke test of the atheris fuzz target, so it keeps working when atheris
is not installed (it is only needed to actually fuzz)."""

from __future__ import annotations

import importlib.util
import pathlib

import msgpack

from tidings.protocol.codec import HEADER

FUZZ = pathlib.Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_decoder.py"


def _load():
    spec = importlib.util.spec_from_file_location("fuzz_decoder", FUZZ)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _framed(v: object) -> bytes:
    b = msgpack.packb(v, use_bin_type=True)
    return HEADER.pack(len(b)) + b


def test_fuzz_target_runs_seeds_without_atheris() -> None:
    mod = _load()
    seeds = [
        b"",
        b"\x00",
        b"\x00" + _framed([2, 1]) + b"\xc1",
        b"\x01" + _framed([67, 1, [["a", b"x", None, None]]]) + _framed([65, 1, {b"k": 1}]),
        b"\x02" + _framed([1, 1, "n", None, {}]) + _framed([10, [[["x"], b"", None, None, 0, None]]]),
        b"\x02\xff\xff\xff\xff",
        b"\xfc" + bytes(range(256)) * 4,
    ]
    for mode in range(3):
        for s in seeds:
            mod.TestOneInput(bytes([mode]) + s[1:] if s else s)
            mod.TestOneInput(s)
