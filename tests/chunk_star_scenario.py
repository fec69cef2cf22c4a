"""Run inside a private network namespace by tests/test_chunk_encode_star.py: a real server
with `--transport star --stream-chunk-mb 0.05 --codec int8-block --error-feedback` (llama
2m: 1.7 M values, Δ read and encoded in 2 chunks of 2^20 values), one real native node
process on the one-shot path (`--no-chunk-encode`) and one native node in this process
(NodeClient, chunked encoding: its update is encoded into a spool file and its chunks read
from there). This script drops the in-process node's data channel mid-transfer in round 0
and closes its WebSocket mid-transfer in the last round. Prints JSON of /api/run,
/api/rounds, /api/peers, the in-process node's counters, the logs and what was done to it.
`python -m tests.chunk_star_scenario DIR`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from bench.common import free_port, get_json
from native_node.client import NodeClient, NodeOptions
from shared.envelope import Identity
from shared.messages import Chunk, decode_message
from tests.conftest import Procs
from transport.rtc import StarUplink

ROUNDS = 2
CUT_AT = 3  # the channel (round 0) or the WebSocket (last round) goes before this chunk


def faults(done: dict[str, Any], client: NodeClient) -> None:
    """Patch StarUplink.send (this process's node only): round 0's channel drops before
    chunk CUT_AT, the last round's WebSocket closes before it."""
    orig = StarUplink.send

    async def send(self: StarUplink, frame: bytes) -> bool:
        if frame[5] == Chunk.TYPE:
            msg = decode_message(frame)
            assert isinstance(msg, Chunk)
            if msg.index == CUT_AT and msg.round == 0 and not done["cut"]:
                await asyncio.sleep(0.5)  # the chunks before it arrive and are verified
                await self.pc.close()  # the channel drops mid-transfer
                done["cut"] = True
            if msg.index == CUT_AT and msg.round == ROUNDS - 1 and not done["ws_cut"] \
                    and client.ws is not None:
                await asyncio.sleep(0.5)
                done["ws_cut"] = True
                await client.ws.close()  # the node reconnects; its new channel resumes it
        return await orig(self, frame)

    StarUplink.send = send  # type: ignore[method-assign]


async def main(tmp: Path) -> dict[str, Any]:
    procs = Procs(tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    done: dict[str, Any] = {"cut": False, "ws_cut": False}
    try:
        procs.server("server", tmp / "run", port, "--model", "llama", "--flavour", "2m",
                     "--inner-steps", "2", "--batch-size", "4", "--quorum", "2",
                     "--rounds", str(ROUNDS),
                     "--transport", "star", "--rtc-timeout-s", "20", "--deadline-s", "90",
                     "--stream-chunk-mb", "0.05", "--codec", "int8-block",
                     "--error-feedback")
        for _ in range(300):
            try:
                get_json(url + "/api/run")
                break
            except OSError:
                await asyncio.sleep(0.1)
        procs.node("oneshot", port, "--no-chunk-encode")
        client = NodeClient(NodeOptions(coordinator=f"127.0.0.1:{port}",
                                        identity=Identity.generate(),
                                        state_dir=tmp / "chunked", progress=False))
        faults(done, client)
        await asyncio.wait_for(client.run(), timeout=180)
        for _ in range(100):  # the server commits the last round before the node hears it
            if get_json(url + "/api/run")["status"] == "finished":
                break
            await asyncio.sleep(0.1)
        spool = tmp / "chunked" / "spool"
        return {"rounds": get_json(url + "/api/rounds"), "run": get_json(url + "/api/run"),
                "peers": get_json(url + "/api/peers"), "node_id": client.node_id,
                "route": dict(client.stream_route.counts), "counts": dict(client.part.counts),
                "sender": dict(client.uploader.sender.counts), "done": done,
                "spool_left": sorted(p.name for p in spool.glob("*")) if spool.is_dir()
                else [],
                "server_log": procs.log("server"), "oneshot_log": procs.log("oneshot"),
                "node_log": (tmp / "chunked.log").read_text()}
    finally:
        procs.kill_all()


if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    handler = logging.FileHandler(Path(sys.argv[1]) / "chunked.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
