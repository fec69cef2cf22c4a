"""The native node: drives shared.participant.Participant over a WebSocket, trains with torch.

Everything a participant decides in a round (handshake, server pin, params and deltas, codec
and error feedback, signing, resubmission, the journal entry, p2p readiness) lives in
shared/participant.py, the same class the browser tab and the simulator drive. This module
only carries out its events: it owns the socket (reconnect with backoff, handshake timeout),
the torch trainer and the scorer, the star uplink and the p2p role (aiortc), and the journal
file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import random
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np

from ml.byo import ByoError, check_allowed
from ml.data import DataSpec
from ml.scoring import ProbeScorer
from ml.tokenizer import TokenizerMismatch
from ml.workload import Workload, from_spec
from native_node import chunk_update, journal, pins
from native_node.address import coordinator_tls, coordinator_url
from native_node.dht import NodeDht
from native_node.distributed_trainer import DistributedTrainer
from native_node.stream_down import Downloader
from native_node.stream_rtc import StreamRoute
from native_node.stream_upload import Uploader
from native_node.trainer import Trainer
from native_node.training import TrainingMixin
from shared.chunk_encode import Spooled
from shared.envelope import Identity
from shared.messages import SERVER, ParamsChunk, Resume, Submit
from shared.participant import MAX_MESSAGE, Event, Participant
from shared.sparseloco import FEATURE as SPARSE_FEATURE
from shared.stream_down import FEATURE as STREAM_FEATURE

if TYPE_CHECKING:  # aiortc is imported only when a run uses the star or p2p transport
    from native_node.p2p import P2PRole
    from transport.rtc import StarUplink

log = logging.getLogger("native_node")
AGENT = "daa-prime-native/0.1"
VALIDATOR_SAMPLES = 512  # held-out rows a validator node scores on (the LAST ones)


class FatalError(Exception):
    """The server refused us for a reason a retry cannot fix."""


class Downgrade(Exception):
    """A plain ws:// connection to a server this node has seen over TLS: refused."""


def downgrade_message(what: str, state_dir: Path) -> str:
    return (f"refusing a plain ws:// connection: {what} spoke TLS to this node before "
            f"({state_dir / pins.TLS_FILENAME}); without TLS anyone on the path could read and "
            f"alter the traffic. Use https://... (or HOST:PORT once the server offers TLS "
            f"again); if the server really dropped TLS, remove the entry from that file. "
            f"Retrying with backoff; the journal is kept")


def cert_hint(where: str, exc: BaseException, ca: str | None) -> str:
    reason = getattr(exc, "certificate_error", None) or exc
    fix = (f"is --ca {ca} the CA that signed it?" if ca else
           "pass --ca FILE with the CA that signed it, or give the server a certificate the "
           "system trusts")
    return (f"the TLS certificate of {where} does not verify ({reason}): {fix} "
            f"(docs/operator.md, Deployment). Not falling back to plain ws://")


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    coordinator: str  # the server: host:port, its page's URL ... (native_node.address)
    identity: Identity  # this node's ML-DSA-65 key pair
    state_dir: Path  # where the identity lives
    device: str = "cpu"  # torch device
    data_path: str | None = None  # local copy of a text run's data file
    max_rounds: int = 0  # leave after this many submitted rounds (0: until the run ends)
    progress: bool = True  # show a progress bar per round
    backoff_max_s: float = 10.0  # longest wait between reconnect attempts
    server_id: str | None = None  # require this server key (else pin the first one per run)
    handshake_timeout_s: float = 10.0  # reconnect when no Welcome arrives within this
    role: str = "trainer"  # "trainer" or "validator" (scores others' updates, never trains)
    connect_tries: int = 10  # a server that never answered: give up after this many tries
    resolve_tries: int = 3  # ... and a host name that does not resolve after this many
    nproc: int = 1  # inner steps over this many processes (native_node/distributed_trainer.py)
    threads: int = 0  # torch CPU threads in all (0: torch's default)
    shard: str = "auto"  # with nproc > 1: "none" (DDP), "full" (FSDP), "auto" (FSDP if needed)
    ca: str | None = None  # CA bundle (PEM) for the server's TLS certificate (else the system's)
    region: str = ""  # a region label for hierarchical aggregation's groups (Hello feature)
    dht: bool = False  # run a Kademlia DHT node (native_node.dht; the server needs `dht`)
    allow_model: tuple[str, ...] = ()  # bring-your-own factories this node may import (ml.byo)
    chunk_encode: bool = True  # streamed runs: the update encoded by chunks (chunk_update)


