"""Generate shared/testdata/frames.json: golden wire vectors for every message type.

Run from anywhere:  python shared/testdata/make_golden.py  (rewrites frames.json)
                    python shared/testdata/make_golden.py --check  (exit 1 if stale)

The JSON is deliberately plain so other implementations (the browser's JavaScript) can check
their encoder and decoder against the Python one byte for byte:

    {"version": 1,
     "valid":   [{"type": "Hello", "msg_type": 1, "fields": {...}, "payload_hex": "...",
                  "frame_hex": "..."}],
     "invalid": [{"name": "...", "frame_hex": "...", "code": "...", "field": "..."}]}

`signed` holds a TEST ML-DSA-65 key pair and frames signed with it (shared.envelope): every
implementation must verify them, and frames it signs with that key must verify in Python.

`fields` are the header fields exactly as they travel (JSON values); `payload_hex` is the
binary payload ("" for messages without one). Every float in the vectors has a fractional
part and a short decimal form, so its JSON text is the same in Python and JavaScript.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = HERE / "frames.json"
FORMAT_VERSION = 1

NODE_A = "0123456789abcdef" * 4
NODE_B = "fedcba9876543210" * 4
RUN = "run-7f3a"
CHALLENGE = "c0ffee00" * 8
NONCE = "5eed" * 8

if str(ROOT) not in sys.path:  # run as a script: make `shared` importable
    sys.path.insert(0, str(ROOT))


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _changes(prev: bytes, new: bytes) -> bytes:
    import numpy as np

    from shared.downlink import encode_changes

    out = encode_changes(np.frombuffer(prev, "<f4"), np.frombuffer(new, "<f4"))
    assert out is not None
    return out


def valid_examples() -> list[tuple[str, dict[str, Any], bytes]]:
    """(type name, header fields, payload) for one fixed example of each message type."""
    from shared.messages import sha256_hex

    params = _f32(1.0, -2.5, 0.125, 3.75)
    new_params = _f32(1.0, -2.0, 0.125, 3.75)  # one coordinate changed: a params delta
    changes = _changes(params, new_params)
    update = b"\x00" + _f32(0.5, -0.25, 0.0, -0.0)  # raw32: wire id 0, then float32 LE
    # a streamed RoundOpen payload (shared.stream_down): 2049 bytes in chunks of 1024
    stream_payload = bytes(range(256)) * 8 + b"\x07"
    stream_manifest = b"".join(hashlib.sha256(stream_payload[i:i + 1024]).digest()
                               for i in range(0, len(stream_payload), 1024))
    return [
        ("Challenge", {"run_id": RUN, "challenge": CHALLENGE,
                       "server_public_key": "a1b2" * 4, "protocol_version": 1,
                       "agent": "daa-prime-server/0.1"}, b""),
        ("Hello", {"node_id": NODE_A, "public_key": "00ff" * 4, "challenge": CHALLENGE,
                   "nonce": NONCE, "runtime": "browser", "agent": "daa-prime/0.1 é",
                   "device": "webgpu", "role": "trainer", "features": "delta-params"}, b""),
        ("Welcome", {"run_id": RUN, "node_id": NODE_A,
                     "model": {"kind": "mlp", "layers": [4, 8, 4], "seed": 7},
                     "model_id": "ab" * 32,
                     "data": {"name": "markov", "order": 1, "vocab": 4},
                     "shard": 1, "n_shards": 3, "codec": "topk",
                     "codec_params": {"fraction": 0.25, "values": "int8"},
                     "error_feedback": True, "n_params": 4, "transport": "star",
                     "rtc_timeout_s": 2.5, "worker_momentum": 0.9,
                     "ice_servers": [{"urls": "stun:10.200.0.1:3478", "username": "",
                                      "credential": ""},
                                     {"urls": "turn:10.200.0.1:3478?transport=udp",
                                      "username": "1767225600:" + NODE_A[:12],
                                      "credential": "c2VjcmV0"}],
                     "secagg": True, "stream_chunk": 4194304, "overlap": True}, b""),
        ("RoundOpen", {"run_id": RUN, "round": 5, "attempt": 1,
                       "params_digest": sha256_hex(params), "deadline_s": 29.5,
                       "inner_steps": 10, "inner_lr": 0.001, "batch_size": 16,
                       "base_digest": None, "with_momentum": False,
                       "time_budget_s": None, "codec": "", "topk_fraction": 0.01,
                       "dp_clip": None, "dp_sigma": 0.0, "dp_participants": 0,
                       "stream_size": 0, "chunk_bytes": 0}, params),
        ("RoundOpen", {"run_id": RUN, "round": 5, "attempt": 0,  # streamed: the manifest
                       "params_digest": sha256_hex(params), "deadline_s": 29.5,
                       "inner_steps": 10, "inner_lr": 0.001, "batch_size": 16,
                       "base_digest": None, "with_momentum": False,
                       "time_budget_s": None, "codec": "", "topk_fraction": 0.01,
                       "dp_clip": None, "dp_sigma": 0.0, "dp_participants": 0,
                       "stream_size": 2049, "chunk_bytes": 1024}, stream_manifest),
        ("RoundOpen", {"run_id": RUN, "round": 5, "attempt": 0,
                       "params_digest": sha256_hex(params), "deadline_s": 29.5,
                       "inner_steps": 10, "inner_lr": 0.001, "batch_size": 16,
                       "base_digest": None, "with_momentum": True,
                       "time_budget_s": None, "codec": "", "topk_fraction": 0.01,
                       "dp_clip": None, "dp_sigma": 0.0, "dp_participants": 0,
                       "stream_size": 0, "chunk_bytes": 0},
         params + params[::-1]),
        ("RoundOpen", {"run_id": RUN, "round": 6, "attempt": 0,
                       "params_digest": sha256_hex(new_params), "deadline_s": 30.5,
                       "inner_steps": 10, "inner_lr": 0.001, "batch_size": 16,
                       "base_digest": sha256_hex(params), "with_momentum": False,
                       "time_budget_s": 12.5, "codec": "topk", "topk_fraction": 0.05,
                       "dp_clip": 1.5, "dp_sigma": 1.1, "dp_participants": 256,
                       "stream_size": 0, "chunk_bytes": 0}, changes),
        ("Submit", {"run_id": RUN, "round": 5, "node_id": NODE_B, "nonce": NONCE,
                    "codec": "raw32",
                    "length": 4, "digest": sha256_hex(update), "train_loss": 1.375,
                    "samples": 160, "compute_s": 0.25}, update),
        ("Submit", {"run_id": RUN, "round": 0, "node_id": NODE_A, "nonce": NONCE,
                    "codec": "raw32",
                    "length": 1, "digest": sha256_hex(b"\x00" + _f32(2.5)), "train_loss": None,
                    "samples": 0, "compute_s": 0.5}, b"\x00" + _f32(2.5)),
        ("Ack", {"round": 5, "digest": sha256_hex(update), "status": "duplicate"}, b""),
        ("Error", {"code": "wrong_round", "message": "round 4 is closed", "field": "round",
                   "round": 4}, b""),
        ("Error", {"code": "bad_frame", "message": "bad magic", "field": None,
                   "round": None}, b""),
        ("RoundCommitted", {"round": 5, "eval_loss": 1.0625, "n_updates": 2,
                            "params_digest": sha256_hex(params), "final": False}, b""),
        ("RoundCommitted", {"round": 6, "eval_loss": None, "n_updates": 1,
                            "params_digest": sha256_hex(update), "final": True}, b""),
        ("ValidateRequest", {"run_id": RUN, "round": 5, "params_digest": sha256_hex(params),
                             "codec": "raw32", "length": 4, "candidates": [
                                 {"node_id": NODE_B, "digest": sha256_hex(update), "offset": 0,
                                  "size": len(update)}]}, update),
        ("Signal", {"run_id": RUN, "node_id": NODE_A, "to": "server", "kind": "offer",
                    "data": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"}, b""),
        ("Ready", {"run_id": RUN, "round": 5, "node_id": NODE_B, "length": 4,
                   "digest": sha256_hex(update), "train_loss": 1.375, "samples": 160,
                   "compute_s": 0.25}, b""),
        ("ShardPlan", {"run_id": RUN, "round": 5, "rule": "median", "byzantine_fraction": 0.25,
                       "result_codec": "fp16",
                       "plan": {"round": 5, "n_params": 4, "members": [NODE_A, NODE_B],
                                "owners": [[NODE_A, NODE_B], [NODE_B, NODE_A]],
                                "revision": 0}}, b""),
        ("Shard", {"run_id": RUN, "round": 5, "node_id": NODE_A, "to": NODE_B, "kind": "part",
                   "shard": 1, "revision": 0}, _f32(0.0, -0.0)),
        ("Shard", {"run_id": RUN, "round": 5, "node_id": NODE_B, "to": "server",
                   "kind": "result", "shard": 0, "revision": 0},
         bytes.fromhex("01" "003c" "00c0")),  # fp16 payload: wire id 1, 1.0, -2.0
        ("SecAgg", {"run_id": RUN, "round": 5, "node_id": NODE_A, "stage": "advert"},
         b'{"kem_key":"AAAA","node_id":"' + NODE_A.encode() + b'"}'),
        ("SecAgg", {"run_id": RUN, "round": 5, "node_id": "server", "stage": "unmask"},
         b'{"dropped":[],"round":5,"run_id":"' + RUN.encode() + b'","survivors":[]}'),
        ("Dht", {"run_id": RUN, "node_id": NODE_A, "to": "server"},
         b'{"rpc":"00000000000000aa","type":"ping","v":1}'),
        ("Dht", {"run_id": RUN, "node_id": "server", "to": NODE_B},
         b'{"rpc":"00000000000000aa","type":"pong","v":1}'),
        ("StreamSubmit", {"run_id": RUN, "round": 5, "node_id": NODE_B, "nonce": NONCE,
                          "codec": "raw32", "length": 4, "digest": sha256_hex(update),
                          "size": len(update), "chunk_bytes": 1024, "train_loss": 1.375,
                          "samples": 160, "compute_s": 0.25},
         bytes.fromhex(sha256_hex(update))),  # one chunk: its SHA-256 is the manifest
        ("Chunk", {"round": 5, "digest": sha256_hex(update), "index": 0}, update),
        ("Resume", {"round": 5, "digest": sha256_hex(update), "next": 0}, b""),
        ("ParamsChunk", {"round": 5, "digest": sha256_hex(stream_manifest), "index": 2},
         stream_payload[2048:]),
        ("ParamsFetch", {"run_id": RUN, "round": 5, "node_id": NODE_A,
                         "digest": sha256_hex(stream_manifest), "next": 2}, b""),
        ("Verdict", {"run_id": RUN, "round": 5, "node_id": NODE_A, "base_loss": 2.5,
                     "scores": [{"node_id": NODE_B, "digest": sha256_hex(update),
                                 "loss": 2.375}]}, b""),
    ]


def invalid_examples() -> list[dict[str, Any]]:
    """Frames every decoder must refuse, with the error code (and field) it must give."""
    from shared.frame import FIXED_HEADER, MAGIC, MAX_HEADER_LEN, PROTOCOL_VERSION
    from shared.messages import sha256_hex

    def raw(head: bytes, payload: bytes = b"", *, magic: bytes = MAGIC,
            version: int = PROTOCOL_VERSION, msg_type: int = 1, flags: int = 0,
            head_len: int | None = None, pay_len: int | None = None) -> bytes:
        fixed = FIXED_HEADER.pack(magic, version, msg_type, flags,
                                  len(head) if head_len is None else head_len,
                                  len(payload) if pay_len is None else pay_len)
        return fixed + head + payload

    def canon(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    hello = {"node_id": NODE_A, "public_key": "ab" * 4, "challenge": CHALLENGE,
             "nonce": NONCE, "runtime": "native", "agent": "a", "device": "cpu",
             "role": "trainer", "features": ""}
    upd = b"\x00" + _f32(1.5)
    submit = {"run_id": RUN, "round": 1, "node_id": NODE_A, "nonce": NONCE, "codec": "raw32",
              "length": 1,
              "digest": sha256_hex(upd), "train_loss": None, "samples": 1, "compute_s": 0.5}
    cases: list[tuple[str, bytes, str, str | None]] = [
        ("bad_magic", raw(canon(hello), magic=b"DAAQ"), "bad_frame", "magic"),
        ("truncated_fixed_header", raw(canon(hello))[:10], "bad_frame", None),
        ("truncated_header", raw(canon(hello))[:-3], "bad_frame", "length"),
        ("trailing_bytes", raw(canon(hello)) + b"\x00", "bad_frame", "length"),
        ("unsupported_version", raw(canon(hello), version=2), "unsupported_version",
         "version"),
        ("unknown_flags", raw(canon(hello), flags=4), "bad_frame", "flags"),
        ("signed_without_trailer", raw(canon(hello), flags=1), "bad_frame", "length"),
        ("payload_too_large", raw(b"", head_len=2, pay_len=1 << 30), "frame_too_large",
         "payload_len"),
        ("header_too_large", raw(b"", head_len=MAX_HEADER_LEN + 1), "frame_too_large",
         "header_len"),
        ("header_not_utf8", raw(b'{"a":"\xff"}'), "bad_frame", "header"),
        ("header_not_object", raw(b"[1,2]"), "bad_frame", "header"),
        ("header_nan", raw(b'{"x":NaN}'), "bad_frame", "header"),
        ("unknown_message_type", raw(b"{}", msg_type=99), "bad_message", "msg_type"),
        ("missing_field", raw(canon({k: v for k, v in hello.items() if k != "agent"})),
         "bad_message", "agent"),
        ("unknown_field", raw(canon({**hello, "zzz": 1})), "bad_message", "zzz"),
        ("bool_for_int", raw(canon({"round": True, "digest": "d", "status": "accepted"}),
                             msg_type=5), "bad_message", "round"),
        ("bad_node_id", raw(canon({**hello, "node_id": NODE_A.upper()})), "bad_message",
         "node_id"),
        ("payload_on_hello", raw(canon(hello), b"\x00"), "bad_message", "payload"),
        ("submit_digest_mismatch", raw(canon({**submit, "digest": "0" * 64}), upd,
                                       msg_type=4), "bad_update", "digest"),
    ]
    return [{"name": name, "frame_hex": data.hex(), "code": code, "field": field}
            for name, data, code, field in cases]


def signed_examples(previous: dict[str, Any] | None) -> dict[str, Any]:
    """A test key pair and frames signed with it. ML-DSA signing is randomized, so the
    frames are kept from the previous file while they still verify; else made anew."""
    from shared.envelope import Identity, verify_frame
    from shared.frame import decode_frame
    from shared.messages import Submit, sha256_hex

    def still_valid(doc: dict[str, Any]) -> bool:
        try:
            pk = bytes.fromhex(doc["public_key_hex"])
            for case in doc["frames"]:
                frame = decode_frame(bytes.fromhex(case["frame_hex"]))
                verify_frame(frame, public_key=pk, run_id=doc["run_id"],
                             node_id=doc["node_id"])
        except Exception:
            return False
        return True

    if previous and still_valid(previous):
        return previous
    from shared.platform import PqcryptoMLDSA65

    # the expanded 4032-byte secret key: noble (the tab's selftest) signs with that form
    pk, sk = PqcryptoMLDSA65().keygen()
    ident = Identity(public_key=pk, secret_key=sk)
    update = b"\x00" + _f32(0.5, -0.25)
    submit = Submit(run_id=RUN, round=3, node_id=ident.node_id, nonce=NONCE, codec="raw32",
                    length=2, digest=sha256_hex(update), train_loss=1.5, samples=8,
                    compute_s=0.25, payload=update)
    frame = submit.to_frame(sign=ident.signer(run_id=RUN, round_=3, msg_type=Submit.TYPE,
                                              nonce=NONCE))
    return {"scheme": "ml-dsa-65 (FIPS 204, pure mode, context = run_id UTF-8)",
            "run_id": RUN, "node_id": ident.node_id,
            "public_key_hex": ident.public_key.hex(), "secret_key_hex": ident.secret_key.hex(),
            "frames": [{"type": "Submit", "round": 3, "nonce": NONCE, "frame_hex": frame.hex()}]}


def build() -> dict[str, Any]:
    """The whole golden document, as frames.json holds it."""
    from dataclasses import fields as dc_fields

    from shared.messages import MESSAGE_TYPES

    by_name = {cls.__name__: cls for cls in MESSAGE_TYPES.values()}
    valid = []
    for name, fields, payload in valid_examples():
        cls = by_name[name]
        if any(f.name == "nonce" for f in dc_fields(cls)) and "nonce" not in fields:  # type: ignore[arg-type]
            fields = {**fields, "nonce": NONCE}  # every message carries one (shared.envelope)
        has_payload = any(f.name == "payload" for f in dc_fields(cls))  # type: ignore[arg-type]
        kwargs = dict(fields, payload=payload) if has_payload else dict(fields)
        frame = cls(**kwargs).to_frame()
        valid.append({"type": name, "msg_type": cls.TYPE, "fields": fields,
                      "payload_hex": payload.hex(), "frame_hex": frame.hex()})
    previous = json.loads(OUT.read_text(encoding="utf-8")).get("signed") if OUT.exists() else None
    return {"version": FORMAT_VERSION, "valid": valid, "invalid": invalid_examples(),
            "signed": signed_examples(previous)}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render(build())
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale; run {Path(__file__).name} to regenerate", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
