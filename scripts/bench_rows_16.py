"""The README table's rows and result commands for issue 16's streaming benchmarks (node,
tab, p2p and secure-aggregation streaming): scripts/bench_table.py splices them in after
bench.scale_server's row. Kept here so bench_table.py stays readable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Fig = dict[str, Any]


def _node_stream(f: Fig) -> str:
    c = f["per_codec"]
    parts = [f"{name} {v['one_shot_encode_peak_mb']:,.1f} -> {v['chunked_encode_peak_mb']:,.1f}"
             for name, v in c.items()]
    whole = [f"{name} {v['one_shot_peak_mb']:,.1f} vs {v['chunked_peak_mb']:,.1f}"
             for name, v in c.items()]
    return (f"{f['model']}, {f['nodes']} node, {f['rounds']} rounds: node peak while encoding, "
            f"one-shot -> chunked (MB): {', '.join(parts)}; whole-run peak {', '.join(whole)} "
            f"(top-k's is the inner steps'; docs/benchmarks.md)")


def _tab_overlap(f: Fig) -> str:
    off, on = f["rows"]
    return (f"tab compute / training wall {100 * off['utilization']:.1f}% -> "
            f"{100 * on['utilization']:.1f}%, wall {off['wall_s']:.2f} -> {on['wall_s']:.2f} s; "
            f"{on['merged_rounds']} of {on['rounds'] - 1} rounds merged steps run ahead, "
            f"{on['resyncs']} resyncs; final eval loss {off['final_eval_loss']:.3f} -> "
            f"{on['final_eval_loss']:.3f} (one run each)")


def _tab_stream(f: Fig) -> str:
    rows = "; ".join(f"{r['path']}: {r['chunks']} chunks an update, at most "
                     f"{r['max_queued_frames']} frames ({r['max_queued_mb']:.2f} MB) queued, "
                     f"upload {r['upload_ms']:,.0f} ms (median)" for r in f["rows"])
    return f"{f['model']}, {f['chunk_mb']:g} MB chunks, {f['rounds']} rounds: {rows} (loaded)"


def _p2p_stream(f: Fig) -> str:
    g, m, t = f["owner_rss_growth_mb"], f["max_shard_frame"], f["round_s"]
    if "one-frame" not in g:
        return (f"llama {f['flavour']}, {f['chunk_mb']:g} MiB chunks, streamed only: owner RSS "
                f"growth {g['streamed']:,.1f} MiB, largest frame {m['streamed']:,} B, round "
                f"{t['streamed']:.1f} s (loaded)")
    return (f"llama {f['flavour']}, {f['chunk_mb']:g} MiB chunks, streamed vs one frame: owner "
            f"RSS growth {g['streamed']:,.1f} vs {g['one-frame']:,.1f} MiB, largest frame "
            f"{m['streamed']:,} vs {m['one-frame']:,} B, round {t['streamed']:.2f} vs "
            f"{t['one-frame']:.2f} s (loaded); same aggregate: "
            f"{'yes' if f['same_aggregate'] else 'NO'}")


def _stream_secagg(f: Fig) -> str:
    g = f["receipt_growth_mb"]
    counts = sorted({int(k.split("_")[1]) for k in g})
    rows = ", ".join(f"{n}: {g[f'streamed_{n}']:,.1f} vs {g[f'single_{n}']:,.1f} MB"
                     for n in counts)
    return (f"llama {f['flavour']}, {f['chunk_mb']:g} MB chunks: server RSS growth while the "
            f"masked updates arrive, streamed vs one frame, by participants: {rows}")


ROWS: list[tuple[str, str, str, Callable[[Fig], str]]] = [
    ("bench.node_stream", "a native node's memory with its update encoded chunk by chunk vs "
     "in one piece: real server + 1 real native node, llama 20m, 2 rounds, streamed uploads",
     "node_stream.txt", _node_stream),
    ("bench.tab_stream --rounds 3", "a Chromium tab's streamed upload over its WebSocket and "
     "over its star data channel: real server, one chunk frame built at a time",
     "tab_stream.txt", _tab_stream),
    ("bench.p2p_stream --flavour 2m --chunk-mb 0.25", "a streamed p2p reduction (shards no "
     "larger than a chunk, receipts, window) vs one frame per shard: 4 peer processes, aiortc "
     "channels", "p2p_stream.txt", _p2p_stream),
    ("bench.p2p_stream --only streamed", "the same at llama 20m, streamed only",
     "p2p_stream_20m.txt", _p2p_stream),
    ("bench.stream_secagg", "secure aggregation with streamed masked updates (words summed as "
     "chunks arrive) vs one frame each: real server and members", "stream_secagg.txt",
     _stream_secagg),
    ("bench.tab_overlap", "run option overlap in a tab: real server + one Chromium tab (wasm), "
     "gpt-tiny SparseLoCo H=16, 6 rounds, quorum 1, off vs on", "tab_overlap.txt", _tab_overlap),
]

SOURCES: dict[str, str] = {
    "node_stream.txt": "python -m bench.node_stream > bench/results/node_stream.txt",
    "node_stream_topk.txt": "python -m bench.node_stream --codecs topk "
                            "> bench/results/node_stream_topk.txt",
    "node_stream_topk_mmap.txt": "python -m bench.node_stream --codecs topk, with "
                                 "MALLOC_MMAP_THRESHOLD_=1048576 in the environment "
                                 "> bench/results/node_stream_topk_mmap.txt",
    "tab_stream.txt": "python -m bench.tab_stream --rounds 3 > bench/results/tab_stream.txt",
    "tab_overlap.txt": "python -m bench.tab_overlap > bench/results/tab_overlap.txt",
    "p2p_stream.txt": "python -m bench.p2p_stream --flavour 2m --chunk-mb 0.25 "
                      "> bench/results/p2p_stream.txt",
    "p2p_stream_20m.txt": "python -m bench.p2p_stream --only streamed "
                          "> bench/results/p2p_stream_20m.txt",
    "stream_secagg.txt": "python -m bench.stream_secagg > bench/results/stream_secagg.txt",
    "spool_rules_geomed.txt": "python -m bench.spool_rules --rules geometric-median "
                              "> bench/results/spool_rules_geomed.txt",
    "spool_rules_geomed_before.txt": "python -m bench.spool_rules --rules geometric-median, "
                                     "at 7ed92be^ (before the scratch files) "
                                     "> bench/results/spool_rules_geomed_before.txt",
    "spool_rules_16m_geomed.txt": "python -m bench.spool_rules --params 16777216 "
                                  "--participants 16 --rules geometric-median "
                                  "> bench/results/spool_rules_16m_geomed.txt",
    "spool_rules_cc.txt": "python -m bench.spool_rules --rules centered-clipping "
                          "> bench/results/spool_rules_cc.txt",
    "spool_rules_cc_before.txt": "python -m bench.spool_rules --rules centered-clipping, "
                                 "at 97b2937 (before server/spool_cc.py) "
                                 "> bench/results/spool_rules_cc_before.txt",
    "spool_rules_16m_cc.txt": "python -m bench.spool_rules --params 16777216 "
                              "--participants 16 --rules centered-clipping "
                              "> bench/results/spool_rules_16m_cc.txt",
    "spool_rules_16m_cc_before.txt": "python -m bench.spool_rules --params 16777216 "
                                     "--participants 16 --rules centered-clipping, at 6d3a5af "
                                     "(before server/spool_cc.py) "
                                     "> bench/results/spool_rules_16m_cc_before.txt",
}
