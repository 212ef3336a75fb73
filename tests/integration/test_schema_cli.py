"""`tidings schemas` (client/cli/schemas.py) as an operator runs it, against a real broker."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_stream_cli import rows, tidings

V1 = {"type": "object", "required": ["id"], "additionalProperties": False,
      "properties": {"id": {"type": "string"}, "amount": {"type": "number"}}}
V2 = {**V1, "properties": {**V1["properties"], "note": {"type": "string"}}}
BROKEN = {**V1, "properties": {**V1["properties"], "amount": {"type": "string"}}}


async def test_register_check_show_bind_and_list(broker, tmp_path: Path) -> None:
    url = broker.url
    files = {}
    for name, doc in (("v1", V1), ("v2", V2), ("broken", BROKEN)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(doc))
    assert (await tidings("schemas", url=url)).stdout.strip() == "no schemas"
    r = await tidings("schemas", "register", "Order", str(files["v1"]), "--compatibility", "backward", url=url)
    assert r.stdout.strip() == "Order version 1"
    r = await tidings("schemas", "check", "Order", str(files["broken"]), url=url, check=False)
    assert r.returncode == 1
    assert "backward: /properties/amount: type changed from number to string" in r.stdout
    r = await tidings("schemas", "check", "Order", str(files["v2"]), url=url)
    assert "compatible (backward): it would be Order version 2" in r.stdout
    r = await tidings("schemas", "register", "Order", str(files["broken"]), url=url, check=False)
    assert r.returncode != 0 and "type changed from number to string" in r.stderr
    await tidings("schemas", "register", "Order", str(files["v2"]), url=url)
    r = await tidings("schemas", "show", "Order", "--version", "1", "--json", url=url)
    assert json.loads(r.stdout)["schema"] == V1
    await tidings("schemas", "bind", "orders.placed", "Order", url=url)
    r = await tidings("schemas", "bindings", url=url)
    assert rows(r.stdout, "PATTERN") == [["orders.placed", "Order", "reject", "-"]]
    r = await tidings("schemas", "ls", url=url)
    assert rows(r.stdout, "SCHEMA") == [["Order", "2", "backward", "orders.placed", "0", "0", "0"]]
    r = await tidings("pub", "orders.placed", '{"id": 1}', "-H", "content-type=application/json", url=url)
    assert r.returncode == 0  # fire and forget: refused by the broker, counted
    r = await tidings("schemas", "ls", "--json", url=url)
    assert json.loads(r.stdout)[0]["invalid"] == 1
    await tidings("schemas", "unbind", "orders.placed", url=url)
    assert (await tidings("schemas", "bindings", url=url)).stdout.strip() == "no schema bindings"
