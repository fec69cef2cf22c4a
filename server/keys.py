"""Typed aiohttp application state keys."""

from __future__ import annotations

from aiohttp import web

from server.coordinator import Coordinator
from server.runstate import RunState

COORDINATOR = web.AppKey("coordinator", Coordinator)
RUN = web.AppKey("run", RunState)
