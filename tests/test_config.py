from __future__ import annotations

from pathlib import Path

import pytest

from realtime.config import (
    Config,
    ConfigError,
    apply_dev_secrets,
    config_from_dict,
    load_config,
    require_secrets,
)

ROOT = Path(__file__).resolve().parent.parent


def test_config_file_spells_out_the_builtin_defaults() -> None:
    loaded = load_config(ROOT / "config" / "gateway.toml", environ={})
    defaults = Config()
    defaults.source = loaded.source
    assert loaded == defaults


def test_example_configs_are_valid() -> None:
    for path in (ROOT / "config").rglob("*.toml"):
        load_config(path, environ={})


def test_environment_overrides() -> None:
    config = load_config(
        None,
        environ={
            "REALTIME_SERVER__PORT": "9000",
            "REALTIME_AUTH__HMAC_SECRET": "a-secret-that-is-long-enough-for-hs256!",
            "REALTIME_NAMESPACES__CHAT__HISTORY_SIZE": "100",
            "REALTIME_SERVER__ALLOWED_ORIGINS": '["https://a.example"]',
            "UNRELATED": "1",
        },
    )
    assert config.server.port == 9000
    assert config.namespaces["chat"].history_size == 100
    assert config.server.allowed_origins == ["https://a.example"]
    assert "environment" in config.source


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"server": {"prot": 1}}, "server.prot: unknown key; did you mean 'port'"),
        ({"server": {"port": "80"}}, "server.port: expected an integer"),
        ({"server": {"port": 70000}}, "server.port: 70000 is not a TCP port"),
        ({"auth": {"algorithm": "none"}}, "auth.algorithm: 'none' is not one of"),
        ({"auth": {"hmac_secret": "short"}}, "auth.hmac_secret: must be at least 32"),
        ({"namespaces": {"chat": {"publish": "anyone"}}}, "namespaces.chat.publish: must be one"),
        ({"client": {"min_version": {"ios": "latest"}}}, "client.min_version.ios"),
        ({"limits": {"max_queue_bytes": 10}}, "limits.max_queue_bytes"),
        ({"broker": {"type": "kafka"}}, "broker.type"),
        ({"log": {"format": "xml"}}, "log.format"),
    ],
)
def test_invalid_config_names_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_dict(raw)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})


def test_no_secret_works_by_default() -> None:
    config = load_config(ROOT / "config" / "gateway.toml", environ={})
    with pytest.raises(ConfigError, match=r"auth.hmac_secret is empty.*--dev"):
        require_secrets(config)
    config.auth.hmac_secret = "x" * 32
    with pytest.raises(ConfigError, match=r"api\.key is empty"):
        require_secrets(config)


def test_dev_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / ".realtime" / "dev.toml"
    first = Config()
    assert apply_dev_secrets(first, path)
    assert path.stat().st_mode & 0o777 == 0o600
    second = Config()
    assert not apply_dev_secrets(second, path)
    assert first.auth.hmac_secret == second.auth.hmac_secret and first.dev
    require_secrets(second)
