"""Run inside a private network namespace by tests/test_stream_rtc.py: a real server with
`--transport star --stream-chunk-mb 0.01` (gpt-tiny: 432 KB updates in 43 chunks), one real
native node process and one native node in this process (NodeClient), whose data channel this
script drops mid-transfer in round 0 and over which it slips bad chunks into the next
transfer that goes over a channel. Prints JSON of /api/run, /api/rounds, /api/peers, the
in-process node's path counts and what was done to it.
`python -m tests.stream_rtc_scenario DIR [--no-faults | --single]` (--no-faults: ICE is
expected to fail, the data channel's timeout is 2 s; --single: one-frame updates, the
WebSocket cut as round 1's Submit goes out)."""

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
from shared.messages import Chunk, Submit, decode_message
from tests.conftest import Procs
from transport.rtc import StarUplink

ROUNDS = 3
CUT_AT = 3  # round 0: the channel drops before this chunk goes (chunks 0..2 went over it)


def faults(done: dict[str, Any], client: NodeClient) -> None:
    """Patch StarUplink.send (this process's node only): the channel's cut, the bad chunks,
    then in the last round a cut of the node's WebSocket mid-transfer."""
    orig = StarUplink.send

    async def send(self: StarUplink, frame: bytes) -> bool:
        if frame[5] != Chunk.TYPE:
            return await orig(self, frame)
        msg = decode_message(frame)
        assert isinstance(msg, Chunk)
        if not done["ws_cut"] and msg.round == ROUNDS - 1 and msg.index == CUT_AT \
                and client.ws is not None:
            await asyncio.sleep(0.5)
            done["ws_cut"] = True
            await client.ws.close()  # the node reconnects; its new channel resumes it
        if not done["cut"] and msg.round == 0 and msg.index == CUT_AT:
            await asyncio.sleep(0.5)  # the chunks before it arrive and are verified
            await self.pc.close()  # the channel drops mid-transfer
            done["cut"] = True
        ok = await orig(self, frame)
        if ok and done["cut"] and not done["injected"] and msg.round > 0 and msg.index == 1:
            done["injected"], done["injected_round"] = True, msg.round
            bad = [Chunk(round=msg.round, digest=msg.digest, index=2,
                         payload=bytes(len(msg.payload))).to_frame(),  # bad_chunk: SHA-256
                   frame,  # duplicate_chunk
                   Chunk(round=msg.round, digest=msg.digest, index=40,
                         payload=msg.payload).to_frame(),  # chunk_out_of_window (2..17 now)
                   Chunk(round=msg.round, digest="00" * 32, index=0,
                         payload=msg.payload).to_frame()]  # foreign_chunk
            for b in bad:
                await self.link.send_frame(b)
        return ok

    StarUplink.send = send  # type: ignore[method-assign]


def single_fault(done: dict[str, Any], client: NodeClient) -> None:
    """One-frame updates: round 1's Submit is lost with the node's WebSocket, cut as it goes
    out; the node reconnects and resubmits it."""
    orig = StarUplink.send

    async def send(self: StarUplink, frame: bytes) -> bool:
        msg = decode_message(frame, max_payload=2**31 - 1)
        if not done["ws_cut"] and isinstance(msg, Submit) and msg.round == 1 \
                and client.ws is not None:
            done["ws_cut"] = True
            await client.ws.close()
            return True  # as if it went: the reconnect's resubmission must carry it
        return await orig(self, frame)

    StarUplink.send = send  # type: ignore[method-assign]


async def main(tmp: Path, mode: str) -> dict[str, Any]:
    with_faults = mode == "faults"
    procs = Procs(tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    done: dict[str, Any] = {"cut": False, "injected": False, "injected_round": None,
                            "ws_cut": False}
    try:
        procs.server("server", tmp / "run", port, "--model", "gpt-tiny", "--inner-steps", "3",
                     "--batch-size", "8", "--quorum", "2", "--rounds", str(ROUNDS),
                     "--transport", "star", "--rtc-timeout-s", "2" if mode == "no-faults" else "20",
                     "--deadline-s", "90",
                     "--stream-chunk-mb", "0" if mode == "single" else "0.01")
        for _ in range(300):
            try:
                get_json(url + "/api/run")
                break
            except OSError:
                await asyncio.sleep(0.1)
        procs.node("direct", port)
        client = NodeClient(NodeOptions(coordinator=f"127.0.0.1:{port}",
                                        identity=Identity.generate(), state_dir=tmp / "cut",
                                        progress=False))
        if with_faults:
            faults(done, client)
        elif mode == "single":
            single_fault(done, client)
        await asyncio.wait_for(client.run(), timeout=180)
        for _ in range(100):  # the server commits the last round before the node hears it
            if get_json(url + "/api/run")["status"] == "finished":
                break
            await asyncio.sleep(0.1)
        return {"rounds": get_json(url + "/api/rounds"), "run": get_json(url + "/api/run"),
                "peers": get_json(url + "/api/peers"), "cut_node": client.node_id,
                "route": dict(client.stream_route.counts), "done": done,
                "server_log": procs.log("server"), "direct_log": procs.log("direct"),
                "node_log": (tmp / "cut.log").read_text()}
    finally:
        procs.kill_all()


if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    mode = "no-faults" if "--no-faults" in sys.argv[2:] else \
        "single" if "--single" in sys.argv[2:] else "faults"
    handler = logging.FileHandler(Path(sys.argv[1]) / "cut.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    out = asyncio.run(main(Path(sys.argv[1]), mode))
    print(json.dumps(out))
