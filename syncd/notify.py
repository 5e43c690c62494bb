"""systemd notifications (sd_notify): readiness, watchdog pings, status line, stopping.

Speaks the datagram protocol directly (a few lines; no dependency). Without
``NOTIFY_SOCKET`` in the environment every call does nothing, so the daemon runs the same
outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify messages to the socket systemd named, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An address starting with "@" is in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        #: Seconds between watchdog pings (half of WatchdogSec), or None when not asked for.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with Type=notify."""
        return bool(self._address)

    def send(self, *fields: str) -> None:
        """Send one message of ``KEY=value`` fields; a failure is logged, never raised."""
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.warning("notify.failed", error=str(exc))

    def ready(self, status: str) -> None:
        """The daemon is fully up."""
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Update the one-line status systemctl shows."""
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        """The daemon is healthy."""
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        """The daemon is shutting down."""
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
