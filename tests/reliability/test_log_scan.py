"""The log scan itself: it must see a secret however it is written, or it proves nothing."""

from __future__ import annotations

import base64

from syncd.testing import sign
from tests.reliability.conftest import ERP_TOKEN, WEBHOOK_SECRET, LogScan


def test_the_scan_finds_secrets_in_clear_encoded_and_as_signatures() -> None:
    scan = LogScan()
    body = b'{"message_type":"orderEvent"}'
    signature = sign(body, WEBHOOK_SECRET)
    scan.forbid("a signature", signature)
    assert scan.leaks('{"event": "ok", "latency_ms": 1.2}') == []
    assert scan.leaks(f'{{"token": "{ERP_TOKEN}"}}') == ["ERP token"]
    assert scan.leaks(f"Basic {base64.b64encode(ERP_TOKEN.encode()).decode()}") == [
        "ERP token (base64)"
    ]
    assert scan.leaks(f"X-MasonHub-Signature: {signature}") == ["a signature"]
    assert scan.leaks(f"sig={signature.removeprefix('sha256=')}") == ["a signature"]
