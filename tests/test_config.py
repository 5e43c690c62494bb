"""Tests of the TOML configuration: schema, secret references, errors and rendering."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from syncd.config import (
    MESSAGE_TYPES,
    SYSTEM_CONFIG_PATH,
    Settings,
    default_config_path,
    format_duration,
    load_settings,
    parse_duration,
    render_settings,
    settings_from_dict,
    startup_problems,
    startup_warnings,
)
from syncd.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
EXAMPLE = CONFIG_DIR / "syncd.example.toml"
DEV = CONFIG_DIR / "syncd.dev.toml"
EXAMPLE_ENV = {
    "MASONHUB_TOKEN": "mh-token-123",
    "MASONHUB_WEBHOOK_SECRET": "wh-secret-456",
    "ERP_TOKEN": "erp-token-789",
}
DURATION_HINT = '(use e.g. "30s", "5m", "2h", "30d")'


def schema_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key of the settings schema, as a path of table names and the key name."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from schema_keys(annotation, (*prefix, name))
        else:
            yield (*prefix, name)


def documented_keys(text: str) -> set[tuple[str, ...]]:
    """Keys with a comment on their line or the line above, tables with one on or below."""
    lines = [*text.splitlines(), ""]
    section: tuple[str, ...] = ()
    documented = set()
    for index, line in enumerate(lines[:-1]):
        if header := re.match(r"\[([\w.]+)\]", line):
            section = tuple(header[1].split("."))
            key, neighbour = section, lines[index + 1]
        elif assignment := re.match(r"(\w+)\s*=", line):
            key, neighbour = (*section, assignment[1]), lines[index - 1] if index else ""
        else:
            continue
        if "#" in line or neighbour.lstrip().startswith("#"):
            documented.add(key)
    return documented


def error_for(raw: dict[str, Any], environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw, environ or {})
    return info.value


# --- the shipped config files ---------------------------------------------------------------


def test_example_config_loads_with_env_vars_set() -> None:
    """The example config is valid as-is once its three environment variables are set."""
    settings = load_settings(EXAMPLE, EXAMPLE_ENV)
    assert settings.masonhub.token.get_secret_value() == "mh-token-123"
    assert settings.erp.token.get_secret_value() == "erp-token-789"
    assert [s.get_secret_value() for s in settings.webhooks.signing_secrets] == ["wh-secret-456"]
    assert startup_problems(settings) == []


def test_example_config_documents_every_key_with_a_comment() -> None:
    """Every key of the schema is set in the example config and carries a comment."""
    text = EXAMPLE.read_text()
    raw = tomllib.loads(text)
    documented = documented_keys(text)
    for key in schema_keys(Settings):
        table: Any = raw
        for part in key:
            assert part in table, f"{'.'.join(key)} missing from {EXAMPLE.name}"
            table = table[part]
        assert key in documented, f"{'.'.join(key)} has no comment in {EXAMPLE.name}"


def test_example_config_shows_the_defaults() -> None:
    """Apart from secret references and the spelled-out ERP paths, the example is the default."""
    settings = load_settings(EXAMPLE, EXAMPLE_ENV)
    secrets = {"masonhub": {"token"}, "erp": {"token", "paths"}, "webhooks": {"signing_secrets"}}
    assert settings.model_dump(exclude=secrets) == Settings().model_dump(exclude=secrets)


def test_dev_config_loads_without_environment() -> None:
    """The development config needs no environment and points at local services."""
    settings = load_settings(DEV, {})
    assert settings.store.url == "sqlite+aiosqlite:///.state/syncd.db"
    assert settings.store.auto_migrate is True
    assert settings.masonhub.base_url == "http://127.0.0.1:8081/api/v1"
    assert settings.erp.base_url == "http://127.0.0.1:9000/api"
    assert (settings.server.port, settings.admin.port) == (8080, 9101)
    assert settings.webhooks.signing_secrets[0].get_secret_value() == "dev-webhook-secret"
    assert settings.masonhub.token.get_secret_value() == "dev-masonhub-token"
    assert settings.erp.token.get_secret_value() == "dev-erp-token"
    assert startup_problems(settings) == []


# --- defaults -------------------------------------------------------------------------------


def test_missing_sections_take_the_documented_defaults() -> None:
    """An empty file yields the defaults of DESIGN.md."""
    settings = settings_from_dict({}, {})
    assert settings == Settings()
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.server.max_body_bytes == 1_048_576
    assert settings.store.url == "sqlite+aiosqlite:////var/lib/syncd/syncd.db"
    assert settings.masonhub.timeout == 30.0
    assert settings.webhooks.subscriptions == MESSAGE_TYPES
    assert settings.webhooks.dedupe_retention == 30 * 86400
    assert (settings.erp.backoff_initial, settings.erp.backoff_max) == (2.0, 900.0)
    assert settings.reconcile.cron == "0 2 * * *"
    assert settings.reconcile.window == 30 * 86400


def test_each_poll_job_has_its_own_defaults() -> None:
    """Poll jobs default to their own intervals, listed in a stable order."""
    jobs = Settings().poll.jobs()
    assert {name: (job.every, job.lookback) for name, job in jobs.items()} == {
        "orders": (300, 600),
        "shipments": (300, 600),
        "inventory": (3600, 7200),
        "inbound_shipments": (900, 1800),
        "rmas": (900, 1800),
    }
    assert all(job.enabled for job in jobs.values())


def test_partial_poll_table_keeps_that_jobs_defaults() -> None:
    """A [poll.inventory] table setting only `every` keeps inventory's own lookback."""
    settings = settings_from_dict({"poll": {"inventory": {"every": "30m"}}}, {})
    assert (settings.poll.inventory.every, settings.poll.inventory.lookback) == (1800, 7200)


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after loading."""
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.server.port = 1  # type: ignore[misc]


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("30d", 2_592_000.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("0s", 0.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    """Durations with units ms, s, m, h, d (also combined) are converted to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "-1s", "s", "1h 30m", "1.s", "five m"])
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is a ValueError that quotes the input and shows examples."""
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(text)
    assert str(info.value) == f"invalid duration {text!r} {DURATION_HINT}"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30, "30s"), (300, "5m"), (5400, "1h30m"), (2_592_000, "30d"), (0.5, "500ms"), (0, "0s")],
)
def test_format_duration_reads_back(seconds: float, text: str) -> None:
    """Seconds render as the shortest duration string that parses back to the same value."""
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_duration_keys_accept_bare_seconds() -> None:
    """A TOML number in a duration key is a number of seconds."""
    settings = settings_from_dict({"erp": {"timeout": 45, "backoff_initial": 1.5}}, {})
    assert (settings.erp.timeout, settings.erp.backoff_initial) == (45.0, 1.5)


# --- secret references ----------------------------------------------------------------------


def test_env_reference_is_read_from_the_given_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """`env:NAME` takes the value from the environ mapping passed in, not from os.environ."""
    monkeypatch.setenv("ERP_TOKEN", "from-os-environ")
    settings = settings_from_dict({"erp": {"token": "env:ERP_TOKEN"}}, {"ERP_TOKEN": "given"})
    assert settings.erp.token.get_secret_value() == "given"
    error = error_for({"erp": {"token": "env:ERP_TOKEN"}}, {})
    assert str(error) == "erp.token: environment variable ERP_TOKEN is not set"


def test_env_reference_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an environ argument, os.environ is used."""
    monkeypatch.setenv("SYNCD_TEST_TOKEN", "from-os-environ")
    settings = settings_from_dict({"masonhub": {"token": "env:SYNCD_TEST_TOKEN"}})
    assert settings.masonhub.token.get_secret_value() == "from-os-environ"


