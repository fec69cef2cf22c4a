"""What issue 23 fixed in the server's answers: /api/run reports the flavour the model was
resolved to (not null where the config leaves it to the model's default), every /metrics
family has a HELP line, and /static/worker/ serves the tab's modules with their bare import
specifiers resolved (module workers get no import map)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ml.zoo import MODELS
from server.app import make_app
from server.browser_assets import (
    ISOLATION,
    VENDOR_DIR,
    rewrite_bare_imports,
    worker_import_map,
)
from server.runstate import open_run

IMPORTS = {"fzstd": "/w/vendor/fzstd/index.mjs", "@noble/hashes/": "/w/vendor/@noble/hashes/",
           "@noble/hashes/x/": "/w/vendor/x/"}


@asynccontextmanager
async def serve(tmp_path: Path, config: dict[str, Any]) -> AsyncIterator[Any]:
    """get(path) -> (status, text, headers) from a server of a fresh run of `config`."""
    run = open_run(tmp_path / "run", config)
    async with TestClient(TestServer(make_app(run))) as client:
        async def get(path: str) -> tuple[int, str, Any]:
            resp = await client.get(path)
            return resp.status, await resp.text(), resp.headers
        yield get


async def get(tmp_path: Path, config: dict[str, Any], path: str) -> tuple[int, str, Any]:
    async with serve(tmp_path, config) as get_:
        return await get_(path)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("config", "flavour"), [
    ({"model": "mlp-digits"}, MODELS["mlp-digits"].default_flavour),
    ({"model": "gpt-tiny"}, "nano"),
    ({"model": "mlp-digits", "flavour": "wide"}, "wide"),
])
async def test_api_run_reports_the_resolved_flavour(tmp_path: Path, config: dict[str, Any],
                                                    flavour: str) -> None:
    status, body, _ = await get(tmp_path, config, "/api/run")
    assert status == 200, body
    assert json.loads(body)["config"]["flavour"] == flavour


def families(text: str) -> tuple[dict[str, str], set[str], set[str]]:
    """(TYPE by family, families with HELP, families that have samples)."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    sampled: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            assert doc.strip(), line
            helps.add(name)
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            sampled.add(line.split("{")[0].split(" ")[0])
    return types, helps, sampled


@pytest.mark.parametrize("model", ["gpt-tiny", "mlp-digits"])
async def test_every_metrics_family_has_help_and_type(tmp_path: Path, model: str) -> None:
    status, text, _ = await get(tmp_path, {"model": model}, "/metrics")
    assert status == 200, text
    types, helps, sampled = families(text)
    assert len(types) >= 10, text
    assert set(types) == helps, f"TYPE without HELP: {set(types) - helps}; HELP without " \
                                f"TYPE: {helps - set(types)}"
    assert sampled <= set(types), f"samples of undeclared families: {sampled - set(types)}"
    assert ("daa_entropy_floor" in types) == (model == "gpt-tiny")


def test_bare_specifiers_resolve_like_an_import_map() -> None:
    src = ("import { a } from '@noble/hashes/sha2.js';\n"
           "import { b } from \"@noble/hashes/x/y.js\";\n"
           "export * from 'fzstd';\nconst m = await import('fzstd');\nimport './rel.js';\n"
           "import { c } from '../up.js';\nimport { d } from '/abs.js';\nimport 'node:fs';\n"
           "const s = 'not an import @noble/hashes/sha2.js';\n")
    out = rewrite_bare_imports(src, IMPORTS)
    assert "from '/w/vendor/@noble/hashes/sha2.js'" in out
    assert 'from "/w/vendor/x/y.js"' in out  # the longest matching prefix wins
    assert "from '/w/vendor/fzstd/index.mjs'" in out
    assert "import('/w/vendor/fzstd/index.mjs')" in out
    for kept in ("import './rel.js'", "from '../up.js'", "from '/abs.js'", "import 'node:fs'",
                 "'not an import @noble/hashes/sha2.js'"):
        assert kept in out


@pytest.mark.skipif(not (VENDOR_DIR / "manifest.json").is_file(),
                    reason="browser/vendor/ is not set up (./run.sh setup)")
async def test_worker_modules_have_no_bare_specifiers(tmp_path: Path) -> None:
    imports = worker_import_map()
    assert all(v.startswith("/static/worker/vendor/") for v in imports.values()
               if v.startswith("/static/"))
    async with serve(tmp_path, {"model": "mlp-digits"}) as get_:
        status, text, headers = await get_("/static/worker/node/identity.js")
        assert status == 200, text
        assert "from '/static/worker/vendor/@noble/hashes/sha2.js'" in text
        assert "from '@noble/" not in text
        for name, value in ISOLATION.items():  # a cross-origin-isolated page loads the worker
            assert headers[name] == value
        assert headers["Content-Type"].startswith("text/javascript")
        status, text, _ = await get_("/static/worker/vendor/@noble/post-quantum/ml-dsa.js")
        assert status == 200, text
        assert "from '@noble/" not in text
        status, text, _ = await get_("/static/worker/node/node_glue.py")  # as it is
        assert status == 200, text
        assert "def make_participant" in text
        status, _, _ = await get_("/static/worker/node/%2E%2E/%2E%2E/server/app.py")
        assert status == 404
