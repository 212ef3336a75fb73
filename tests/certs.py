"""Throwaway certificates for the TLS and security tests, made with the openssl CLI.

The session-scoped ``certs`` fixture (a plugin of tests/conftest.py, so
tests/broker and tests/integration share it) skips with a reason when the
openssl command is missing."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certs:
    dir: Path
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verification against it must fail
    rogue_client: Path  # a client certificate signed by other_ca
    rogue_client_key: Path


def _run(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _ca(cwd: Path, name: str) -> None:
    _run(cwd, "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
         "-subj", f"/CN=tidings test {name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _leaf(cwd: Path, name: str, ca: str, cn: str, ext: str, serial: int) -> None:
    (cwd / f"{name}.ext").write_text(
        f"{ext}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _run(cwd, "req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    _run(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
         "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed: it is needed to generate throwaway test certificates")
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "other_ca")
    _leaf(d, "server", "ca", "localhost",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth", 2)
    _leaf(d, "client", "ca", "alice", "extendedKeyUsage=clientAuth", 3)
    _leaf(d, "rogue", "other_ca", "mallory", "extendedKeyUsage=clientAuth", 4)
    return Certs(d, d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key", d / "client.pem",
                 d / "client.key", d / "other_ca.pem", d / "rogue.pem", d / "rogue.key")
