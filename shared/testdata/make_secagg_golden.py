"""Generate shared/testdata/secagg.json: golden vectors for secure aggregation.

    python shared/testdata/make_secagg_golden.py           rewrite secagg.json
    python shared/testdata/make_secagg_golden.py --check   exit 1 if stale

A JavaScript twin (the tab) must reproduce every vector bit for bit: the mask PRG (SHAKE-128
blocks, across a block boundary), the KDF and commitments, the share sealing, the fixed-point
encoding, the neighbour graph, Shamir reconstruction over 2^521 - 1, and one masked update
end to end. Input values are float32 (as updates travel): round them with Math.fround.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from shared.secagg import shamir  # noqa: E402
from shared.secagg.crypto import commit, derive, seal  # noqa: E402
from shared.secagg.fixedpoint import FixedPoint  # noqa: E402
from shared.secagg.graph import choose_degree, neighbour_graph  # noqa: E402
from shared.secagg.prg import mask_bytes  # noqa: E402

OUT = HERE / "secagg.json"


def f32(values: list[float]) -> list[float]:
    """The values as float32 (updates travel as float32; JS: Math.fround)."""
    return [struct.unpack("<f", struct.pack("<f", v))[0] for v in values]


def build() -> dict[str, Any]:
    prg = []
    for seed_text, start, stop in (("00" * 32, 0, 8), ("01" * 32, 0, 8),
                                   ("a5" * 32, 65530, 65542), ("ff" * 32, 1000, 1003)):
        data = mask_bytes(bytes.fromhex(seed_text), start, stop)
        words = [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]
        prg.append({"seed_hex": seed_text, "start": start, "stop": stop, "words": words})
    whole = mask_bytes(bytes(range(32)), 0, 200_000)
    prg_digest = {"seed_hex": bytes(range(32)).hex(), "start": 0, "stop": 200_000,
                  "sha256": hashlib.sha256(whole).hexdigest()}
    kdf = [{"label": lab, "key_hex": key.hex(), "context": ctx,
            "out_hex": derive(lab, key, *ctx).hex()}
           for lab, key, ctx in (("self-mask", bytes(32), []), ("pair-mask", b"\x07" * 32, []),
                                 ("seal", b"k" * 32, ["run", "3"]))]
    commits = [{"label": "pair", "data_hex": (b"\x11" * 32).hex(),
                "context": ["run-a", "5", "aa", "bb"],
                "out_hex": commit("pair", b"\x11" * 32, "run-a", "5", "aa", "bb")}]
    sealed = [{"key_hex": (b"\x22" * 32).hex(), "aad_hex": b"run\x000\x00aa\x00bb".hex(),
               "plaintext_hex": bytes(range(70)).hex(),
               "sealed_hex": seal(b"\x22" * 32, b"run\x000\x00aa\x00bb", bytes(range(70))).hex()}]
    fp = FixedPoint.for_sum(1.0, 64)
    values = [0.0, 0.5, -0.5, 1.0, -1.0, 2.5, -3.0, 1e-7, 0.3333333]
    fixed = {"clip": 1.0, "max_parties": 64, "frac_bits": fp.frac_bits, "values": values,
             "words": list(fp.encode(f32(values)))}
    nodes = [hashlib.sha256(bytes([i])).hexdigest() for i in range(12)]
    seed = hashlib.sha256(b"round seed").digest()
    graph = {"seed_hex": seed.hex(), "nodes": nodes, "k": 4,
             "neighbours": {k: list(v) for k, v in neighbour_graph(seed, nodes, 4).items()}}
    degrees = {str(n): choose_degree(n) for n in (4, 16, 64, 256, 1024, 10_000)}
    secret = 0x0123456789ABCDEF
    coeffs = [secret, 5, 7]  # f(x) = secret + 5x + 7x^2, threshold 3
    pts = {x: [sum(c * x ** i for i, c in enumerate(coeffs)) % shamir.P] for x in (2, 5, 9)}
    sham = {"p": "2^521-1", "threshold": 3,
            "shares": [[x, shamir.to_bytes(v).hex()] for x, v in pts.items()],
            "secret_hex": shamir.reconstruct(pts, 3)[0].to_bytes(32, "big").hex()}
    # a participant's masked update, end to end: fixed point + self mask + pair masks, across
    # a block boundary (offset 65530). pairs: (pair key, +1 when this node's id is the smaller)
    vals = [0.5, -0.25, 0.125, 1.0, -1.0, 0.0, 0.3, -0.7, 2.0, -2.0, 1e-3, -1e-3]
    fp4 = FixedPoint.for_sum(1.0, 4)
    self_seed, pairs = b"\x33" * 32, [(b"\x44" * 32, -1), (b"\x55" * 32, 1)]
    acc = [int(w) for w in fp4.encode(f32(vals))]
    terms = [(derive("self-mask", self_seed), 1)]
    terms += [(derive("pair-mask", key), sign) for key, sign in pairs]
    for seed_, sign in terms:
        m = mask_bytes(seed_, 65530, 65530 + len(vals))
        for i in range(len(vals)):
            acc[i] = (acc[i] + sign * int.from_bytes(m[4 * i:4 * i + 4], "little")) % 2 ** 32
    masking = {"clip": 1.0, "max_parties": 4, "values": vals, "offset": 65530,
               "self_seed_hex": self_seed.hex(),
               "pairs": [[key.hex(), sign] for key, sign in pairs], "words": acc}
    return {"version": 1, "masking": masking, "prg": prg, "prg_digest": prg_digest, "kdf": kdf,
            "commit": commits, "seal": sealed, "fixed_point": fixed, "graph": graph,
            "degrees": degrees, "shamir": sham}


def main() -> int:
    text = json.dumps(build(), indent=1, sort_keys=True) + "\n"
    if "--check" in sys.argv:
        return 0 if OUT.read_text() == text else 1
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
