"""Coverage-guided fuzz target for the protocol decoder (atheris).

Not collected by pytest (the file name does not start with ``test_``); the
protocol suite runs :func:`TestOneInput` on a few seeds so it cannot rot.

Run it from the repository root::

    pip install atheris
    python tests/fuzz/fuzz_decoder.py                 # until a crash or Ctrl-C
    python tests/fuzz/fuzz_decoder.py -runs=200000    # libFuzzer flags work
    python tests/fuzz/fuzz_decoder.py corpus_dir/     # keep a corpus

Each input is fed to a fresh Connection: the first byte picks the role
(server after a valid HELLO, client after a valid WELCOME, or a server
before any HELLO) and the read-chunk size; the rest is the peer's bytes.
The property: next_event() raises RemoteProtocolError and nothing else,
a fatal error leaves the connection CLOSED, and a non-fatal one leaves it
OPEN. Any other exception is a finding.
"""

from __future__ import annotations

import os
import sys

# make `protocol` importable when run as a script from anywhere
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tidings.protocol import CLOSED, NEED_DATA, Connection, RemoteProtocolError, Role, State  # noqa: E402
from tidings.protocol import frames as F  # noqa: E402


def _server_open() -> Connection:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(F.Hello(1, "fuzz", None, {})))
    s.next_event()
    s.send(F.Welcome(1, "fuzz", {}))
    return s


def _client_open() -> Connection:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(F.Hello(1, "fuzz", None, {})))
    s.next_event()
    c.receive_data(s.send(F.Welcome(1, "fuzz", {})))
    c.next_event()
    return c


def _drain(conn: Connection) -> bool:
    """Return False once the connection is closed."""
    while True:
        try:
            ev = conn.next_event()
        except RemoteProtocolError as exc:
            if exc.fatal:
                assert conn.state is State.CLOSED, conn.state
                return False
            continue
        if ev is NEED_DATA:
            return True
        if ev is CLOSED:
            return False
        if conn.state is State.HELLO_RECEIVED:
            conn.send(F.Welcome(1, "fuzz", {}))


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris expects)
    if not data:
        return
    mode, chunk = data[0] % 3, (data[0] >> 2) + 1
    body = data[1:]
    conn = (_server_open, _client_open, lambda: Connection(Role.SERVER))[mode]()
    for i in range(0, len(body), chunk):
        conn.receive_data(body[i:i + chunk])
        if not _drain(conn):
            return
    conn.receive_data(b"")
    _drain(conn)


def main() -> None:
    try:
        import atheris  # only needed when fuzzing
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris")

    atheris.instrument_all()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
