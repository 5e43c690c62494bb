"""`syncd demo` end to end, as CI runs it: drops and duplicates on, everything must match."""

from __future__ import annotations

import subprocess
import sys

from tests.test_cli import ROOT


def test_demo_200_orders_matches() -> None:
    """syncd demo --orders 200 --seed 1 exits 0 with every order and SKU matched."""
    result = subprocess.run(
        [sys.executable, "-m", "syncd", "demo", "--orders", "200", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "faults: 5% of callbacks dropped, 5% duplicated" in out
    summary = [line for line in out.splitlines() if line.startswith("orders: ")][-1]
    orders, skus = summary.split("; ")
    matched, total = orders.split()[1].split("/")
    assert matched == total
    assert int(total) >= 200
    sku_matched, sku_total = skus.split()[1].split("/")
    assert sku_matched == sku_total
    assert out.rstrip().endswith("ERP matches MasonHub")
    dropped = [line for line in out.splitlines() if "(dropped " in line][-1]
    assert int(dropped.split("(dropped ")[1].split(")")[0]) > 0
    assert int(dropped.split("duplicates")[1].split()[0]) > 0


def test_demo_bad_arguments() -> None:
    """Nonsense demo arguments are bad usage: exit 2, one line."""
    result = subprocess.run(
        [sys.executable, "-m", "syncd", "demo", "--orders", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("syncd: error: demo:")
