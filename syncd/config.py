"""The syncd configuration: a TOML file validated into one frozen `Settings` object.

The file format is a contract (see DESIGN.md, "Config file (TOML)"). Secret references
(`env:NAME`, `file:PATH`) are resolved here, once, so that nothing deeper in the program reads
the environment.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Final, get_args

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from syncd.errors import ConfigError
from syncd.messages import MESSAGE_TYPES

__all__ = [
    "MASK",
    "MESSAGE_TYPES",
    "POLL_JOBS",
    "AdminSettings",
    "ErpSettings",
    "MasonHubSettings",
    "PollJobSettings",
    "PollSettings",
    "ReconcileSettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "WebhookSettings",
    "default_config_path",
    "format_duration",
    "load_settings",
    "mask_url_password",
    "parse_duration",
    "render_settings",
    "settings_from_dict",
    "startup_problems",
    "startup_warnings",
]

MASK: Final = "********"
SYSTEM_CONFIG_PATH: Final = Path("/etc/syncd/syncd.toml")
LOCAL_CONFIG_PATH: Final = Path("config/syncd.toml")

POLL_JOBS: Final = ("orders", "shipments", "inventory", "inbound_shipments", "rmas")
ERP_PATH_ENTITIES: Final = ("orders", "inventory", "inbound_shipments", "returns", "order_requests")
STORE_URL_PREFIXES: Final = ("sqlite+aiosqlite://", "postgresql+asyncpg://")

_DAY: Final = 86400.0
_MAX_REPORTED_ERRORS: Final = 5


# --- durations ------------------------------------------------------------------------------

_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": _DAY}
# "ms" must come before "m" in the alternation, or "500ms" would read as 500 minutes + "s".
_DURATION_PART: Final = r"(\d+(?:\.\d+)?)(ms|s|m|h|d)"
_DURATION_RE: Final = re.compile(rf"(?:{_DURATION_PART})+")
_DURATION_PART_RE: Final = re.compile(_DURATION_PART)
_DURATION_HINT: Final = '(use e.g. "30s", "5m", "2h", "30d")'


def parse_duration(text: str) -> float:
    """Return the number of seconds in a duration such as "30s", "5m", "1h30m" or "500ms"."""
    stripped = text.strip()
    if not _DURATION_RE.fullmatch(stripped):
        raise ValueError(f"invalid duration {text!r} {_DURATION_HINT}")
    return sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART_RE.findall(stripped)
    )


def format_duration(seconds: float) -> str:
    """Render seconds as the shortest duration string `parse_duration` reads back ("1h30m")."""
    remaining = round(seconds * 1000)
    if remaining <= 0:
        return "0s"
    parts = []
    for unit, unit_ms in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, remaining = divmod(remaining, unit_ms)
        if count:
            parts.append(f"{count}{unit}")
    if remaining:
        parts.append(f"{remaining}ms")
    return "".join(parts)


def _to_seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r} {_DURATION_HINT}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"invalid duration {value!r}: must be a finite number of seconds >= 0")
        return float(value)
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"invalid duration {value!r} {_DURATION_HINT}")


# Kept as one object so render_settings can recognise duration fields by their metadata.
_AS_SECONDS: Final = BeforeValidator(_to_seconds)
Duration = Annotated[float, _AS_SECONDS]
PositiveDuration = Annotated[float, _AS_SECONDS, Field(gt=0)]


# --- small field types ----------------------------------------------------------------------


def _reject_bool(value: object) -> object:
    # pydantic's lax mode would turn `port = true` into 1; TOML has real integers, use them.
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {str(value).lower()}")
    return value


def _parse_network(value: object) -> IPv4Network | IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR such as '10.0.0.0/8', got {value!r}")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as exc:
        raise ValueError(f"invalid CIDR {value!r}: {exc}") from None


def _check_message_type(value: str) -> str:
    if value not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {value!r} (valid: {', '.join(MESSAGE_TYPES)})")
    return value


def _check_not_empty_secret(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise ValueError("must not be empty")
    return value


_HTTP_URL: Final = re.compile(r"https?://[^/\s?#]+\S*")


def _check_http_url(value: str) -> str:
    if not _HTTP_URL.fullmatch(value):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    # Clients join paths with "/"; a trailing slash would double it.
    return value.rstrip("/")


def _check_erp_entity(value: str) -> str:
    if value not in ERP_PATH_ENTITIES:
        raise ValueError(f"unknown key (valid: {', '.join(ERP_PATH_ENTITIES)})")
    return value


def _check_path_template(value: str) -> str:
    fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    if not value.startswith("/") or fields != {"id"}:
        raise ValueError(f"must be a path starting with '/' containing {{id}}, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_reject_bool)]
# 0 asks the kernel for a free port (tests, the demo); the bound port is logged at start.
Port = Annotated[int, BeforeValidator(_reject_bool), Field(ge=0, le=65535)]
Network = Annotated[IPv4Network | IPv6Network, BeforeValidator(_parse_network)]
Host = Annotated[str, Field(min_length=1)]
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- sections -------------------------------------------------------------------------------


class ServerSettings(_Section):
    """The public HTTP listener that receives MasonHub callbacks."""

    host: Host = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: Annotated[Int, Field(gt=0)] = 1_048_576
    trusted_proxies: tuple[Network, ...] = ()


class AdminSettings(_Section):
    """The private listener for metrics, status and health checks."""

    host: Host = "127.0.0.1"
    port: Port = 9101


class StoreSettings(_Section):
    """Where the event store lives (SQLite or PostgreSQL, through SQLAlchemy async)."""

    url: str = "sqlite+aiosqlite:////var/lib/syncd/syncd.db"
    auto_migrate: bool = False

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(STORE_URL_PREFIXES):
            shown = mask_url_password(value)
            raise ValueError(f"must start with {' or '.join(STORE_URL_PREFIXES)}, got {shown!r}")
        return value

    @property
    def display_url(self) -> str:
        """The URL with its password masked, safe to log or print."""
        return mask_url_password(self.url)


class MasonHubSettings(_Section):
    """The MasonHub API client used by polls and `subscriptions sync`."""

    base_url: HttpUrl = "https://sandbox.masonhub.co/ACCOUNT/api/v1"
    token: SecretStr = SecretStr("")
    timeout: PositiveDuration = 30.0
    page_size: Annotated[Int, Field(ge=1, le=100)] = 100


class WebhookSettings(_Section):
    """How MasonHub callbacks are authenticated, filtered and deduplicated."""

    path: str = "/webhooks/masonhub"
    signing_secrets: tuple[Annotated[SecretStr, AfterValidator(_check_not_empty_secret)], ...] = ()
    callback_token: SecretStr = SecretStr("")
    allowed_ips: tuple[Network, ...] = ()
    subscriptions: tuple[Annotated[str, AfterValidator(_check_message_type)], ...] = MESSAGE_TYPES
    public_url: str = ""
    dedupe_retention: PositiveDuration = 30 * _DAY
    allow_unauthenticated: bool = False

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        stripped = value.rstrip("/")
        if not value.startswith("/") or not stripped or re.search(r"[\s?#{}]", value):
            raise ValueError(f"must be a URL path such as '/webhooks/masonhub', got {value!r}")
        return stripped

    @field_validator("subscriptions")
    @classmethod
    def _dedupe(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value))

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        return _check_http_url(value) if value else value

    @property
    def authenticated(self) -> bool:
        """Whether callbacks must carry a valid signature or token."""
        return bool(self.signing_secrets) or bool(self.callback_token.get_secret_value())


class ErpSettings(_Section):
    """The ERP adapter and the retry policy of deliveries."""

    adapter: Host = "http"
    base_url: HttpUrl = "http://127.0.0.1:9000/api"
    token: SecretStr = SecretStr("")
    timeout: PositiveDuration = 15.0
    concurrency: Annotated[Int, Field(ge=1, le=256)] = 8
    max_attempts: Annotated[Int, Field(ge=1)] = 10
    backoff_initial: PositiveDuration = 2.0
    backoff_max: PositiveDuration = 900.0
    paths: dict[
        Annotated[str, AfterValidator(_check_erp_entity)],
        Annotated[str, AfterValidator(_check_path_template)],
    ] = {}

    @field_validator("backoff_max")
    @classmethod
    def _check_backoff_max(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("backoff_initial")
        if initial is not None and value < initial:
            raise ValueError(
                f"must be at least backoff_initial ({format_duration(initial)}), "
                f"got {format_duration(value)}"
            )
        return value


class PollJobSettings(_Section):
    """One incremental polling job: how often it runs and how far back it re-reads."""

    every: PositiveDuration = 300.0
    lookback: Duration = 600.0
    enabled: bool = True


_POLL_DEFAULTS: Final[dict[str, dict[str, float]]] = {
    "orders": {"every": 300.0, "lookback": 600.0},
    "shipments": {"every": 300.0, "lookback": 600.0},
    "inventory": {"every": 3600.0, "lookback": 7200.0},
    "inbound_shipments": {"every": 900.0, "lookback": 1800.0},
    "rmas": {"every": 900.0, "lookback": 1800.0},
}


def _poll_default(job: str) -> Callable[[], PollJobSettings]:
    return lambda: PollJobSettings.model_validate(_POLL_DEFAULTS[job])


class PollSettings(_Section):
    """The incremental polling jobs, one `[poll.NAME]` table each."""

    orders: PollJobSettings = Field(default_factory=_poll_default("orders"))
    shipments: PollJobSettings = Field(default_factory=_poll_default("shipments"))
    inventory: PollJobSettings = Field(default_factory=_poll_default("inventory"))
    inbound_shipments: PollJobSettings = Field(default_factory=_poll_default("inbound_shipments"))
    rmas: PollJobSettings = Field(default_factory=_poll_default("rmas"))

    @model_validator(mode="before")
    @classmethod
    def _fill_job_defaults(cls, data: Any) -> Any:
        # A partial [poll.inventory] must keep inventory's own defaults, not PollJobSettings'.
        if not isinstance(data, dict):
            return data
        return {
            name: {**_POLL_DEFAULTS[name], **value}
            if name in _POLL_DEFAULTS and isinstance(value, dict)
            else value
            for name, value in data.items()
        }

    def jobs(self) -> dict[str, PollJobSettings]:
        """Every polling job by name, in a stable order."""
        return {name: getattr(self, name) for name in POLL_JOBS}


class ReconcileSettings(_Section):
    """The periodic full reconciliation pass."""

    cron: str = "0 2 * * *"
    window: PositiveDuration = 30 * _DAY
    enabled: bool = True

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        try:
            # A fixed zone: only the syntax is checked here, without looking up the host's zone.
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"invalid crontab expression {value!r}: {exc}") from None
        return value


class Settings(_Section):
    """The whole validated configuration, built once at the edge and passed down."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    masonhub: MasonHubSettings = Field(default_factory=MasonHubSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    erp: ErpSettings = Field(default_factory=ErpSettings)
    poll: PollSettings = Field(default_factory=PollSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)


