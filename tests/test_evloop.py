"""transport.evloop: uvloop when installed unless DAA_EVENT_LOOP=asyncio; `run` really runs
the coroutine on that loop."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from transport import evloop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_run_uses_the_loop_name_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAA_EVENT_LOOP", raising=False)
    have_uvloop = importlib.util.find_spec("uvloop") is not None
    assert evloop.name() == ("uvloop" if have_uvloop else "asyncio")
    assert evloop.run(loop_module()).startswith("uvloop" if have_uvloop else "asyncio")
    monkeypatch.setenv("DAA_EVENT_LOOP", "asyncio")
    assert evloop.name() == "asyncio"
    assert evloop.run(loop_module()).startswith("asyncio")