class Backoff:
    """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s ... up to `cap`."""

    def __init__(self, cap: float, first: float = 0.25) -> None:
        self.cap, self.first, self.n = cap, first, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2.0 ** self.n)
        self.n += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.n = 0


def unreachable_hint(given: str, where: str, url: str, tries: int, *, dns: bool) -> str:
    """What to check when the server never answered."""
    host = where.rsplit(":", 1)[0]
    if dns:
        return (f"gave up after {tries} tries: the host name {host!r} (from --coordinator "
                f"{given!r}) does not resolve; check its spelling, or use the address "
                f"`python -m server` printed (open http://HOST:PORT/)")
    return (f"gave up after {tries} tries: nothing answered at {url}; check that the server "
            f"runs and that HOST:PORT ({where}) is the one it printed (open http://HOST:PORT/), "
            f"that --host lets it be reached from here, and that no firewall is in the way")


def _not_tls(exc: BaseException) -> bool:
    """Whether a failed TLS connection means the server speaks plain HTTP there (then a
    bare HOST:PORT goes on without TLS), not that TLS itself failed."""
    text = f"{exc} {exc.__cause__}".lower()
    return isinstance(exc, aiohttp.ServerDisconnectedError) or any(
        s in text for s in ("wrong version number", "record layer failure",
                            "packet length too long", "unexpected eof", "http request"))


def _local(where: str) -> bool:
    """Whether HOST:PORT names this machine or a private network (no warning for plain ws)."""
    host = where.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_private or addr.is_link_local


def with_sctp_tuning() -> None:
    """This process carries data over aiortc: apply the SCTP tuning (version-guarded)."""
    from transport import sctp_tuning

    if not sctp_tuning.installed():
        sctp_tuning.install()