# --- loading --------------------------------------------------------------------------------


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """$SYNCD_CONFIG, else /etc/syncd/syncd.toml if it exists, else config/syncd.toml."""
    env = os.environ if environ is None else environ
    if configured := env.get("SYNCD_CONFIG"):
        return Path(configured)
    if SYSTEM_CONFIG_PATH.exists():
        return SYSTEM_CONFIG_PATH
    return LOCAL_CONFIG_PATH


def load_settings(path: Path | str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, resolve and validate a TOML config file; raise ConfigError naming the bad key."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "invalid TOML: not valid UTF-8") from None
    return settings_from_dict(raw, environ)


def settings_from_dict(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Validate an already-parsed TOML document; raise ConfigError naming the bad key."""
    resolver = _Resolver(os.environ if environ is None else environ)
    resolved = resolver.resolve(raw, ())
    try:
        return Settings.model_validate(resolved)
    except ValidationError as exc:
        raise _config_error(exc, resolver.resolved_paths) from None


Loc = tuple[str | int, ...]


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "[key]":  # pydantic's marker for "the dict key itself failed"
            text += f".{part}" if text else part
    return text


class _Resolver:
    """Replaces `env:NAME` and `file:PATH` strings, remembering where it did."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.resolved_paths: set[Loc] = set()

    def resolve(self, value: Any, loc: Loc) -> Any:
        if isinstance(value, dict):
            return {key: self.resolve(item, (*loc, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [self.resolve(item, (*loc, index)) for index, item in enumerate(value)]
        if isinstance(value, str) and value.startswith(("env:", "file:")):
            self.resolved_paths.add(loc)
            return self._reference(value, loc)
        return value

    def _expand(self, path: str, loc: Loc) -> str:
        # file:${CREDENTIALS_DIRECTORY}/erp-token: systemd names the credentials folder.
        def variable(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.environ:
                raise ConfigError(_dotted(loc), f"environment variable {name} is not set")
            return self.environ[name]

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", variable, path)

    def _reference(self, value: str, loc: Loc) -> str:
        kind, _, target = value.partition(":")
        if not target:
            raise ConfigError(_dotted(loc), f"{kind}: reference without a name")
        if kind == "env":
            if target not in self.environ:
                raise ConfigError(_dotted(loc), f"environment variable {target} is not set")
            return self.environ[target]
        target = self._expand(target, loc)
        try:
            text = Path(target).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(_dotted(loc), f"cannot read file {target}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(_dotted(loc), f"cannot read file {target}: not UTF-8") from None
        # Files written by editors and `echo` end with a newline that is not part of the secret.
        return text.removesuffix("\n").removesuffix("\r")


# --- ValidationError -> ConfigError ---------------------------------------------------------

_EXPECTED: Final = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}
_BOUNDS: Final = {
    "greater_than": ("greater than", "gt"),
    "greater_than_equal": ("at least", "ge"),
    "less_than": ("less than", "lt"),
    "less_than_equal": ("at most", "le"),
}


def _secret_paths() -> set[Loc]:
    paths: set[Loc] = set()
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        for name, inner in model.model_fields.items():
            if _mentions_secret(inner.annotation):
                paths.add((section, name))
    return paths


def _mentions_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_mentions_secret(arg) for arg in get_args(annotation))


def _describe(value: Any, sensitive: bool) -> str:
    """How an offending input is quoted in a message: never verbatim if it may be a secret."""
    if sensitive:
        kinds: dict[type, str] = {str: "a string", list: "a list", dict: "a table"}
        return f"{kinds.get(type(value), 'a value')} (not shown)"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(error: Any, sensitive: bool) -> str:
    kind = error["type"]
    got = _describe(error["input"], sensitive)
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in _BOUNDS:
        words, bound = _BOUNDS[kind]
        return f"must be {words} {error['ctx'][bound]}, got {got}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    return str(error["msg"])


def _is_sensitive(loc: Loc, resolved: set[Loc]) -> bool:
    if loc[:2] in _SECRET_PATHS:
        return True
    # An error on a list or table that holds a resolved reference would otherwise quote it.
    return any(path[: len(loc)] == loc or loc[: len(path)] == path for path in resolved)


def _config_error(exc: ValidationError, resolved: set[Loc]) -> ConfigError:
    messages = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        messages.append((_dotted(loc), _problem(error, _is_sensitive(loc, resolved))))
    key, problem = messages[0]
    rest = [f"{k}: {p}" for k, p in messages[1:_MAX_REPORTED_ERRORS]]
    if len(messages) > _MAX_REPORTED_ERRORS:
        rest.append(f"and {len(messages) - _MAX_REPORTED_ERRORS} more")
    return ConfigError(key, "; ".join([problem, *rest]))


_SECRET_PATHS: Final = _secret_paths()


# --- startup checks -------------------------------------------------------------------------


def startup_problems(settings: Settings) -> list[str]:
    """Reasons `syncd run` must refuse to start with these settings (empty when fine)."""
    problems = []
    webhooks = settings.webhooks
    if not webhooks.authenticated and not webhooks.allow_unauthenticated:
        problems.append(
            "webhooks: set signing_secrets or callback_token "
            "(or allow_unauthenticated = true for local tests)"
        )
    return problems


def startup_warnings(settings: Settings) -> list[str]:
    """Settings `syncd run` accepts but should log a warning about."""
    warnings = []
    if not settings.webhooks.authenticated and settings.webhooks.allow_unauthenticated:
        warnings.append("webhooks: allow_unauthenticated is set, callbacks are not authenticated")
    return warnings


# --- rendering ------------------------------------------------------------------------------


def mask_url_password(url: str) -> str:
    """Replace the password of a `scheme://user:password@host/...` URL with the mask."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon and password:
        netloc = f"{user}:{MASK}@{host}"
    # asyncpg also takes the password as a query parameter.
    tail = re.sub(r"([?&]password=)[^&]*", rf"\g<1>{MASK}", tail)
    return f"{scheme}://{netloc}{slash}{tail}"


def render_settings(settings: Settings) -> str:
    """The effective configuration as TOML, with every secret shown as "********"."""
    document = _plain(settings)
    document["store"]["url"] = settings.store.display_url
    lines = ["# effective syncd configuration (secrets masked)"]
    _emit_table(lines, (), document)
    return "\n".join(lines) + "\n"


def _plain(model: BaseModel) -> dict[str, Any]:
    """A model as nested dicts of TOML values, durations as strings and secrets masked."""
    result: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        result[name] = _plain_value(getattr(model, name), field)
    return result


def _plain_value(value: Any, field: FieldInfo) -> Any:
    if isinstance(value, BaseModel):
        return _plain(value)
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if isinstance(value, tuple):
        return [_plain_value(item, field) for item in value]
    if isinstance(value, IPv4Network | IPv6Network):
        return str(value)
    if isinstance(value, float) and _AS_SECONDS in field.metadata:
        return format_duration(value)
    if isinstance(value, dict):
        return dict(value)
    return value


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def _emit_table(lines: list[str], prefix: tuple[str, ...], table: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.extend(["", "[" + ".".join(_toml_key(part) for part in prefix) + "]"])
    lines.extend(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in scalars.items())
    for key, sub in tables.items():
        _emit_table(lines, (*prefix, key), sub)
