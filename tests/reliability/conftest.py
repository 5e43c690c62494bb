"""The reliability suite's shared pieces: its scale, its secrets, and the log scan.

Every scenario uses the secrets below (and only these), and registers every log it makes:
the daemon's log files and, through ``capfd``, whatever the test process printed. After each
test the scan fails it if any secret, or any signature made with one, appears in a log.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

#: ``ci`` (small, inside ``make test``) or ``full`` (``make reliability``).
SCALE = os.environ.get("SYNCD_RELIABILITY", "ci")
FULL = SCALE == "full"

WEBHOOK_SECRET = "rel-webhook-secret-7f3a9c2e41d8"
CALLBACK_TOKEN = "rel-callback-token-b61e0d5a93f4"
ERP_TOKEN = "rel-erp-token-2c8e4b7f1a90"
MASONHUB_TOKEN = "rel-masonhub-token-d47a1e9b3c65"
SECRETS = {
    "webhook secret": WEBHOOK_SECRET,
    "callback token": CALLBACK_TOKEN,
    "ERP token": ERP_TOKEN,
    "MasonHub token": MASONHUB_TOKEN,
}


class LogScan:
    """What one test must not log: the secrets, their encodings, and signatures made."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.forbidden: dict[str, str] = {}
        for name, secret in SECRETS.items():
            self.forbid(name, secret)
            self.forbid(f"{name} (base64)", base64.b64encode(secret.encode()).decode())

    def watch(self, path: Path) -> Path:
        """Scan this log file at the end of the test."""
        self.files.append(path)
        return path

    def forbid(self, name: str, text: str) -> None:
        """``text`` (a signature the test sent, say) must not appear in any log."""
        if text.startswith("sha256="):
            text = text.removeprefix("sha256=")  # the bare hex is the signature too
        if len(text) >= 8:
            self.forbidden[text] = name

    def leaks(self, text: str) -> list[str]:
        """The names of everything forbidden that ``text`` contains."""
        return sorted({name for needle, name in self.forbidden.items() if needle in text})


@pytest.fixture(autouse=True)
def log_scan(capfd: pytest.CaptureFixture[str]) -> Iterator[LogScan]:
    """Fails the test if a secret or signature appears in what it (or its daemons) logged."""
    scan = LogScan()
    yield scan
    out, err = capfd.readouterr()
    sources = {"test output": out + err}
    for path in scan.files:
        if path.exists():
            sources[str(path)] = path.read_text(errors="replace")
    leaks = {where: found for where, text in sources.items() if (found := scan.leaks(text))}
    assert not leaks, f"secrets in logs: {leaks}"
