"""Log lines: one JSON object each, and no configured secret in any of them."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from syncd.logs import REDACTED, configure_logging, log_line

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


def test_log_line_writes_what_structlog_writes(stream: io.StringIO) -> None:
    """The receiver's fast line has structlog's keys, values and timestamp form, context
    variables included."""
    fields = {"outcome": "received", "status": 200, "latency_ms": 1.5}
    with structlog.contextvars.bound_contextvars(request_id="r-1"):
        structlog.get_logger("t").info("webhook.accepted", **fields)
        log_line("webhook.accepted", "info", dict(fields))
    slow, fast = lines(stream)
    assert slow.keys() == fast.keys()
    assert {k: v for k, v in slow.items() if k != "timestamp"} == {
        k: v for k, v in fast.items() if k != "timestamp"
    }
    for line in (slow, fast):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", str(line["timestamp"]))
        assert line["request_id"] == "r-1"


def test_log_line_blanks_a_secret(stream: io.StringIO) -> None:
    """A caller-chosen value (a message id, a path) holding a secret is blanked too."""
    log_line("webhook.rejected", "warning", {"message_id": f"id-{TOKEN}", "path": f"/{AWKWARD}"})
    text = stream.getvalue()
    assert TOKEN not in text
    assert "caf" not in text
    (line,) = lines(stream)
    assert line["message_id"] == f"id-{REDACTED}"
    assert line["level"] == "warning"


def test_log_line_writes_a_value_json_cannot_hold_as_its_repr(stream: io.StringIO) -> None:
    """As structlog's renderer does: a log line never fails the request it describes."""
    log_line("x", "info", {"remote": ipaddress.ip_address("10.0.0.7")})
    structlog.get_logger("t").info("x", remote=ipaddress.ip_address("10.0.0.7"))
    fast, slow = lines(stream)
    assert fast["remote"] == slow["remote"] == "IPv4Address('10.0.0.7')"


def test_log_line_honours_the_level() -> None:
    """A debug line is written only when debug logging is on."""
    for debug, expected in ((False, 0), (True, 1)):
        out = io.StringIO()
        configure_logging(debug=debug, stream=out, cache=False)
        try:
            log_line("x.detail", "debug", {"n": 1})
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers.clear()
        assert len(out.getvalue().splitlines()) == expected


def test_log_line_without_configuration_goes_through_structlog(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before configure_logging (or after a reset) nothing is lost: structlog writes it."""
    configure_logging(stream=io.StringIO(), cache=False)
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()
    log_line("webhook.accepted", "info", {"message_id": "m-1"})
    assert "m-1" in capsys.readouterr().out


class _YieldingStream(io.StringIO):
    """A stream that lets other threads run in the middle of each write, as a pipe may."""

    def write(self, text: str) -> int:
        middle = len(text) // 2
        super().write(text[:middle])
        time.sleep(0)
        return super().write(text[middle:])


def test_log_line_follows_structlog_when_it_is_set_up_again(stream: io.StringIO) -> None:
    """Inside capture_logs (or any later configure) the line goes where structlog's go."""
    with structlog.testing.capture_logs() as captured:
        log_line("webhook.accepted", "info", {"message_id": "m-2"})
    assert captured == [{"message_id": "m-2", "event": "webhook.accepted", "log_level": "info"}]
    assert stream.getvalue() == ""


def test_log_line_follows_a_level_set_after_it(stream: io.StringIO) -> None:
    """A later, quieter level (as `syncd demo` sets) silences the fast line too."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    log_line("webhook.accepted", "info", {"message_id": "m-3"})
    assert stream.getvalue() == ""


def test_lines_from_many_threads_are_never_mixed() -> None:
    """structlog, library (stdlib) and fast lines written at once from several threads each
    come out whole, one JSON object a line, even when the stream lets threads in mid-write."""
    out = _YieldingStream()
    configure_logging(stream=out, cache=False)

    def write(n: int) -> None:
        for i in range(100):
            structlog.get_logger("t").info("a", n=n, i=i)
            logging.getLogger("lib").warning("b %s %s", n, i)
            log_line("c", "info", {"n": n, "i": i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert len(lines(out)) == 4 * 100 * 3
