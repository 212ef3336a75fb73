"""What security costs: pub/sub 1 -> 1 throughput with no auth, with
authentication + permissions, and with authentication + permissions + TLS,
in the same run, reported as ratios to the first.

    python -m benchmarks.secure [--messages N] [--payload BYTES] [--rounds R]

Three brokers are started side by side (same machine, same moment), and the
scenario of benchmarks/pubsub.py (one publisher process, one subscriber
process, awaited publishes, 128-byte payloads) runs against each in turn,
``--rounds`` times interleaved and in rotating order (after one uncounted
warm-up each) so that drift in the host's load hits all three alike; the median of each is
reported, with the broker's own CPU time per delivered message (from
/proc; steadier than throughput on a busy host). The secured brokers' user has
realistic permission lists (several allow patterns and a deny pattern per
action), so every published message goes through a real (cached) check.
The TLS certificate is made with the openssl CLI (ECDSA P-256).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

from ._common import broker_process, emit
from .pubsub import run_scenario

USER = "bench"
PASSWORD = "bench-password-not-secret"
PERMISSIONS = {
    "publish": ["bench.>", "orders.>", "billing.*.created", "_INBOX.>"],
    "publish_deny": ["bench.secret.>", "orders.internal.>"],
    "subscribe": ["bench.>", "orders.>", "_INBOX.>"],
    "subscribe_deny": ["bench.secret.>"],
    "admin": [">"],
}


def _toml_list(v: list[str]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in v) + "]"


def write_config(d: str, tls: bool) -> str:
    from tidings.broker.security.auth import hash_password

    lines = [f"[users.{USER}]", f'password = "{hash_password(PASSWORD)}"', f"[users.{USER}.permissions]"]
    lines += [f"{k} = {_toml_list(v)}" for k, v in PERMISSIONS.items()]
    if tls:
        lines += ["[tls]", f'cert = "{d}/cert.pem"', f'key = "{d}/key.pem"']
    path = os.path.join(d, f"tidings{'-tls' if tls else ''}.toml")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def make_cert(d: str) -> None:
    if shutil.which("openssl") is None:
        raise SystemExit("benchmarks.secure needs the openssl command to make a throwaway certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-addext", "basicConstraints=critical,CA:TRUE"],
                   check=True, capture_output=True, timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def brokers() -> Iterator[list[tuple[str, Any, list[str]]]]:
    """Yield (label, running broker, worker args) for the three setups."""
    with tempfile.TemporaryDirectory(prefix="tidings-secure-") as d, contextlib.ExitStack() as stack:
        make_cert(d)
        creds = ["--user", USER, "--password", PASSWORD]
        plain = stack.enter_context(broker_process())
        auth = stack.enter_context(broker_process("--config", write_config(d, tls=False)))
        tls = stack.enter_context(broker_process("--config", write_config(d, tls=True)))
        yield [("no auth", plain, []),
               ("auth+permissions", auth, creds),
               ("auth+permissions+TLS", tls, [*creds, "--ca-file", f"{d}/cert.pem"])]


def measure(b: Any, label: str, messages: int, payload: int, args: list[str]) -> dict[str, Any]:
    """One pub/sub run; the broker's CPU is counted from the publisher's start to the last
    subscriber's report, so logins (scrypt, tens of ms) and TLS handshakes are not in it."""
    url = b.url.replace("tidings://", "tidings+tls://") if "TLS" in label else b.url
    cpu: list[float] = []
    row = run_scenario(url, 1, messages, payload, args, on_go=lambda: cpu.append(cpu_seconds(b.pid)),
                       on_done=lambda: cpu.append(cpu_seconds(b.pid)))
    row["broker_cpu_us"] = (cpu[1] - cpu[0]) / max(1, row["delivered"]) * 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=300_000)
    ap.add_argument("--payload", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    with brokers() as setups:
        for label, b, args in setups:  # warm-up (imports, caches, TLS session setup): not counted
            measure(b, label, max(1000, ns.messages // 10), ns.payload, args)
        for r in range(ns.rounds):
            for label, b, args in setups[r % 3:] + setups[:r % 3]:  # rotated: no setup always goes first
                runs.setdefault(label, []).append(measure(b, label, ns.messages, ns.payload, args))
    rows = []
    base = statistics.median(r["delivered_per_s"] for r in runs["no auth"])
    base_cpu = statistics.median(r["broker_cpu_us"] for r in runs["no auth"])
    for label, rs in runs.items():
        rate = statistics.median(r["delivered_per_s"] for r in rs)
        cpu = statistics.median(r["broker_cpu_us"] for r in rs)
        rows.append({"setup": label, "delivered_per_s": round(rate), "ratio": round(rate / base, 3),
                     "broker_cpu_us_per_msg": round(cpu, 2), "cpu_ratio": round(cpu / base_cpu, 3),
                     "runs": ", ".join(f"{r['delivered_per_s']:,}" for r in rs),
                     "dropped": sum(r["dropped"] for r in rs)})
    emit(rows, ["setup", "delivered_per_s", "ratio", "broker_cpu_us_per_msg", "cpu_ratio", "runs", "dropped"])


if __name__ == "__main__":
    main()
