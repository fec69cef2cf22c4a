"""bench.signatures runs, and both implementations' signatures verify (it exits otherwise)."""

from __future__ import annotations

import json

import pytest

from bench import signatures


def test_bench_signatures_reports_both_implementations(capsys: pytest.CaptureFixture[str]) -> None:
    signatures.main(["--repeats", "3"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["pqcrypto"]["secret_key_bytes"] == 4032
    assert figures["cryptography"]["secret_key_bytes"] == 32
    assert figures["cryptography"]["sign_ms"] > 0
    assert figures["sign_speedup"] > 0