class NodeClient(TrainingMixin):
    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.part = Participant(opts.identity, runtime="native", agent=AGENT,
                                device=opts.device, role=opts.role,
                                pins=pins.load(opts.state_dir),
                                save_pins=functools.partial(pins.save, opts.state_dir),
                                expected_server_id=opts.server_id)
        # applies sparseloco steps (numpy); fetches streamed RoundOpens (native_node.stream_down)
        self.part.extra_features = (SPARSE_FEATURE, STREAM_FEATURE)
        # run option overlap (shared.overlap): the one-process torch trainer trains ahead
        self.part.ahead.supported = opts.nproc == 1 and opts.role == "trainer"
        if opts.chunk_encode:  # streamed runs: Δ encoded by chunks into spool files
            self.part.spool = functools.partial(chunk_update.new_spool, opts.state_dir)
        self.rebase = None  # steps run ahead (native_node.training declares these)
        self.ahead_done = None
        self.last_train = None
        if opts.region:  # hierarchy (p2p_groups) groups members by it
            self.part.extra_features += (f"region={opts.region}",)
        self.work: Workload | None = None
        self.trainer: Trainer | DistributedTrainer | None = None
        self.scorer: ProbeScorer | None = None  # set when role is "validator"
        self.uplink: StarUplink | None = None  # WebRTC data channel (transport "star")
        self.p2p: P2PRole | None = None  # shard exchange with the other nodes ("p2p")
        self.dht: NodeDht | None = None  # peer discovery (opts.dht)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.uploader = Uploader(self.part)  # updates larger than Welcome.stream_chunk
        self.stream_route = StreamRoute(self)  # ... over the star data channel (stream_rtc)
        self.downloader = Downloader(self.part)  # RoundOpens in chunks (native_node.stream_down)
        self.tls = False  # whether the current connection is TLS (wss)
        self.task: asyncio.Task[None] | None = None
        self.cancel = threading.Event()
        self.stop = asyncio.Event()
        self.last_eval: float | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._recover_journal()

    def _recover_journal(self) -> None:
        """An update journaled before a crash is offered again when its round reopens."""
        try:
            entry = journal.load(self.opts.state_dir)
        except journal.JournalError as exc:
            journal.discard(self.opts.state_dir, str(exc))
            return
        if entry is None:
            return
        if not self.part.restore(entry):
            journal.discard(self.opts.state_dir, "damaged, of another version or another node")
            return
        log.info("journal: an update for round %d survived the restart; the error-feedback "
                 "residual did not (it starts again from zero)", self.pending_round)

    @property
    def node_id(self) -> str:
        return self.part.node_id

    @property
    def submitted(self) -> int:
        return int(self.part.counts["submitted"])

    @property
    def refused(self) -> int:
        return int(self.part.counts["refused_frames"])

    @property
    def pending_round(self) -> int | None:
        return self.part.pending.round if self.part.pending is not None else None

    # -- connection loop -----------------------------------------------------------------
    async def run(self) -> int:
        try:
            return await self._connect_loop()
        finally:
            if self.uplink is not None:
                await self.uplink.close()
            if self.p2p is not None:
                await self.p2p.close()
            self._close_trainer()

    def _close_trainer(self) -> None:
        if isinstance(self.trainer, DistributedTrainer):
            self.trainer.close()
        self.trainer = None

    async def _connect_loop(self) -> int:
        """Connect, run sessions, reconnect with backoff. A server that never answered fails
        after `connect_tries` attempts (a name that does not resolve after
        `resolve_tries`) with what to check; once a session ran, reconnects go on. TLS:
        https/wss always, http/ws never, a bare HOST:PORT when the server offers it; a plain
        connection to a server seen over TLS before is refused (a downgrade)."""
        backoff = Backoff(self.opts.backoff_max_s)
        url, where = coordinator_url(self.opts.coordinator)
        mode = coordinator_tls(self.opts.coordinator)
        rest = url.split("://", 1)[1]
        ssl_ctx = ssl.create_default_context(cafile=self.opts.ca)
        answered, failures, dns_failures = False, 0, 0
        async with aiohttp.ClientSession() as http:
            while not self.stop.is_set():
                use_tls = mode is not False
                try:
                    if not use_tls:
                        self._refuse_downgrade(where)
                    try:
                        ws = await http.ws_connect(f"{'wss' if use_tls else 'ws'}://{rest}",
                                                   heartbeat=20.0, max_msg_size=MAX_MESSAGE,
                                                   ssl=ssl_ctx if use_tls else False)
                    except aiohttp.ClientConnectorCertificateError:
                        raise
                    except (aiohttp.ClientSSLError, aiohttp.ServerDisconnectedError,
                            aiohttp.ClientOSError) as exc:
                        if mode is not None or not _not_tls(exc):
                            raise
                        use_tls = False  # HOST:PORT and the server speaks plain HTTP
                        self._refuse_downgrade(where)
                        ws = await http.ws_connect(f"ws://{rest}", heartbeat=20.0,
                                                   max_msg_size=MAX_MESSAGE)
                    async with ws:
                        self.ws, self.tls = ws, use_tls
                        answered = True
                        backoff.reset()
                        if use_tls:
                            await asyncio.to_thread(pins.record_tls, self.opts.state_dir,
                                                    address=where, server_id=None)
                        else:
                            log.log(logging.INFO if _local(where) else logging.WARNING,
                                    "connected to %s WITHOUT TLS (ws://): fine on a private "
                                    "network, not across the internet", where)
                        if await self._session(ws):
                            return 0
                except FatalError as exc:
                    log.error("%s", exc)
                    return 2
                except Downgrade as exc:
                    log.error("%s", exc)
                except (aiohttp.ClientError, ConnectionError, OSError) as exc:
                    dns = isinstance(exc, aiohttp.ClientConnectorDNSError)
                    failures += 1
                    dns_failures += dns
                    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
                        log.error("%s", cert_hint(where, exc, self.opts.ca))
                    else:
                        log.warning("server %s unreachable (%s)", where,
                                    exc.__class__.__name__)
                    if not answered and (failures >= self.opts.connect_tries
                                         or dns_failures >= self.opts.resolve_tries):
                        log.error("%s", unreachable_hint(self.opts.coordinator, where, url,
                                                         failures, dns=dns))
                        return 3
                finally:
                    self.ws = None
                if self.stop.is_set():
                    break
                delay = backoff.next()
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
        return 0

    def _refuse_downgrade(self, where: str) -> None:
        if where in pins.tls_seen(self.opts.state_dir)["addresses"]:
            raise Downgrade(downgrade_message(where, self.opts.state_dir))

    def shutdown(self) -> None:
        self.cancel.set()
        self.stop.set()
        if self.ws is not None:
            self._background(self.ws.close())

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """One connection. True when the run is over (or max_rounds reached)."""
        self.part.connection_made()
        joined = asyncio.Event()

        def handshake_timeout() -> None:  # a lost Challenge or Welcome must not hang us
            if not joined.is_set() and not ws.closed:
                log.warning("no welcome from the server within %.0f s; reconnecting",
                            self.opts.handshake_timeout_s)
                self._background(ws.close())

        timer = asyncio.get_running_loop().call_later(self.opts.handshake_timeout_s,
                                                      handshake_timeout)
        try:
            async for raw in ws:
                if raw.type != aiohttp.WSMsgType.BINARY:
                    continue
                if self.p2p is not None:  # hierarchy: a RoundOpen waits for the aggregate
                    await self.p2p.group.before_frame(raw.data)
                if raw.data[5:6] == bytes((Resume.TYPE,)):  # streamed update: send chunks
                    self.uploader.on_resume(self.stream_route.socket(ws), raw.data)
                    continue
                if raw.data[5:6] == bytes((ParamsChunk.TYPE,)):  # a streamed RoundOpen's chunk
                    if await self._events(await self.downloader.on_chunk(ws, raw.data)):
                        return True
                    continue
                for event in self.part.receive(raw.data):
                    if event["kind"] == "welcome":
                        joined.set()
                    more = [event] if event["kind"] != "params_stream" else \
                        await self.downloader.start(ws, event["message"])  # fetch its chunks
                    if await self._events(more):
                        return True
                if self.opts.max_rounds and self.submitted >= self.opts.max_rounds \
                        and self.part.pending is None:
                    log.info("submitted %d rounds; leaving", self.submitted)
                    return True
        finally:
            timer.cancel()
        if self.stop.is_set():
            return True
        log.warning("connection to the server closed")
        return False

    # -- the participant's events ----------------------------------------------------------
    async def on_event(self, ev: Event) -> bool:
        """Carry out one event; True when the run is over."""
        kind = ev["kind"]
        if kind in ("send", "stream"):
            await self._send_event(ev)
        elif kind == "welcome":
            await self._on_welcome(ev)
        elif kind in ("train", "train_ahead"):
            self._start_training(ev)
        elif kind == "cancel":
            self.cancel.set()
        elif kind == "journal":  # (a cleared journal also removes the spool files)
            await self._journal(ev["entry"])
        elif kind == "validate":
            await self._validate(ev)
        elif kind == "ready" and self.p2p is not None:
            self.p2p.trained(ev["round"], np.frombuffer(ev["delta"], dtype="<f4").copy())
        elif kind == "p2p" and self.p2p is not None:
            self.p2p.put(ev["message"])
        elif kind == "signal":
            await self._on_signal(ev)
        elif kind == "committed":
            return self._on_committed(ev)
        elif kind == "reconnect":
            log.warning("%s; reconnecting for the full params", ev["message"])
            if self.ws is not None:
                await self.ws.close()
        elif kind == "fatal":
            raise FatalError(f"server: {ev.get('code', 'refused')}: {ev['message']}"
                             if "code" in ev else ev["message"])
        elif kind == "secagg":
            self._on_secagg(ev)
        else:
            self._log_event(ev)
        return False

    async def _events(self, events: list[Event]) -> bool:
        """Carry out events in order; True when the run is over."""
        for event in events:
            if await self.on_event(event):
                return True
        return False

    def _on_secagg(self, ev: Event) -> None:
        """Secure aggregation: only the masked update left. With DAA_SECAGG_KEEP_PLAIN set (the
        e2e test) its fixed-point words are kept in the state dir, to check the sum against."""
        if ev["stage"] != "masked":
            log.info("round %d: trained; waiting for the secure-aggregation keys", ev["round"])
            return
        log.info("round %d: masked update sent (secure aggregation)", ev["round"])
        if os.environ.get("DAA_SECAGG_KEEP_PLAIN"):
            (self.opts.state_dir / f"secagg-plain-{ev['round']}.u32").write_bytes(ev["plain"])

    def _log_event(self, ev: Event) -> None:
        """The other events: logged (a relayed DHT message goes to the DHT carrier)."""
        kind = ev["kind"]
        if kind == "dht":
            if self.dht is not None:
                self.dht.on_relayed(ev["message"])
        elif kind == "ack":
            log.info("round %d: update %s (%s)", ev["round"], ev["status"], ev["digest"][:12])
        elif kind == "resubmit":
            log.info("round %d: resubmitting the update trained before the reconnect",
                     ev["round"])
        elif kind == "error":
            log.warning("server refused a message: %s: %s", ev["code"], ev["message"])
        elif kind == "refused":
            log.warning("ignoring a frame from the server: %s", ev["message"])

    async def _send(self, frame: bytes, *, is_update: bool = False) -> None:
        """With the star transport an update goes over the data channel when it is open."""
        if is_update and self.stream_route.takes(frame):  # star + streamed: stream_rtc
            await self.stream_route.start(frame)
            return
        if is_update and self.stream_route.deferred(frame):  # star channel not ready yet
            return
        if is_update and self.uplink is not None and await self.uplink.send(frame):
            return
        if self.ws is not None and not self.ws.closed:
            try:
                if is_update and self.uploader.wants(frame):  # in chunks (stream_upload)
                    await self.uploader.start(self.ws, frame)
                    return
                await self.ws.send_bytes(frame)
            except (ConnectionError, aiohttp.ClientError) as exc:
                log.warning("send failed (%s); an update is resubmitted after the reconnect",
                            exc)

    async def _send_event(self, ev: Event) -> None:
        """A frame to send, or ("stream") an update encoded into a spool (chunk_submit)."""
        if ev["kind"] == "stream":
            await self._send_spooled(ev["update"])
        else:
            await self._send(ev["frame"], is_update=ev["msg_type"] == Submit.TYPE)

    async def _send_spooled(self, update: Spooled) -> None:
        """Announce an update whose chunks are read from its spool (over the star data
        channel when this run has one: stream_rtc; else on the WebSocket)."""
        if self.stream_route.takes_spooled():
            await self.stream_route.start(update)
            return
        if self.ws is not None and not self.ws.closed:
            try:
                await self.ws.send_bytes(self.uploader.sender.start_spooled(update)["frame"])
            except (ConnectionError, aiohttp.ClientError) as exc:
                log.warning("send failed (%s); the update is resubmitted after the reconnect",
                            exc)

    async def _journal(self, entry: str | None) -> None:
        if entry is None:
            journal.clear(self.opts.state_dir)
            chunk_update.clear(self.opts.state_dir)  # no update pending: its spool goes
            return
        try:  # before the Submit goes out: after a crash from here on, resubmit, not retrain
            await asyncio.to_thread(journal.save, self.opts.state_dir, entry)
        except OSError as exc:
            log.warning("cannot journal the update (%s)", exc)

    async def _on_signal(self, ev: Event) -> None:
        if ev["from"] == SERVER and ev["signal"] == "answer":
            if self.uplink is not None:
                await self.uplink.on_answer(ev["data"])
        elif self.p2p is not None:
            await self.p2p.on_signal(ev["from"], ev["signal"], ev["data"])

    def _on_committed(self, ev: Event) -> bool:
        if ev["round"] >= 0:
            self.last_eval = ev["eval_loss"]
            loss = f"{ev['eval_loss']:.4f}" if ev["eval_loss"] is not None else "n/a"
            log.info("round %d committed: eval loss %s from %d updates", ev["round"], loss,
                     ev["n_updates"])
        if ev["final"]:
            self.cancel.set()  # steps run ahead (overlap) for a round that will not come
            log.info("the run is finished")
        return bool(ev["final"])

    async def _on_welcome(self, ev: Event) -> None:
        if self.work is None or self.work.model_id != ev["model_id"]:
            self.cancel.set()
            spec = DataSpec.from_dict(ev["data"])
            try:  # a server must not make this node import what it did not allow
                check_allowed(ev["model"], self.opts.allow_model)
                work = await asyncio.to_thread(from_spec, ev["model"], spec,
                                               local_path=self.opts.data_path,
                                               cache_dir=self.opts.state_dir / "datasets")
            except (ByoError, TokenizerMismatch) as exc:
                raise FatalError(str(exc)) from None
            if work.model_id != ev["model_id"] or work.n_params != ev["n_params"]:
                raise FatalError(f"model mismatch: server model id {ev['model_id'][:12]} "
                                 f"({ev['n_params']} params), rebuilt {work.model_id[:12]} "
                                 f"({work.n_params}); update this node's software")
            self.work = work
            if self.opts.role == "validator":
                self.scorer = ProbeScorer(work, VALIDATOR_SAMPLES, side="tail")
            elif self.opts.nproc > 1:  # one participant, N processes for the inner steps
                self._close_trainer()
                self.trainer = DistributedTrainer(
                    {"model": ev["model"], "data": ev["data"],
                     "local_path": self.opts.data_path,
                     "cache_dir": str(self.opts.state_dir / "datasets")},
                    shard=ev["shard"], n_shards=ev["n_shards"], node_id=self.node_id,
                    nproc=self.opts.nproc, device=self.opts.device, threads=self.opts.threads,
                    sharding=self.opts.shard)
            else:
                self.trainer = Trainer(work, shard=ev["shard"], n_shards=ev["n_shards"],
                                       node_id=self.node_id, device=self.opts.device)
        if self.part.layout is None:
            self.part.set_layout(self.work.manifest)
        await self._check_tls(ev["server_id"])
        await self._start_uplink(ev)
        await self._start_p2p(ev)
        self._start_dht(ev["run_id"])
        log.info("joined run %s as %s: %s, %d params, shard %d/%d, codec %s%s", ev["run_id"],
                 self.node_id[:12], ev["model"].get("name"), ev["n_params"], ev["shard"],
                 ev["n_shards"], ev["codec"], " + error feedback" if ev["error_feedback"] else "")

    async def _check_tls(self, server_id: str | None) -> None:
        """Remember a server key seen over TLS; refuse it over plain ws:// (a downgrade)."""
        if server_id is None:
            return
        if self.tls:
            _, where = coordinator_url(self.opts.coordinator)
            await asyncio.to_thread(pins.record_tls, self.opts.state_dir, address=where,
                                    server_id=server_id)
        elif server_id in pins.tls_seen(self.opts.state_dir)["servers"]:
            raise Downgrade(downgrade_message(f"server {server_id[:12]}",
                                              self.opts.state_dir))

    def _ice_servers(self) -> list[dict[str, Any]]:
        """The run's STUN/TURN servers from the Welcome (TURN credentials minted for us)."""
        welcome = self.part.welcome
        return list(welcome.ice_servers) if welcome is not None else []

    async def _probe_turn(self, ice: list[dict[str, Any]]) -> None:
        """Say clearly when the TURN server refuses our credential (aioice would only leave
        the relay candidate out): connections then go direct where the NATs allow, else
        through the server's relay."""
        from transport.rtc import probe_turn

        for server in ice:
            if not server["urls"].startswith("turn"):
                continue
            problem = await probe_turn(server)
            if problem is None:
                log.info("TURN server %s accepted this node's credential", server["urls"])
            else:
                log.error("%s; peer connections go direct where the NATs allow, else through "
                          "the server's relay", problem)

    async def _start_uplink(self, ev: Event) -> None:
        """transport "star": offer a data channel to the server's peer (relay on failure)."""
        if self.uplink is not None:
            await self.uplink.close()
            self.uplink = None
        if ev["transport"] != "star" or self.opts.role != "trainer":
            return
        with_sctp_tuning()
        from transport.rtc import StarUplink  # aiortc: ~0.3 s of start-up, only when used

        async def signal(kind: str, data: str) -> None:
            for out in self.part.signal(kind, data):
                await self.on_event(out)

        ice = self._ice_servers()
        if ice:
            self._background(self._probe_turn(ice))
        self.uplink = StarUplink(signal, timeout_s=ev["rtc_timeout_s"], ice_servers=ice)
        await self.uplink.start()
        self._background(self.uplink.wait_open())

    async def _start_p2p(self, ev: Event) -> None:
        if self.p2p is not None and self.p2p.run_id == ev["run_id"]:
            self.p2p.mesh.ice = self._ice_servers()  # fresh TURN credentials, new links
            return
        if ev["transport"] != "p2p" or self.opts.role != "trainer":
            return
        with_sctp_tuning()
        from native_node.p2p import P2PRole  # aiortc, only when used

        if self.p2p is not None:
            await self.p2p.close()
        ice = self._ice_servers()
        if ice:
            self._background(self._probe_turn(ice))
        welcome = self.part.welcome
        self.p2p = P2PRole(self.node_id, ev["run_id"], self.part.frame, self._send,
                           timeout_s=ev["rtc_timeout_s"], ice_servers=ice,
                           stream_chunk=welcome.stream_chunk if welcome is not None else 0)
        self.part.resolver = self.p2p.params

    def _start_dht(self, run_id: str) -> None:
        """Peer discovery (opts.dht): over the p2p mesh's channels where there is one, else
        the server's relay (native_node.dht)."""
        if not self.opts.dht:
            return
        if self.dht is not None and self.dht.run_id == run_id:  # a Welcome after a reconnect:
            self.dht.relay_restored()  # the server may have restarted with an empty table
            return
        if self.dht is not None:
            self._background(self.dht.close())
        mesh = self.p2p.mesh if self.p2p is not None else None
        self.dht = NodeDht(self.opts.identity, run_id, send_frame=self._send,
                           sign=self.part.frame, mesh=mesh)
        if self.p2p is not None:
            self.p2p.on_dht = self.dht.on_direct
        self.dht.start()
