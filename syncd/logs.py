"""structlog set-up: one JSON object per line on stdout, secrets redacted.

Lines from structlog, from libraries (stdlib logging) and from :func:`log_line` all reach
one :class:`LineSink`, each written whole, so lines from several threads never mix.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO, get_args

import structlog

from syncd import jsoncodec

REDACTED = "[redacted]"
Level = Literal["debug", "info", "warning", "error"]
_LEVELS = {name: logging.getLevelNamesMapping()[name.upper()] for name in get_args(Level)}


class SecretRedactor:
    """The last structlog processor: blanks configured secrets in the rendered JSON line.

    Code never logs a secret on purpose; this catches the accident (an exception message
    echoing a URL with a token, say). Working on the finished line, it finds a secret in any
    field, nested value or key, and costs a substring search per secret instead of a pass
    over every field. Inside JSON a secret appears escaped, so it is looked for in the forms
    the renderer writes: orjson's, and the standard library's with non-ASCII escaped.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        # Very short values would blank innocent text; the config refuses empty ones anyway.
        for secret in (s for s in secrets if len(s) >= 4):
            forms.add(jsoncodec.dumps(secret)[1:-1])
            forms.add(json.dumps(secret)[1:-1])
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, _logger: Any, _name: str, line: str) -> str:
        for form in self._forms:
            if form in line:
                line = line.replace(form, REDACTED)
        return line


class LineSink:
    """Writes finished lines to a stream: each whole, with its newline, and flushed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


#: The methods structlog may call on its logger: one per level, and msg.
_LOGGER_METHODS = (
    "msg",
    "log",
    "debug",
    "info",
    "warning",
    "warn",
    "error",
    "err",
    "critical",
    "fatal",
    "exception",
    "failure",
)


class _SinkLogger:
    """structlog's logger: the rendered line to the sink, whatever the level."""

    def __init__(self, sink: LineSink) -> None:
        for name in _LOGGER_METHODS:
            setattr(self, name, sink.write)


class _SinkHandler(logging.Handler):
    """Library log records (stdlib logging), formatted like structlog's, to the sink."""

    def __init__(self, sink: LineSink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sink.write(self.format(record))
        except Exception:
            self.handleError(record)


@dataclass(frozen=True)
class _Lines:
    """What configure_logging set up, for log_line."""

    sink: LineSink
    redactor: SecretRedactor
    level: int
    #: structlog's logger factory and wrapper class (its level filter) as configured.
    factory: Any
    wrapper: Any

    def in_use(self) -> bool:
        """True while structlog still has this set-up: nothing (a reset, capture_logs,
        demo's quieter level, another configure) replaced its logger factory, its level
        filter or its processors."""
        config = structlog.get_config()
        processors = config["processors"]
        return (
            config["logger_factory"] is self.factory
            and config["wrapper_class"] is self.wrapper
            and bool(processors)
            and processors[-1] is self.redactor
        )


_lines: _Lines | None = None


def log_line(event: str, level: Level, fields: dict[str, Any]) -> None:
    """Log ``fields`` as ``event``: the line structlog writes, without its processor chain.

    For the lines written per webhook (received, delivered). Measured in the running daemon
    at full load, the receiver's line took 45-55 µs of CPU through structlog and 21-24 µs
    this way, and the daemon accepted 1.14-1.27 times the webhooks per second
    (bench/RESULTS.md). The line has the same keys, timestamp and redaction, and goes to the
    same stream. ``fields`` gains the ``event``, ``level`` and ``timestamp`` keys, and any
    context variables bound with structlog. Whenever structlog is not set up as
    configure_logging left it (before it, after a reset, inside ``capture_logs``) the line
    goes through structlog.
    """
    lines = _lines
    if lines is None or not lines.in_use():
        getattr(structlog.get_logger("syncd"), level)(event, **fields)
        return
    if _LEVELS[level] < lines.level:
        return
    for key, value in structlog.contextvars.get_contextvars().items():
        fields.setdefault(key, value)
    fields["event"] = event
    fields["level"] = level
    fields["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    # A value JSON cannot hold is written as its repr, as structlog's renderer does.
    lines.sink.write(lines.redactor(None, level, jsoncodec.dumps(fields, default=repr)))


def configure_logging(
    *,
    debug: bool = False,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    cache: bool = True,
) -> None:
    """Send structlog and stdlib logging to ``stream`` (stdout) as JSON lines.

    ``cache=False`` lets a later call (a test) reconfigure loggers already used.
    """
    global _lines
    level = logging.DEBUG if debug else logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    redactor = SecretRedactor(secrets)
    renderer: list[Any] = [
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=jsoncodec.dumps),
        redactor,
    ]
    sink = LineSink(stream or sys.stdout)
    logger = _SinkLogger(sink)

    def factory(*_args: Any) -> _SinkLogger:
        return logger

    wrapper = structlog.make_filtering_bound_logger(level)
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    _lines = _Lines(sink, redactor, level, factory, wrapper)
    # Libraries (APScheduler, alembic, aiohttp) log through the stdlib: same format.
    handler = _SinkHandler(sink)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if not debug else logging.DEBUG)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
