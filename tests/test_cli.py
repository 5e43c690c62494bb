"""The command line as a user runs it: exit codes, one-line errors, the daemon's life cycle."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.testing import dumps, envelope, sign

ROOT = Path(__file__).resolve().parent.parent
SECRET = "cli-test-secret"


def syncd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    path: Path, db: Path, port: int = 0, *, auto_migrate: bool = False, admin_port: int = 0
) -> Path:
    path.write_text(
        f"""
[server]
port = {port}

[admin]
port = {admin_port}

[store]
url = "sqlite+aiosqlite:///{db}"
auto_migrate = {str(auto_migrate).lower()}

[webhooks]
signing_secrets = ["{SECRET}"]
"""
    )
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("syncd: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


EXAMPLE_ENV = {
    "MASONHUB_TOKEN": "mh-token-value",
    "MASONHUB_WEBHOOK_SECRET": "whsec-value",
    "ERP_TOKEN": "erp-token-value",
}


def test_check_config_prints_masked_settings() -> None:
    """check-config on the example prints the effective config, secrets masked, exit 0."""
    result = syncd("check-config", "--config", "config/syncd.example.toml", env=EXAMPLE_ENV)
    assert result.returncode == 0, result.stderr
    assert "[webhooks]" in result.stdout
    assert "********" in result.stdout
    for secret in EXAMPLE_ENV.values():
        assert secret not in result.stdout + result.stderr


def test_check_config_missing_secret() -> None:
    """A secret read from an unset environment variable: exit 2, the key named in one line."""
    env = {k: v for k, v in EXAMPLE_ENV.items() if k != "MASONHUB_WEBHOOK_SECRET"}
    clean = {k: v for k, v in os.environ.items() if k != "MASONHUB_WEBHOOK_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "syncd", "--config", "config/syncd.example.toml", "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert_one_line_error(
        result,
        "webhooks.signing_secrets[0]: environment variable MASONHUB_WEBHOOK_SECRET is not set",
    )


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        pytest.param('[erp]\ntimeout = "5 parsecs"', "erp.timeout", id="bad-duration"),
        pytest.param('[erp]\ntimout = "5s"', "erp.timout: unknown key", id="unknown-key"),
        pytest.param("[nonsense]\na = 1", "nonsense: unknown key", id="unknown-section"),
        pytest.param("[server]\nport = 99999", "server.port", id="bad-port"),
    ],
)
def test_check_config_bad_values(tmp_path: Path, extra: str, key: str) -> None:
    """A bad value or unknown key: exit 2 with the key named, no traceback."""
    path = tmp_path / "c.toml"
    path.write_text(f'[webhooks]\nsigning_secrets = ["s3cret"]\n{extra}\n')
    result = syncd("check-config", "--config", str(path))
    assert result.returncode == 2
    assert_one_line_error(result, key)


def test_check_config_unauthenticated_refused(tmp_path: Path) -> None:
    """A config with no secret and no token is reported: the daemon would refuse it."""
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 8080\n")
    result = syncd("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "signing_secrets or callback_token" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    """A config path that does not exist: exit 2 naming the path."""
    result = syncd("--config", str(tmp_path / "nope.toml"), "check-config")
    assert result.returncode == 2
    assert_one_line_error(result, "nope.toml")


def test_config_from_environment_variable(tmp_path: Path) -> None:
    """Without --config, $SYNCD_CONFIG names the file."""
    path = write_config(tmp_path / "c.toml", tmp_path / "x.db", port=8123)
    result = syncd("check-config", env={"SYNCD_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert "port = 8123" in result.stdout


def test_bad_usage_exit_2() -> None:
    """An unknown command is bad usage: exit 2."""
    assert syncd("frobnicate").returncode == 2


def test_migrate_then_already_current(tmp_path: Path) -> None:
    """migrate creates the schema once; a second run says it is already current."""
    path = write_config(tmp_path / "c.toml", tmp_path / "m.db")
    first = syncd("migrate", "--config", str(path))
    assert first.returncode == 0, first.stderr
    assert "migrated to revision" in first.stdout
    second = syncd("migrate", "--config", str(path))
    assert "already at revision" in second.stdout


def test_run_refuses_unmigrated_store(tmp_path: Path) -> None:
    """run on an empty database exits 1 telling the operator to migrate."""
    path = write_config(tmp_path / "c.toml", tmp_path / "empty.db")
    result = syncd("run", "--config", str(path))
    assert result.returncode == 1
    assert "syncd migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_newer_schema(tmp_path: Path) -> None:
    """run on a schema from a newer syncd exits 1 saying so."""
    import sqlite3

    db = tmp_path / "newer.db"
    path = write_config(tmp_path / "c.toml", db)
    assert syncd("migrate", "--config", str(path)).returncode == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
    result = syncd("run", "--config", str(path))
    assert result.returncode == 1
    assert "newer than this syncd" in result.stderr


def test_run_shortens_the_gil_switch_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon runs with a 1 ms GIL switch interval, so the event loop waits less for
    the store thread; other commands keep Python's default."""
    from syncd import cli

    seen: list[float] = []

    async def serve(*_args: object, **_kwargs: object) -> None:
        seen.append(sys.getswitchinterval())

    monkeypatch.setattr("syncd.app.serve", serve)
    monkeypatch.setattr(cli, "configure_logging", lambda **_kwargs: None)
    before = sys.getswitchinterval()
    path = write_config(tmp_path / "c.toml", tmp_path / "s.db")
    try:
        assert cli.main(["check-config", "--config", str(path)]) == 0
        assert sys.getswitchinterval() == before
        assert cli.main(["run", "--config", str(path)]) == 0
    finally:
        sys.setswitchinterval(before)
    assert seen == [pytest.approx(cli.SWITCH_INTERVAL)]
    assert before > cli.SWITCH_INTERVAL


