"""Coverage-guided fuzzing of the frame parser and message decoder (atheris / libFuzzer).

    python -m bench.fuzz_frames --seconds N [--corpus DIR] [--verbose]
    python -m bench.fuzz_frames --live --seconds N [--url URL] [--seed S]   (bench/fuzz_live.py)

Fuzzes `shared.messages.decode_message` (which runs `shared.frame.decode_frame`) with the
`shared` package instrumented for coverage. The seed corpus is built in code (valid frames for
every message type, payloads below and above the small limit, hand-made broken frames) plus
the `frame_hex` of every valid and invalid entry of `shared/testdata/frames.json`.

Per input:
  * decode with the default `max_payload`; any exception that is not a
    `shared.errors.ProtocolError` is a CRASH;
  * for half of the inputs (chosen by the input's CRC-32, so a saved input replays the same
    way) decode again with a small `max_payload` (4096) and check it agrees with the default
    decode: refused with `FrameTooLarge` exactly when the declared payload exceeds the limit,
    else the same outcome;
  * when the frame decodes, re-encode the message and decode it again: it must give an equal
    message. Failures of these two checks are INVARIANT failures (counted apart from crashes).

Crashes and invariant failures do not stop the run: each is counted and the first examples of
every distinct signature are written to `bench/results/fuzz-{crash,invariant}-<sha1>.bin` (the
input) and `.txt` (type, message, input hex, traceback). libFuzzer runs in a child process
(it ends the process with a C `exit()`, so nothing after it would run in-process): the child
counts inputs in a shared memory-mapped file, the parent restarts the child if something
escapes the target (a hang, a memory blow-up, a fatal signal) until N seconds are spent, then
prints a table and, as the LAST line, JSON with inputs, crashes, invariant_failures, seconds.
Exit status: 0, or 1 when a crash was found, 2 when atheris is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

from bench.common import ROOT, emit, print_table

# NOTE: nothing from `shared` is imported at module level: the worker must import it inside
# `atheris.instrument_imports()` for the package to be instrumented.

SMALL_MAX_PAYLOAD = 4096
RESULTS = ROOT / "bench" / "results"
FRAMES_JSON = ROOT / "shared" / "testdata" / "frames.json"
MAX_LEN = 12 * 1024  # largest input libFuzzer generates: room for payloads > SMALL_MAX_PAYLOAD
EXAMPLES_PER_SIGNATURE = 3  # inputs saved per distinct failure
MAX_SAVED = 100  # cap on saved failure inputs per worker run
MAX_RESTARTS = 20
STATS = struct.Struct("<QQQQ")  # inputs, crashes, invariant failures, small-limit decodes
HEX = "0123456789abcdef" * 4
INSTALL_HINT = "atheris is not installed: run `.venv/bin/pip install atheris` (Linux, CPython)"


def atheris_available() -> bool:
    return importlib.util.find_spec("atheris") is not None


# --------------------------------------------------------------------------- seed corpus

def _field_value(name: str, hint: Any, payload: bytes, none: bool) -> Any:
    """A value for field `name` that passes today's validators (best effort: the message
    schema evolves, and a seed that no longer validates is still a useful seed)."""
    import typing

    from shared.messages import sha256_hex

    by_name: dict[str, Any] = {
        "node_id": HEX, "model_id": "ab" * 32, "challenge": "cd" * 32, "nonce": "0f" * 16,
        "digest": sha256_hex(payload), "params_digest": sha256_hex(payload),
        "public_key": "5a" * 1952, "runtime": "browser" if none else "native",
        "status": "duplicate" if none else "accepted", "codec": "raw32", "shard": 0,
        "n_shards": 2, "length": max(1, len(payload) // 4), "deadline_s": 30.0,
        "agent": "daa-prime/0.1 \u00e9\u2603", "device": "webgpu" if none else "cpu",
        "code": "bad_frame", "protocol_version": 1, "codec_params": {"k": 0.01},
        "chunk_bytes": 1024,  # StreamSubmit: the smallest chunk
    }
    if name in by_name:
        return by_name[name]
    args = typing.get_args(hint)
    if type(None) in args:
        if none:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return not none
    if origin is int:
        return 3
    if origin is float:
        return 0.5
    if origin is dict:
        return {"kind": "gpt", "layers": [4, 8], "lr": 1e-3, "tied": True, "x": None}
    if origin is list:
        return []
    return "run-1"


def _alternatives(hint: Any) -> list[Any]:
    """Other values to try in a field a validator refused: for text, every enum value and
    name shared.messages defines (its tuples of strings and string constants) and an id."""
    import typing

    from shared import messages

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(args[0] if args else hint) or (args[0] if args else hint)
    if origin is str:
        texts = [v for name, v in vars(messages).items() if name.isupper()
                 and (isinstance(v, str) or (isinstance(v, tuple) and v
                                             and all(isinstance(s, str) for s in v)))]
        return [s for v in texts for s in ((v,) if isinstance(v, str) else v)] + [HEX]
    others: dict[Any, list[Any]] = {int: [0, 1], float: [0.0, 0.25], list: [[]]}
    return others.get(origin, [])


def valid_message(cls: Any, kw: dict[str, Any]) -> Any:
    """`cls(**kw)`, with each field the validators refuse swapped for its alternatives until
    the message is built and decodes back to itself (so a new message type, or a new check,
    still gets valid seeds). Raises the last error when no alternative satisfies them."""
    import typing

    from shared.errors import ProtocolError
    from shared.messages import decode_message

    hints, tried = typing.get_type_hints(cls), dict.fromkeys(kw, 0)
    while True:
        try:
            msg = cls(**kw)
            if decode_message(msg.to_frame()) == msg:
                return msg
            raise ValueError(f"{cls.__name__} does not decode back to itself")
        except ProtocolError as exc:
            name = exc.field
            if name is None or name not in kw:
                raise
            options = _alternatives(hints[name])
            if tried[name] >= len(options):
                raise
            kw[name] = options[tried[name]]
            tried[name] += 1


def seed_messages() -> tuple[dict[str, Any], dict[str, bytes]]:
    """Valid messages of every type in shared.messages.MESSAGE_TYPES (built from the
    dataclass fields: with optional fields set and None, with each payload size the type
    accepts), by label; and, by label, raw frames of the combinations no value satisfies."""
    import typing
    from array import array
    from dataclasses import fields

    from shared.errors import ProtocolError
    from shared.frame import encode_frame
    from shared.messages import MESSAGE_TYPES

    def floats(n: int) -> bytes:
        return array("f", [0.25 * (i % 17) - 2.0 for i in range(n)]).tobytes()

    messages: dict[str, Any] = {}
    raw: dict[str, bytes] = {}
    for type_id, cls in sorted(MESSAGE_TYPES.items()):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        payloads = [b"", floats(4), floats(SMALL_MAX_PAYLOAD // 4 + 64)] \
            if "payload" in names else [b""]
        for none in (False, True):
            for payload in payloads:
                kw = {n: payload if n == "payload" else _field_value(n, hints[n], payload, none)
                      for n in names}
                label = f"{cls.__name__.lower()}-{'none' if none else 'full'}-{len(payload)}"
                try:
                    messages[label] = valid_message(cls, dict(kw))
                except (ProtocolError, TypeError, ValueError):  # no valid value: raw frame
                    header = {k: v for k, v in kw.items() if k != "payload"}
                    raw[label + "-raw"] = encode_frame(type_id, header, payload)
    return messages, raw


def example_messages() -> dict[int, Any]:
    """One valid message of every type in shared.messages.MESSAGE_TYPES, by type id."""
    out: dict[int, Any] = {}
    for msg in seed_messages()[0].values():
        out.setdefault(msg.TYPE, msg)
    return out


def seed_inputs() -> dict[str, bytes]:
    """name -> frame bytes: valid frames of every message type (built from the dataclass
    fields, so new fields and types are covered), compressed and signed variants, frames
    broken in every header field, and the golden vectors of shared/testdata/frames.json."""
    from shared.errors import ProtocolError
    from shared.frame import FIXED_HEADER, MAGIC

    messages, seeds = seed_messages()
    seeds = {label: msg.to_frame() for label, msg in messages.items()} | seeds
    for label, msg in messages.items():  # compressed and signed variants, where supported
        with contextlib.suppress(TypeError, ValueError, ProtocolError, RuntimeError):
            packed = msg.to_frame(compress=True)
            if packed != seeds[label]:
                seeds[label + "-zstd"] = packed
        with contextlib.suppress(TypeError, ValueError, ProtocolError, RuntimeError):
            seeds[label + "-signed"] = msg.to_frame(sign=lambda digest: digest * 2)

    for label in [k for k in seeds if k.endswith("-full-0")]:  # JSON 1e999 -> inf in a dict
        if b'"lr":0.001' in seeds[label]:
            seeds[label + "-inf"] = seeds[label].replace(b'"lr":0.001', b'"lr":1e999')

    def raw(version: int = 1, msg_type: int = 1, flags: int = 0, head: bytes = b"{}",
            payload: bytes = b"", head_len: int | None = None, pay_len: int | None = None,
            magic: bytes = MAGIC) -> bytes:
        fixed = FIXED_HEADER.pack(magic, version, msg_type, flags,
                                  len(head) if head_len is None else head_len,
                                  len(payload) if pay_len is None else pay_len)
        return fixed + head + payload

    first = next(iter(seeds.values()))
    seeds |= {
        "empty": b"",
        "fixed-only": raw(head=b""),
        "truncated": first[:-1],
        "trailing": first + b"\0",
        "bad-magic": raw(magic=b"DAAQ"),
        "version-2": raw(version=2),
        "flag-1": raw(flags=1),
        "flag-2": raw(flags=2),
        "flag-8000": raw(flags=0x8000),
        "signed-short-trailer": raw(flags=1) + b"\x05",
        "signed-big-trailer": raw(flags=1) + b"\xff\xff",
        "zstd-garbage": raw(msg_type=4, flags=2, payload=b"\x28\xb5\x2f\xfd" + bytes(8)),
        "zstd-empty": raw(msg_type=4, flags=2, payload=b""),
        "header-too-large": raw(head_len=10**6),
        "payload-too-large": raw(pay_len=SMALL_MAX_PAYLOAD + 1),
        "payload-huge": raw(pay_len=2**32 - 1),
        "unknown-type": raw(msg_type=99),
        "type-0": raw(msg_type=0),
        "header-array": raw(head=b"[]"),
        "header-nan": raw(head=b'{"x":NaN}'),
        "header-big-float": raw(msg_type=7, head=b'{"eval_loss":1e999}'),
        "header-bad-utf8": raw(head=b'{"\xff":1}'),
        "header-deep": raw(head=b"[" * 5000 + b"]" * 5000),
        "header-surrogate": raw(head=b'{"agent":"\\ud800"}'),
        "first-indented": raw(msg_type=first[5], head=json.dumps(
            json.loads(first[16:16 + FIXED_HEADER.unpack_from(first)[4]]), indent=1).encode()),
        "first-with-payload": first[:12] + b"\x01\0\0\0" + first[16:] + b"x",
    }
    if FRAMES_JSON.exists():
        golden = json.loads(FRAMES_JSON.read_text(encoding="utf-8"))
        for kind in ("valid", "invalid"):
            for i, entry in enumerate(golden.get(kind, [])):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    label = entry.get("type") or entry.get("name") or str(i)
                    seeds[f"golden-{kind}-{i}-{label}"] = bytes.fromhex(entry["frame_hex"])
    return seeds


def fuzz_dictionary() -> list[bytes]:
    """libFuzzer dictionary tokens: field names, enum values, JSON oddities, the magic."""
    from dataclasses import fields

    from shared.messages import MESSAGE_TYPES

    tokens = {b"DAAP", b"null", b"true", b"false", b"1e999", b"-0.0", b"NaN", b"Infinity",
              b"\\ud800", b"\\u0000", b"\\n", b'""', b"{}", b"[]", b"native", b"browser",
              b"accepted", b"duplicate", b"raw32", HEX.encode()}
    for cls in MESSAGE_TYPES.values():
        tokens |= {f'"{f.name}":'.encode() for f in fields(cls)}  # type: ignore[arg-type]
    tokens |= {f'"{s}"'.encode() for s in _alternatives(str)}  # enum values: "p2p", "part"
    return sorted(tokens)


def write_dict(path: Path, tokens: list[bytes]) -> None:
    lines = []
    for tok in tokens:
        esc = "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02x}"
                      for b in tok)
        lines.append(f'"{esc}"')
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


# --------------------------------------------------------------------------- worker (child)

class Recorder:
    """Counts inputs in a shared mmap (exact even when libFuzzer ends the process with a C
    `exit()`), and appends every failure to an event file with unbuffered writes: a JSON line
    the first time a signature is seen (and for each saved example), its number after that."""

    def __init__(self, stats_path: Path, results: Path) -> None:
        self._file = open(stats_path, "r+b")  # noqa: SIM115 - lives as long as the worker
        self.mem = mmap.mmap(self._file.fileno(), STATS.size)
        self.inputs = self.crashes = self.invariants = self.small = 0
        self.results = results
        self.events = os.open(stats_path.with_suffix(".events"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.signatures: dict[str, list[int]] = {}  # signature -> [number, examples saved]
        self.saved = 0
        self.saved_stems: set[Path] = set()

    def flush(self) -> None:
        STATS.pack_into(self.mem, 0, self.inputs, self.crashes, self.invariants, self.small)

    def failure(self, kind: str, what: str, exc: BaseException | None, data: bytes) -> None:
        if kind == "crash":
            self.crashes += 1
        else:
            self.invariants += 1
        self.flush()
        where = "?"
        if exc is not None and exc.__traceback__ is not None:
            last = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{Path(last.filename).name}:{last.lineno}"
        etype = type(exc).__name__ if exc is not None else "-"
        text = re.sub(r"\\u[0-9a-fA-F]{4}|\\x[0-9a-fA-F]{2}|\d+", "N",
                      str(exc) if exc is not None else "")[:80]
        sig = f"{kind}|{what}|{etype}|{where}|{text}"
        entry = self.signatures.get(sig)
        new = entry is None
        if entry is None:
            entry = self.signatures[sig] = [len(self.signatures), 0]
        event: dict[str, Any] = {"id": entry[0]}
        if new:
            event |= {"sig": sig, "kind": kind, "what": what, "type": etype, "where": where,
                      "message": str(exc) if exc is not None else what}
        stem = self.results / f"fuzz-{kind}-{hashlib.sha1(data).hexdigest()[:16]}"
        if (entry[1] < EXAMPLES_PER_SIGNATURE and self.saved < MAX_SAVED
                and stem not in self.saved_stems):
            entry[1] += 1
            self.saved += 1
            self.saved_stems.add(stem)
            tb = "".join(traceback.format_exception(exc)) if exc is not None else ""
            stem.with_suffix(".bin").write_bytes(data)
            stem.with_suffix(".txt").write_text(
                f"kind: {kind}\ncheck: {what}\ntype: {etype}\n"
                f"message: {exc if exc is not None else what}\nwhere: {where}\n"
                f"input ({len(data)} bytes) hex:\n{data.hex()}\n\n{tb}", encoding="utf-8")
            event["file"] = str(stem.with_suffix(".bin"))
        line = json.dumps(event) if len(event) > 1 else str(entry[0])
        os.write(self.events, (line + "\n").encode())


def read_events(path: Path) -> dict[int, dict[str, Any]]:
    """The failure event file of one worker run -> {signature number: record with count}."""
    sigs: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return sigs
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        event = json.loads(line) if line.startswith("{") else {"id": int(line)}
        rec = sigs.setdefault(event["id"], {"count": 0, "files": []})
        rec.update({k: v for k, v in event.items() if k not in ("id", "file")})
        rec["count"] += 1
        if "file" in event:
            rec["files"].append(event["file"])
    return sigs


def make_target(rec: Recorder, small_max: int) -> Any:
    from shared.errors import FrameTooLarge, ProtocolError
    from shared.frame import FIXED_HEADER, FIXED_LEN
    from shared.messages import decode_message

    def decode(data: bytes, limit: int | None) -> tuple[Any, BaseException | None, bool]:
        """(message or None, ProtocolError or None, crashed)."""
        try:
            msg = decode_message(data) if limit is None else decode_message(
                data, max_payload=limit)
        except ProtocolError as exc:
            return None, exc, False
        except Exception as exc:  # the bug class this harness hunts
            what = "decode_message" if limit is None else f"decode_message(max={limit})"
            rec.failure("crash", what, exc, data)
            return None, None, True
        return msg, None, False

    def target(data: bytes) -> None:
        rec.inputs += 1
        rec.flush()
        msg, err, crashed = decode(data, None)
        if crashed:
            return
        if zlib.crc32(data) & 1:  # half of the inputs: the small payload limit too
            rec.small += 1
            msg_s, err_s, crashed_s = decode(data, small_max)
            if crashed_s:
                return
            pay_len = FIXED_HEADER.unpack_from(data)[5] if len(data) >= FIXED_LEN else 0
            too_big = pay_len > small_max
            inflated = len(getattr(msg, "payload", b"")) if msg is not None else 0
            if msg is not None and too_big:  # refused before anything past the fixed header
                ok = isinstance(err_s, FrameTooLarge)
            elif msg is not None and inflated > small_max:  # a zstd payload inflating past it
                ok = msg_s is None and err_s is not None
            elif msg is not None:
                ok = msg_s == msg
            else:  # refused with the default limit: refused with the smaller one too
                ok = msg_s is None and err_s is not None
            if not ok:
                rec.failure("invariant", f"decode with max_payload={small_max} disagrees with "
                            "the default", err_s or err, data)
        if msg is None:
            return
        try:  # decode(encode(decode(x))) == decode(x)
            again = decode_message(msg.to_frame())
        except Exception as exc:
            rec.failure("invariant", "decoded message does not re-encode/decode", exc, data)
            return
        if again != msg:
            rec.failure("invariant", "re-encoded message decodes to a different message",
                        None, data)

    return target


def worker(args: argparse.Namespace, libfuzzer_argv: list[str]) -> int:
    if not atheris_available():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    import atheris

    assert "shared.messages" not in sys.modules, "shared imported before instrumentation"
    with atheris.instrument_imports(include=["shared"]):
        import shared.errors
        import shared.frame
        import shared.messages  # noqa: F401
    rec = Recorder(Path(args.stats), Path(args.results))
    target = make_target(rec, args.small_max_payload)
    atheris.Setup([sys.argv[0], *libfuzzer_argv], target)
    atheris.Fuzz()  # libFuzzer ends the process itself (C exit), nothing after this runs
    return 0


# --------------------------------------------------------------------------- parent

def read_stats(path: Path) -> tuple[int, int, int, int]:
    data = path.read_bytes()
    return STATS.unpack_from(data) if len(data) >= STATS.size else (0, 0, 0, 0)


def _show(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="daa-fuzz-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus).resolve() if args.corpus else work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seed_dir = work / "seeds"
    seed_dir.mkdir()
    seeds = seed_inputs()
    for name, data in seeds.items():
        (seed_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.bin").write_bytes(data)
    dict_path = work / "frames.dict"
    write_dict(dict_path, fuzz_dictionary())
    log_path = results / "fuzz-frames.log"
    log_path.write_bytes(b"")
    corpus_before = sum(1 for p in corpus.iterdir() if p.is_file())

    totals = [0, 0, 0, 0]
    signatures: dict[str, dict[str, Any]] = {}
    worker_exits: list[dict[str, Any]] = []
    corp_units = 0
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    runs = 0
    while runs <= MAX_RESTARTS:
        remaining = deadline - time.monotonic()
        if remaining < 1 and runs > 0:
            break
        runs += 1
        stats = work / f"stats-{runs}.bin"
        stats.write_bytes(bytes(STATS.size))
        cmd = [sys.executable, "-m", "bench.fuzz_frames", "--worker", "--stats", str(stats),
               "--results", str(results), "--small-max-payload", str(args.small_max_payload),
               "--", f"-max_total_time={max(1, round(remaining))}", f"-max_len={MAX_LEN}",
               "-timeout=10", "-rss_limit_mb=4096", f"-dict={dict_path}",
               f"-artifact_prefix={results}/fuzz-artifact-", "-print_final_stats=1",
               str(corpus), str(seed_dir)]
        with open(log_path, "ab") as log:
            log.write(f"=== worker run {runs}: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                                    stderr=None if args.verbose else subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                rc = proc.wait(timeout=remaining + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        counts = read_stats(stats)
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
        for rec in read_events(stats.with_suffix(".events")).values():
            key = rec["sig"]
            if key in signatures:
                signatures[key]["count"] += rec["count"]
                signatures[key]["files"] += rec["files"]
            else:
                signatures[key] = rec
        tail = log_path.read_text(encoding="utf-8", errors="replace")
        units = re.findall(r"corp: (\d+)/", tail.rsplit("=== worker run", 1)[-1])
        corp_units = int(units[-1]) if units else corp_units
        if rc == 2 and counts[0] == 0:
            print(INSTALL_HINT, file=sys.stderr)
            return 2
        if rc != 0:  # something escaped the target: a hang, OOM, fatal signal, ...
            arts = re.findall(r"Test unit written to (\S+)", tail.rsplit("=== worker run", 1)[-1])
            worker_exits.append({"rc": rc, "artifact": arts[-1] if arts else None,
                                 "after_inputs": counts[0]})
            if counts[0] == 0:
                print(f"fuzz worker failed before running any input (rc {rc}); see {log_path}",
                      file=sys.stderr)
                break
            continue
        if time.monotonic() >= deadline - 1:
            break
    seconds = time.monotonic() - t0
    inputs, crashes, invariants, small = totals
    crashes += len(worker_exits)
    corpus_files = sum(1 for p in corpus.iterdir() if p.is_file())

    print_table([{
        "inputs": inputs, "exec_s": round(inputs / seconds) if seconds else 0,
        "crashes": crashes, "invariant_fail": invariants, "small_limit": small,
        "corpus": corp_units, "seeds": len(seeds), "new_files": corpus_files - corpus_before,
        "seconds": f"{seconds:.1f}", "workers": runs,
    }], ["inputs", "exec_s", "crashes", "invariant_fail", "small_limit", "corpus", "seeds",
         "new_files", "seconds", "workers"])
    for rec in signatures.values():
        print(f"\n{rec['kind'].upper()} x{rec['count']}: {rec['what']}: {rec['type']} at "
              f"{rec['where']}: {rec['message'][:200]}")
        for f in rec["files"][:EXAMPLES_PER_SIGNATURE]:
            print(f"  input: {_show(Path(f))} (+ .txt with hex and traceback)")
    for ex in worker_exits:
        print(f"\nCRASH: fuzz worker exited with rc {ex['rc']} after {ex['after_inputs']} "
              f"inputs; artifact {ex['artifact']}; log {log_path}")
    if args.corpus:
        print(f"\nlibFuzzer log: {_show(log_path)}; corpus kept in {corpus}")
    else:
        print(f"\nlibFuzzer log: {_show(log_path)}; corpus discarded (keep it with --corpus DIR)")
    emit({"inputs": inputs, "crashes": crashes, "invariant_failures": invariants,
          "seconds": round(seconds, 2)})
    return 1 if crashes else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, libfuzzer_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m bench.fuzz_frames", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="fuzzing time budget")
    p.add_argument("--corpus", help="persistent corpus directory (default: a temp dir)")
    p.add_argument("--results", default=str(RESULTS), help="where failures and the log go")
    p.add_argument("--small-max-payload", type=int, default=SMALL_MAX_PAYLOAD)
    p.add_argument("--verbose", action="store_true", help="show libFuzzer's output live")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    p.add_argument("--live", action="store_true", help="fuzz a real server over its WebSocket "
                   "with a registered identity (bench/fuzz_live.py)")
    p.add_argument("--url", help="--live: target this running server instead of starting one")
    p.add_argument("--seed", type=int, default=0, help="--live: the mutator's seed")
    args = p.parse_args(ours)
    if args.live:
        from bench.fuzz_live import run_live

        return run_live(args)
    if args.worker:
        return worker(args, libfuzzer_argv)
    if not atheris_available():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    if args.seconds <= 0:
        p.error("--seconds must be > 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