def test_missing_env_var_in_a_list_names_the_index() -> None:
    """A missing variable inside a list is reported with the list index."""
    raw = {"webhooks": {"signing_secrets": ["env:MASONHUB_WEBHOOK_SECRET"]}}
    error = error_for(raw)
    assert str(error) == (
        "webhooks.signing_secrets[0]: environment variable MASONHUB_WEBHOOK_SECRET is not set"
    )
    assert error.key == "webhooks.signing_secrets[0]"


def test_references_are_resolved_inside_lists_and_in_any_key() -> None:
    """References work in every string, including list items and non-secret keys."""
    raw: dict[str, Any] = {
        "webhooks": {"signing_secrets": ["old-secret", "env:NEW"]},
        "server": {"trusted_proxies": ["env:PROXY"], "port": "env:PORT"},
    }
    settings = settings_from_dict(raw, {"NEW": "new-secret", "PROXY": "10.1.0.0/16", "PORT": "81"})
    secrets = [s.get_secret_value() for s in settings.webhooks.signing_secrets]
    assert secrets == ["old-secret", "new-secret"]
    assert settings.server.trusted_proxies == (IPv4Network("10.1.0.0/16"),)
    assert settings.server.port == 81
    assert raw["webhooks"]["signing_secrets"][1] == "env:NEW", "the input is left untouched"


