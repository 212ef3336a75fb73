"""The client's broker URLs (client/client/client.py parse_urls): one broker or several
of one service, IPv6 in brackets, credentials before the host list; a bad URL is one
ValueError naming the bad part, never the password."""

from __future__ import annotations

import pytest

from tidings.client import Client
from tidings.client.client import URL_FORM, BrokerURL, parse_url, parse_urls


@pytest.mark.parametrize("url, addresses, tls", [
    ("tidings://h:1", (("h", 1),), False),
    ("h:1", (("h", 1),), False),  # no scheme: tidings://
    ("tidings://", (("127.0.0.1", 7421),), False),
    ("tidings://h:1/", (("h", 1),), False),
    ("tidings://a:1,b:2,c", (("a", 1), ("b", 2), ("c", 7421)), False),
    ("tidings+tls://a:1, b:2", (("a", 1), ("b", 2)), True),
    ("tidings://[::1]:7000,[fe80::1],127.0.0.1:7001", (("::1", 7000), ("fe80::1", 7421), ("127.0.0.1", 7001)), False),
    ("tidings://a:1,a:1,b:1", (("a", 1), ("b", 1)), False),  # the same broker once
])
def test_addresses(url: str, addresses: tuple[tuple[str, int], ...], tls: bool) -> None:
    parsed = parse_urls(url)
    assert (parsed.addresses, parsed.tls, parsed.user, parsed.password) == (addresses, tls, None, None)
    assert parse_url(url) == (*addresses[0], tls)


def test_credentials_before_the_host_list_and_never_shown() -> None:
    parsed = parse_urls("tidings+tls://al%40ice:s3cr%3Aet@[::1]:7000,b:7001")
    assert parsed == BrokerURL((("::1", 7000), ("b", 7001)), True, "al@ice", "s3cr:et")
    assert str(parsed) == "tidings+tls://al%40ice@[::1]:7000,b:7001"
    assert "s3cr" not in repr(parsed)
    assert parse_urls("tidings://bob@h").password is None
    assert parse_urls("tidings://@h").user is None


def test_credentials_in_the_url_are_used_unless_the_keywords_give_some() -> None:
    assert Client("tidings://al:pw@h:1,h:2")._auth == {"user": "al", "password": "pw"}
    assert Client("tidings://al:pw@h:1", user="bo", password="x")._auth == {"user": "bo", "password": "x"}
    assert Client("tidings://al:pw@h:1", token="t")._auth == {"token": "t"}
    assert Client("tidings://h:1")._auth is None


@pytest.mark.parametrize("url, says", [
    ("", "empty broker URL"),
    ("http://u:hunter2@x", "unsupported URL scheme 'http'"),
    ("tidings://h:port", "'h:port'"),
    ("tidings://[::1", "Invalid IPv6 URL"),
    ("tidings://h:1/path", "a path, query or fragment"),
    ("tidings://h:1?opt=1", "a path, query or fragment"),
    ("tidings://u:hunter2@a:1,,b:2", "address 2 of 3 is empty"),
    ("tidings://a:1,b:2,", "address 3 of 3 is empty"),
    ("tidings://u:hunter2@a:1,b:x", "address 2 of 2, 'b:x'"),
    ("tidings://a:1,[::1:2", "address 2 of 2, '[::1:2': Invalid IPv6 URL"),
    ("tidings://a:1,b:99999", "Port out of range"),
])
def test_a_bad_url_is_one_clear_error(url: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_urls(url)
    text = str(info.value)
    assert says in text and URL_FORM in text and "hunter2" not in text and "\n" not in text, text
    with pytest.raises(ValueError):
        Client(url)  # at once, before any dial


def test_the_order_is_shuffled_per_client_and_keeps_every_address() -> None:
    url = "tidings://a:1,b:1,c:1,d:1"
    orders = {tuple(Client(url)._order) for _ in range(200)}
    assert len(orders) > 1  # 24 orders: 200 clients all in one order is a ~1e-274 chance
    assert all(sorted(o) == [("a", 1), ("b", 1), ("c", 1), ("d", 1)] for o in orders)


def test_dials_go_round_the_list_and_a_lost_broker_comes_last() -> None:
    """connect() tries each address once, in the client's order, from where it is; after a
    loss the next dial starts at the broker after the lost one (which comes last)."""
    import anyio

    from tidings.client.errors import ConnectError, ConnectionClosedError

    tc = Client("tidings://a:1,b:1,c:1")
    tc._order = [("a", 1), ("b", 1), ("c", 1)]
    dialled: list[str] = []
    answers = {"b"}

    async def dial_one(host: str, port: int) -> object:
        dialled.append(host)
        if host not in answers:
            raise ConnectError(f"{host} is down")
        return "connection"

    tc._dial_one = dial_one  # type: ignore[method-assign]
    assert anyio.run(tc._dial) == "connection"
    assert dialled == ["a", "b"] and tc.address == ("b", 1)

    tc._lost(ConnectionClosedError("b died"))  # on b: the next dial starts at c, b comes last
    assert tc.address is None
    dialled.clear()
    answers = {"a", "b"}
    anyio.run(tc._dial)
    assert dialled == ["c", "a"] and tc.address == ("a", 1)

    tc._lost(ConnectionClosedError("a died"))
    dialled.clear()
    answers = set()
    with pytest.raises(ConnectError, match="cannot connect to any of the 3 brokers: b:1: b is down; c:1: c is down; "
                                           "a:1: a is down"):
        anyio.run(tc._dial)
    assert dialled == ["b", "c", "a"]
