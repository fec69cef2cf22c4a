"""ML-DSA-65 speed per implementation: key generation, signing, verification (ms each).

    python -m bench.signatures [--repeats 200]

`cryptography` (OpenSSL, seed keys: what shared.platform.NativeMLDSA65 uses for new keys)
against pqcrypto (expanded 4032-byte keys: key files written before). One thread; each
figure is the median of `repeats` calls over a 3 KB message (a frame's signing bytes are
~100 B; the size barely matters: the message is hashed once)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from bench.common import emit, print_table
from shared.platform import NativeMLDSA65, PqcryptoMLDSA65

MESSAGE, CONTEXT = b"\x5a" * 3000, b"run-bench"


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def measure(name: str, scheme: PqcryptoMLDSA65, repeats: int) -> dict[str, object]:
    pk, sk = scheme.keygen()
    sig = scheme.sign(sk, MESSAGE, CONTEXT)
    if not PqcryptoMLDSA65().verify(pk, MESSAGE, sig, CONTEXT):
        raise SystemExit(f"{name}: its signature does not verify")
    return {"implementation": name, "secret_key_bytes": len(sk),
            "keygen_ms": median_ms(scheme.keygen, repeats),
            "sign_ms": median_ms(lambda: scheme.sign(sk, MESSAGE, CONTEXT), repeats),
            "verify_ms": median_ms(lambda: scheme.verify(pk, MESSAGE, sig, CONTEXT), repeats)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    native = NativeMLDSA65()
    rows = [measure("pqcrypto", PqcryptoMLDSA65(), args.repeats)]
    if native.seeded():
        rows.append(measure("cryptography", native, args.repeats))
    print_table(rows, ["implementation", "secret_key_bytes", "keygen_ms", "sign_ms",
                       "verify_ms"])
    figures: dict[str, object] = {str(r["implementation"]): {
        k: v for k, v in r.items() if k != "implementation"} for r in rows}
    if len(rows) == 2:
        figures["sign_speedup"] = round(float(rows[0]["sign_ms"])  # type: ignore[arg-type]
                                        / float(rows[1]["sign_ms"]), 2)  # type: ignore[arg-type]
    emit(figures)


if __name__ == "__main__":
    main()