def test_empty_reference_is_an_error() -> None:
    """`env:` without a variable name is reported, not looked up."""
    assert str(error_for({"erp": {"token": "env:"}})) == "erp.token: env: reference without a name"


def test_file_reference_strips_one_trailing_newline(tmp_path: Path) -> None:
    """`file:PATH` reads the file and drops exactly one trailing newline."""
    (tmp_path / "erp").write_text("erp-secret\n")
    (tmp_path / "hook").write_text("hook-secret\n\n")
    raw = {
        "erp": {"token": f"file:{tmp_path / 'erp'}"},
        "webhooks": {"signing_secrets": [f"file:{tmp_path / 'hook'}"]},
    }
    settings = settings_from_dict(raw, {})
    assert settings.erp.token.get_secret_value() == "erp-secret"
    assert settings.webhooks.signing_secrets[0].get_secret_value() == "hook-secret\n"


def test_missing_file_reference_names_key_and_file(tmp_path: Path) -> None:
    """A file that does not exist is reported with the key and the path."""
    missing = tmp_path / "nope"
    error = error_for({"erp": {"token": f"file:{missing}"}})
    assert str(error) == f"erp.token: cannot read file {missing}: No such file or directory"


def test_unreadable_file_reference_names_key_and_file(tmp_path: Path) -> None:
    """A path that cannot be read as a file (here a directory) is reported with the key."""
    error = error_for({"webhooks": {"signing_secrets": ["x", f"file:{tmp_path}"]}})
    assert str(error) == f"webhooks.signing_secrets[1]: cannot read file {tmp_path}: Is a directory"


# --- errors name the key --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"bogus": {}}, "bogus: unknown key"),
        ({"server": {"bogus": 1}}, "server.bogus: unknown key"),
        ({"poll": {"weekly": {"every": "7d"}}}, "poll.weekly: unknown key"),
        ({"server": {"port": 70000}}, "server.port: must be at most 65535, got 70000"),
        ({"admin": {"port": -1}}, "admin.port: must be at least 0, got -1"),
        ({"server": {"port": "abc"}}, "server.port: expected an integer, got 'abc'"),
        ({"server": {"port": True}}, "server.port: expected an integer, got true"),
        (
            {"store": {"auto_migrate": "maybe"}},
            "store.auto_migrate: expected true or false, got 'maybe'",
        ),
        ({"server": "x"}, "server: expected a table, got 'x'"),
        ({"erp": {"timeout": "5x"}}, f"erp.timeout: invalid duration '5x' {DURATION_HINT}"),
        ({"poll": {"rmas": {"every": "0s"}}}, "poll.rmas.every: must be greater than 0, got '0s'"),
        ({"masonhub": {"page_size": 101}}, "masonhub.page_size: must be at most 100, got 101"),
        ({"erp": {"concurrency": 0}}, "erp.concurrency: must be at least 1, got 0"),
        (
            {"webhooks": {"subscriptions": ["orderEvent", "orderShipped"]}},
            "webhooks.subscriptions[1]: unknown message type 'orderShipped' (valid: "
            + ", ".join(MESSAGE_TYPES)
            + ")",
        ),
        (
            {"webhooks": {"allowed_ips": ["10.0.0.0/8", "10.0.0.300"]}},
            "webhooks.allowed_ips[1]: invalid CIDR '10.0.0.300': "
            "'10.0.0.300' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            {"server": {"trusted_proxies": ["10.0.0.1/8"]}},
            "server.trusted_proxies[0]: invalid CIDR '10.0.0.1/8': 10.0.0.1/8 has host bits set",
        ),
        (
            {"reconcile": {"cron": "0 2 * *"}},
            "reconcile.cron: invalid crontab expression '0 2 * *': "
            "Wrong number of fields; got 4, expected 5",
        ),
        (
            {"store": {"url": "mysql://syncd@db/syncd"}},
            "store.url: must start with sqlite+aiosqlite:// or postgresql+asyncpg://, "
            "got 'mysql://syncd@db/syncd'",
        ),
        (
            {"erp": {"backoff_initial": "1m", "backoff_max": "30s"}},
            "erp.backoff_max: must be at least backoff_initial (1m), got 30s",
        ),
        (
            {"erp": {"paths": {"shipments": "/shipments/{id}"}}},
            "erp.paths.shipments: unknown key "
            "(valid: orders, inventory, inbound_shipments, returns, order_requests)",
        ),
        (
            {"erp": {"paths": {"orders": "/orders"}}},
            "erp.paths.orders: must be a path starting with '/' containing {id}, got '/orders'",
        ),
        ({"webhooks": {"signing_secrets": [""]}}, "webhooks.signing_secrets[0]: must not be empty"),
        (
            {"webhooks": {"path": "webhooks"}},
            "webhooks.path: must be a URL path such as '/webhooks/masonhub', got 'webhooks'",
        ),
        (
            {"masonhub": {"base_url": "sandbox.masonhub.co"}},
            "masonhub.base_url: must be an http:// or https:// URL, got 'sandbox.masonhub.co'",
        ),
    ],
)
def test_bad_value_error_names_the_key(raw: dict[str, Any], message: str) -> None:
    """Each kind of bad value is one clear message that starts with the dotted key."""
    error = error_for(raw)
    assert str(error) == message
    assert error.key == message.split(": ", 1)[0]


