"""structlog set-up: one JSON object per line on stdout, secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog

from syncd import jsoncodec

REDACTED = "[redacted]"


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
    level = logging.DEBUG if debug else logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Any] = [
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=jsoncodec.dumps),
        SecretRedactor(secrets),
    ]
    out = stream or sys.stdout
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=cache,
    )
    # Libraries (APScheduler, alembic, aiohttp) log through the stdlib: same format.
    handler = logging.StreamHandler(out)
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