def test_run_refuses_unauthenticated(tmp_path: Path) -> None:
    """run without any webhook authentication configured exits 2."""
    path = tmp_path / "c.toml"
    path.write_text(f'[store]\nurl = "sqlite+aiosqlite:///{tmp_path / "u.db"}"\n')
    result = syncd("run", "--config", str(path))
    assert result.returncode == 2
    assert "signing_secrets or callback_token" in result.stderr


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _post(url: str, body: bytes) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(  # noqa: S310 (loopback)
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-MasonHub-Signature": sign(body, SECRET)},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """A real `syncd run` process on SQLite with auto_migrate, and its port and log file."""
    port, admin_port = free_port(), free_port()
    path = write_config(
        tmp_path / "c.toml", tmp_path / "d.db", port, auto_migrate=True, admin_port=admin_port
    )
    log = tmp_path / "syncd.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "syncd", "run", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"syncd run exited early: {log.read_text()}")
        try:
            if _get(f"http://127.0.0.1:{admin_port}/readyz") == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("syncd run did not become ready")
    yield process, port, log
    if process.poll() is None:
        process.kill()
        process.wait()


def test_run_accepts_webhooks_and_stops_cleanly(
    daemon: tuple[subprocess.Popen[str], int, Path],
) -> None:
    """The daemon stores a signed callback, then SIGTERM stops it with exit 0 and a log line."""
    process, port, log = daemon
    url = f"http://127.0.0.1:{port}/webhooks/masonhub"
    body = dumps(envelope("orderEvent", [{"customer_identifier": "A-1"}], "cli-msg-1"))
    assert _post(url, body) == (200, {"status": "received"})
    assert _post(url, body) == (200, {"status": "duplicate"})
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line]
    assert events.count("webhook.accepted") == 2
    assert events[-1] == "syncd.stopped"
    assert events.index("syncd.stopping") < events.index("syncd.stopped")
    assert SECRET not in log.read_text()


def test_sigterm_lets_in_flight_request_finish(
    daemon: tuple[subprocess.Popen[str], int, Path], tmp_path: Path
) -> None:
    """A request whose body is still arriving when SIGTERM comes is stored and answered 200."""
    process, port, _log = daemon
    body = dumps(envelope("orderEvent", [{"customer_identifier": "A-2"}], "in-flight-1"))
    head = (
        f"POST /webhooks/masonhub HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-MasonHub-Signature: {sign(body, SECRET)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body[:10])
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        sock.sendall(body[10:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b'"received"' in answer
    assert process.wait(timeout=30) == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "d.db") as conn:
        keys = [row[0] for row in conn.execute("SELECT dedupe_key FROM inbox")]
    assert keys == ["in-flight-1"]