def test_several_errors_are_reported_together() -> None:
    """All validation errors are listed in one line, the first one giving the key."""
    error = error_for({"server": {"port": -1, "bogus": 1}})
    assert error.key == "server.port"
    assert str(error) == "server.port: must be at least 0, got -1; server.bogus: unknown key"


def test_store_url_error_masks_the_password() -> None:
    """A rejected store URL is quoted without its password."""
    error = error_for({"store": {"url": "mysql://syncd:hunter2@db/syncd"}})
    assert "hunter2" not in str(error)
    assert "mysql://syncd:********@db/syncd" in str(error)


def test_errors_never_quote_secret_values() -> None:
    """A secret given with the wrong type is described, not quoted."""
    error = error_for({"webhooks": {"signing_secrets": "env:SECRET"}}, {"SECRET": "s3cr3t-value"})
    assert str(error) == "webhooks.signing_secrets: expected a list, got a string (not shown)"
    error = error_for({"server": {"port": "env:PORT"}}, {"PORT": "s3cr3t-value"})
    assert "s3cr3t-value" not in str(error)
    assert error.key == "server.port"


# --- normalisation --------------------------------------------------------------------------


def test_values_are_normalised() -> None:
    """Paths lose a trailing slash, subscriptions are deduplicated, bare addresses are hosts."""
    raw = {
        "webhooks": {
            "path": "/hooks/mh/",
            "subscriptions": ["orderEvent", "rmaEvent", "orderEvent"],
            "allowed_ips": ["192.0.2.7", "2001:db8::/32", "2001:db8::1"],
        },
        "masonhub": {"base_url": "https://sandbox.masonhub.co/acme/api/v1/"},
    }
    settings = settings_from_dict(raw, {})
    assert settings.webhooks.path == "/hooks/mh"
    assert settings.webhooks.subscriptions == ("orderEvent", "rmaEvent")
    assert settings.webhooks.allowed_ips == (
        IPv4Network("192.0.2.7/32"),
        IPv6Network("2001:db8::/32"),
        IPv6Network("2001:db8::1/128"),
    )
    assert settings.masonhub.base_url == "https://sandbox.masonhub.co/acme/api/v1"


# --- loading files --------------------------------------------------------------------------


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    """A config file that does not exist is a ConfigError naming it."""
    path = tmp_path / "syncd.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(info.value) == f"{path}: config file not found"


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the position."""
    path = tmp_path / "syncd.toml"
    path.write_text('[server]\nport = 80\nhost = "unterminated\n')
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), {})
    assert info.value.key == str(path)
    assert re.search(r"invalid TOML: .*line 3, column \d+", info.value.problem)


def test_default_config_path_prefers_syncd_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """$SYNCD_CONFIG wins over the standard locations."""
    monkeypatch.setenv("SYNCD_CONFIG", "/srv/syncd.toml")
    assert default_config_path() == Path("/srv/syncd.toml")


@pytest.mark.skipif(SYSTEM_CONFIG_PATH.exists(), reason="this host has a system config")
def test_default_config_path_falls_back_to_local_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $SYNCD_CONFIG or /etc/syncd/syncd.toml, config/syncd.toml is used."""
    monkeypatch.delenv("SYNCD_CONFIG", raising=False)
    assert default_config_path() == Path("config/syncd.toml")


# --- rendering ------------------------------------------------------------------------------

