"""Server memory of a secure-aggregation round with streamed masked updates vs single frames.

    python -m bench.stream_secagg                     # llama 2m (1.8M params), 4 and 16
    python -m bench.stream_secagg --model mlp-digits --flavour "" --participants 2 \\
        --chunk-mb 0.01

bench.stream's measurement (a real server, `python -m server --secagg`, one round, quorum
N; N participants over real WebSockets in this process, the shared Participant, streamed by
the native node's uploader when the Welcome asks; one more member joins, takes part in the
key stages and never submits, so the round commits at its deadline and the receipt's peak is
read apart from the commit's) with secure aggregation: every participant masks its random
update (u32 words, 4 bytes a value) and the server sums them. single: each masked update in
one frame, taken whole (stream_chunk_mb 0); streamed: in chunks, each chunk's words added
into the masked sum as it arrives (server/secagg_stream.py). growth = the server's peak
(VmHWM, reset once every member joined) - its resident set then; receipt: until all N are
acknowledged. The members run in this process (key stages, masking): wall times are loose
on the shared 2-core machine, memory figures are the server's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import emit, print_table
from bench.stream import run_one


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama")
    p.add_argument("--flavour", default="2m")
    p.add_argument("--participants", default="4,16", help="comma-separated counts")
    p.add_argument("--chunk-mb", type=float, default=1.0)
    p.add_argument("--deadline-s", type=float, default=120.0,
                   help="round deadline: the masked updates must be in by then")
    args = p.parse_args(argv)
    extra = ("--secagg", "--secagg-clip", "0.5", "--secagg-timeout-s", "60")
    rows = []
    for n in [int(x) for x in args.participants.split(",")]:
        for chunk_mb in (0.0, args.chunk_mb):
            with tempfile.TemporaryDirectory(prefix="bench-stream-secagg-") as tmp:
                rows.append(run_one(Path(tmp), model=args.model, flavour=args.flavour, n=n,
                                    chunk_mb=chunk_mb, rule="mean",
                                    deadline_s=args.deadline_s, extra=extra))
    print_table(rows, ["mode", "participants", "update_mb", "baseline_rss_mb",
                       "receipt_growth_mb", "peak_rss_mb", "growth_mb", "wall_s", "acked",
                       "streamed_transfers", "committed_rounds"])
    emit({"bench": "stream_secagg", "model": args.model, "flavour": args.flavour,
          "n_params": rows[0]["n_params"], "update_mb": rows[0]["update_mb"],
          "chunk_mb": args.chunk_mb,
          "receipt_growth_mb": {f"{r['mode']}_{r['participants']}": r["receipt_growth_mb"]
                                for r in rows},
          "growth_mb": {f"{r['mode']}_{r['participants']}": r["growth_mb"] for r in rows},
          "rows": rows, "note": "2-core machine shared with other jobs: wall_s is loose"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
