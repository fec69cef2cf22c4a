"""Generate shared/testdata/sparse_step.json: golden vectors for SparseLoCo's sparse step.

Run from the repo root:  python shared/testdata/make_sparse_golden.py          (rewrites it)
                         python shared/testdata/make_sparse_golden.py --check  (exit 1 if stale)

What the tab's JS (browser/node/sparse_step.js, codec_int2.js) must reproduce bit for bit
(tests/js/sparse_step_node.mjs under Node.js, tests/test_sparse_tab.py):

    {"version": 1,
     "int2": [{"name", "block", "input_hex",      # k float32 values (LE)
               "payload_hex",                     # topk int2 payload of them (numpy encode)
               "decoded_hex"}],                   # its decode (length = k, fraction 1)
     "steps": [{"name", "n", "theta_hex",         # theta_{r-1}, float32 LE
                "payloads_hex": [...],            # successive "sparse" RoundOpen payloads
                "thetas_hex": [...]}],            # theta after each: shared.sparseloco's
                                                  # server_step (apply_sparse), the bytes the
                                                  # server's params_digest covers
     "invalid": [{"name", "n", "payload_hex"}]}   # refused (BadUpdate), theta untouched

Needs numpy (the server's path). Inputs: numpy's default_rng with fixed seeds, plus signed
zeros, ties of magnitude and values whose step rounds (lr not a power of two).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.codecs import make_codec  # noqa: E402
from shared.sparseloco import HEAD, MAGIC, VERSION, SparseOuter, server_step  # noqa: E402

OUT = Path(__file__).with_name("sparse_step.json")


def _hex(a: Any) -> str:
    return np.ascontiguousarray(a, dtype="<f4").tobytes().hex()


def _awkward(rng: Any, n: int) -> Any:
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 2, n)).astype(np.float32)
    x[: min(n, 4)] = np.array([0.5, -0.5, -0.0, 0.0], np.float32)[: min(n, 4)]  # ties, zeros
    return x


def int2_cases() -> list[dict[str, Any]]:
    rng = np.random.default_rng(16)
    out = []
    for k, block in ((1, 256), (7, 3), (257, 256), (1000, 64), (1301, 256), (13, 1)):
        x = _awkward(rng, k)
        codec = make_codec("topk", fraction=1.0, values="int2", block=block)
        payload = bytes(codec.encode(x))
        out.append({"name": f"int2-k{k}-b{block}", "block": block, "input_hex": _hex(x),
                    "payload_hex": payload.hex(), "decoded_hex": _hex(codec.decode(payload, k))})
    return out


def step_cases() -> list[dict[str, Any]]:
    rng = np.random.default_rng(4)
    out = []
    for name, n, cfg, rounds in (
            ("int2-lr1", 1201, SparseOuter(lr=1.0, fraction=0.04), 3),
            ("int2-lr0.7-b32", 1024, SparseOuter(lr=0.7, fraction=0.1, block=32), 3),
            ("int8-lr0.37", 999, SparseOuter(lr=0.37, fraction=0.05, values="int8"), 2),
            ("fp16-lr1.3", 512, SparseOuter(lr=1.3, fraction=0.25, values="fp16"), 2),
            ("nesterov-int2", 900, SparseOuter(lr=0.9, momentum=0.5, fraction=0.03), 2),
            ("dense-int2", 40, SparseOuter(lr=0.55, fraction=1.0, block=7), 2)):
        theta0 = _awkward(rng, n)
        theta0[5] = np.float32(-0.0)
        theta = theta0.copy()
        state = np.zeros(2 * n if cfg.momentum > 0 else n, np.float32)
        payloads, thetas = [], []
        for _ in range(rounds):
            grad = (rng.standard_normal(n) * 1e-2).astype(np.float32)
            theta, state, payload = server_step(theta, grad, state, cfg)
            payloads.append(payload.hex())
            thetas.append(_hex(theta))
        out.append({"name": name, "n": n, "theta_hex": _hex(theta0), "payloads_hex": payloads,
                    "thetas_hex": thetas})
    return out


def invalid_cases() -> list[dict[str, Any]]:
    rng = np.random.default_rng(5)
    n = 64
    g = (rng.standard_normal(n)).astype(np.float32)
    _, _, good = server_step(np.zeros(n, np.float32), g, np.zeros(n, np.float32),
                             SparseOuter(lr=1.0, fraction=0.25, block=8))
    body = good[HEAD.size:]
    nl = 8 * 2  # 16 kept values, block 8: two pairs of levels right after the 12-byte header
    neg = bytearray(body)
    neg[12:16] = struct.pack("<f", -1.0)
    nan = bytearray(body)
    nan[16:20] = struct.pack("<f", float("nan"))
    _, _, odd = server_step(np.zeros(66, np.float32), rng.standard_normal(66).astype(np.float32),
                            np.zeros(66, np.float32), SparseOuter(lr=1.0, fraction=0.1))
    pad = bytearray(odd)  # k = 7: the last code byte holds 3 codes and 2 pad bits
    levels_end = HEAD.size + 12 + 8
    pad[levels_end + 1] |= 0xC0
    return [
        {"name": "pad-bits", "n": 66, "payload_hex": bytes(pad).hex()},
        {"name": "bad-magic", "n": n, "payload_hex": (b"DM" + good[2:]).hex()},
        {"name": "bad-version", "n": n, "payload_hex": (MAGIC + bytes([9]) + good[3:]).hex()},
        {"name": "lr-zero", "n": n, "payload_hex": (HEAD.pack(MAGIC, VERSION, 0.0) + body).hex()},
        {"name": "lr-nan", "n": n,
         "payload_hex": (HEAD.pack(MAGIC, VERSION, float("nan")) + body).hex()},
        {"name": "not-topk", "n": n,
         "payload_hex": (good[:HEAD.size] + b"\x00" + bytes(4 * n)).hex()},
        {"name": "wrong-length", "n": n - 40, "payload_hex": good.hex()},
        {"name": "truncated", "n": n, "payload_hex": good[:-3].hex()},
        {"name": "negative-level", "n": n, "payload_hex": (good[:HEAD.size] + neg).hex()},
        {"name": "nan-level", "n": n, "payload_hex": (good[:HEAD.size] + nan).hex()},
        {"name": "levels-only", "n": n, "payload_hex": good[:HEAD.size + 12 + nl].hex()},
    ]


def build() -> dict[str, Any]:
    return {"version": 1, "int2": int2_cases(), "steps": step_cases(),
            "invalid": invalid_cases()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = p.parse_args()
    text = json.dumps(build(), indent=1) + "\n"
    if args.check:
        return 0 if OUT.exists() and OUT.read_text(encoding="utf-8") == text else 1
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