SECRET_RAW: dict[str, Any] = {
    "store": {"url": "postgresql+asyncpg://syncd:pg-pass-111@db:5432/syncd"},
    "masonhub": {"token": "mh-tok-222"},
    "webhooks": {
        "signing_secrets": ["wh-old-333", "wh-new-444"],
        "callback_token": "cb-tok-555",
        "allowed_ips": ["203.0.113.0/24"],
    },
    "erp": {"token": "erp-tok-666", "paths": {"orders": "/sales-orders/{id}"}},
    "poll": {"orders": {"every": "90s", "enabled": False}},
}


def test_render_settings_masks_every_secret() -> None:
    """No secret value, nor the store password, appears in the rendered config."""
    text = render_settings(settings_from_dict(SECRET_RAW, {}))
    for secret in ["pg-pass-111", "mh-tok-222", "wh-old-333", "wh-new-444", "cb-tok-555"]:
        assert secret not in text
    assert "erp-tok-666" not in text
    rendered = tomllib.loads(text)
    assert rendered["store"]["url"] == "postgresql+asyncpg://syncd:********@db:5432/syncd"
    assert rendered["webhooks"]["signing_secrets"] == ["********", "********"]
    assert rendered["webhooks"]["callback_token"] == "********"
    assert rendered["masonhub"]["token"] == rendered["erp"]["token"] == "********"


def test_render_settings_round_trips_through_tomllib() -> None:
    """The rendered text parses with tomllib, has every key, and loads back to the same text."""
    text = render_settings(settings_from_dict(SECRET_RAW, {}))
    rendered = tomllib.loads(text)
    for key in schema_keys(Settings):
        table: Any = rendered
        for part in key:
            table = table[part]
    assert rendered["poll"]["orders"] == {"every": "1m30s", "lookback": "10m", "enabled": False}
    assert rendered["webhooks"]["dedupe_retention"] == "30d"
    assert rendered["webhooks"]["allowed_ips"] == ["203.0.113.0/24"]
    assert rendered["erp"]["paths"] == {"orders": "/sales-orders/{id}"}
    assert render_settings(settings_from_dict(rendered, {})) == text


def test_render_settings_shows_empty_secrets_as_empty() -> None:
    """A secret that is not set renders as "" so the reader sees it is missing."""
    rendered = tomllib.loads(render_settings(Settings()))
    assert rendered["masonhub"]["token"] == ""
    assert rendered["webhooks"]["signing_secrets"] == []
    assert rendered["webhooks"]["callback_token"] == ""


def test_render_settings_escapes_strings() -> None:
    """Quotes, backslashes and control characters in values survive the round trip."""
    odd = 'C:\\dir "x"\t\x7f'
    settings = Settings.model_validate({"erp": {"adapter": odd}})
    assert tomllib.loads(render_settings(settings))["erp"]["adapter"] == odd


# --- startup checks -------------------------------------------------------------------------


def test_unauthenticated_webhooks_are_a_startup_problem_not_a_load_error() -> None:
    """Without secrets the config loads, but `syncd run` gets a reason to refuse to start."""
    settings = settings_from_dict({}, {})
    assert not settings.webhooks.authenticated
    assert startup_problems(settings) == [
        "webhooks: set signing_secrets or callback_token "
        "(or allow_unauthenticated = true for local tests)"
    ]


def test_allow_unauthenticated_turns_the_problem_into_a_warning() -> None:
    """allow_unauthenticated = true lets the daemon start, with a warning."""
    settings = settings_from_dict({"webhooks": {"allow_unauthenticated": True}}, {})
    assert startup_problems(settings) == []
    assert startup_warnings(settings) != []


def test_callback_token_alone_authenticates() -> None:
    """A callback token without signing secrets is enough authentication."""
    settings = settings_from_dict({"webhooks": {"callback_token": "tok"}}, {})
    assert settings.webhooks.authenticated
    assert settings.webhooks.callback_token == SecretStr("tok")
    assert startup_problems(settings) == startup_warnings(settings) == []


def test_file_reference_expands_credentials_directory(tmp_path: Path) -> None:
    """file:${CREDENTIALS_DIRECTORY}/name reads systemd's credential; an unset variable is named."""
    (tmp_path / "erp-token").write_text("cred-token\n")
    raw = {
        "webhooks": {"signing_secrets": ["x"]},
        "erp": {"token": "file:${CREDENTIALS_DIRECTORY}/erp-token"},
    }
    settings = settings_from_dict(raw, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert settings.erp.token.get_secret_value() == "cred-token"
    with pytest.raises(
        ConfigError, match=r"erp\.token: environment variable CREDENTIALS_DIRECTORY"
    ):
        settings_from_dict(raw, environ={})
