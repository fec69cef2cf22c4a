"""`--coordinator` takes what people paste (host:port, the page's URL), and a server that never
answers fails after a bounded number of tries with what to check (issue 23, point 4)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from native_node.address import AddressError, coordinator_url
from native_node.client import NodeClient, NodeOptions
from transport.identity import load_or_create_identity


@pytest.mark.parametrize(("given", "url"), [
    ("127.0.0.1:8470", "ws://127.0.0.1:8470/ws"),
    ("http://127.0.0.1:8470/", "ws://127.0.0.1:8470/ws"),  # what `python -m server` prints
    ("http://127.0.0.1:8470/?contribute=0", "ws://127.0.0.1:8470/ws"),  # the page's URL
    ("  127.0.0.1:9000  ", "ws://127.0.0.1:9000/ws"),
    ("localhost", "ws://localhost:8470/ws"),  # no port: the server's default
    ("https://example.org/", "wss://example.org:443/ws"),
    ("ws://127.0.0.1:1/ws", "ws://127.0.0.1:1/ws"),
    ("[::1]:8470", "ws://[::1]:8470/ws"),
])
def test_accepted_spellings(given: str, url: str) -> None:
    assert coordinator_url(given)[0] == url


@pytest.mark.parametrize(("given", "says"), [
    ("", "empty"), ("ftp://h:1", "scheme"), ("h:99999", "port"), ("http://", "no host"),
    ("h:0", "port 0"),
])
def test_refused_spellings_say_why(given: str, says: str) -> None:
    with pytest.raises(AddressError, match=says):
        coordinator_url(given)


def test_nothing_listening_gives_up_with_what_to_check(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = NodeClient(NodeOptions(
        coordinator=f"http://127.0.0.1:{port}/", identity=load_or_create_identity(tmp_path),
        state_dir=tmp_path, progress=False, backoff_max_s=0.05, connect_tries=3))
    with caplog.at_level(logging.INFO):
        code = asyncio.run(asyncio.wait_for(client.run(), timeout=30))
    assert code == 3
    text = caplog.text
    assert "gave up after 3 tries" in text
    assert f"127.0.0.1:{port}" in text
    assert "HOST:PORT" in text
