"""Log lines: one JSON object each, and no configured secret in any of them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from syncd.logs import REDACTED, configure_logging

TOKEN = "erp-token-0123456789"
#: A secret that JSON must escape: a quote, a backslash, a non-ASCII character.
AWKWARD = 'whsec"back\\slash-caf\u00e9'


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging(secrets=[TOKEN, AWKWARD, "abc"], stream=out, cache=False)
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_secret_is_blanked_wherever_it_is_logged(stream: io.StringIO) -> None:
    """In a field, inside a longer text, nested in a mapping or a list, or as a key."""
    structlog.get_logger("t").warning(
        "erp.failed",
        error=f"GET http://erp/?token={TOKEN} failed",
        headers={"Authorization": f"Bearer {TOKEN}"},
        tried=[TOKEN, "other"],
        **{TOKEN: 1},
    )
    text = stream.getvalue()
    assert TOKEN not in text
    (line,) = lines(stream)  # still one valid JSON object
    assert line["error"] == f"GET http://erp/?token={REDACTED} failed"
    assert line["headers"] == {"Authorization": f"Bearer {REDACTED}"}
    assert line["tried"] == [REDACTED, "other"]
    assert line[REDACTED] == 1


def test_a_secret_that_json_escapes_is_blanked_too(stream: io.StringIO) -> None:
    """orjson writes it with its quote and backslash escaped; the standard library (taking
    what orjson refuses, here a non-string key) also escapes the non-ASCII character."""
    log = structlog.get_logger("t")
    log.warning("one", detail=f"secret {AWKWARD} here")
    log.warning("two", detail=f"secret {AWKWARD} here", counts={1: "int key"})
    for line in lines(stream):
        assert line["detail"] == f"secret {REDACTED} here"
    assert "caf" not in stream.getvalue()


def test_library_log_records_are_rendered_and_blanked(stream: io.StringIO) -> None:
    """A library logging through the standard library gets the same JSON line and redaction."""
    logging.getLogger("aiohttp.client").warning("retrying with %s", TOKEN)
    (line,) = lines(stream)
    assert line["event"] == f"retrying with {REDACTED}"
    assert line["logger"] == "aiohttp.client"


def test_short_values_are_not_treated_as_secrets(stream: io.StringIO) -> None:
    """A secret under four characters would blank innocent text; the config refuses those."""
    structlog.get_logger("t").info("x", word="abcdef")
    assert lines(stream)[0]["word"] == "abcdef"
