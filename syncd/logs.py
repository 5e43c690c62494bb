"""structlog set-up: one JSON object per line on stdout, secrets redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

from syncd import jsoncodec

REDACTED = "[redacted]"


class SecretRedactor:
    """A structlog processor that blanks configured secrets wherever they appear in a field.

    Code never logs a secret on purpose; this catches the accident (an exception message
    echoing a URL with a token, say).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Very short values would blank innocent text; the config refuses empty ones anyway.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        if self._secrets:
            for key, value in event.items():
                if isinstance(value, str):
                    event[key] = self._scrub(value)
        return event

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


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
        SecretRedactor(secrets),
        structlog.processors.JSONRenderer(serializer=jsoncodec.dumps),
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
