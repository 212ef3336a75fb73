"""The HTTP port's settings: http_host/http_port, their old names, the body limit."""

from __future__ import annotations

import pytest

from tidings.broker.config import Config, ConfigError, load


def test_old_names_are_aliases_with_a_deprecation() -> None:
    cfg = load(env={"TIDINGS_METRICS_PORT": "9421", "TIDINGS_METRICS_HOST": "::1"})
    assert (cfg.http_port, cfg.http_host) == (9421, "::1")
    assert [w.split(":")[0] for w in cfg.deprecations] == ["metrics_host is deprecated", "metrics_port is deprecated"]
    new = load(flags={"http_port": 9421})
    assert (new.http_port, new.http_host, new.deprecations) == (9421, "127.0.0.1", [])
    assert load(env={"TIDINGS_HTTP_PORT": "0"}).http_port == 0
    # the same value under both names is fine; two different ones are an error
    assert load(env={"TIDINGS_METRICS_PORT": "9421"}, flags={"http_port": 9421}).http_port == 9421
    with pytest.raises(ConfigError, match="metrics_port is the old name of http_port: set http_port only"):
        load(env={"TIDINGS_METRICS_PORT": "9421"}, flags={"http_port": 9422})


def test_http_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="http_port must be -1 .off. or 0..65535"):
        Config(http_port=70000).validate()
    with pytest.raises(ConfigError, match="refusing to serve metrics on '10.1.2.3'"):
        Config(http_port=9421, http_host="10.1.2.3").validate()
    Config(http_port=9421, http_host="10.1.2.3", allow_open=True).validate()
    for name in ("http_header_timeout", "http_body_timeout"):
        with pytest.raises(ConfigError, match=f"{name} must be positive"):
            Config(**{name: 0.0}).validate()
    with pytest.raises(ConfigError, match="http_max_body must be 0 .= max_payload. up to max_payload"):
        Config(http_max_body=Config().max_payload + 1).validate()
    with pytest.raises(ConfigError, match="http_max_connections must be positive"):
        Config(http_max_connections=0).validate()
    assert Config().http_body_limit == Config().max_payload
    assert Config(http_max_body=1000).http_body_limit == 1000
