"""Secure and robust together: secure aggregation inside groups, a robust rule over the group
means, under bench.byzantine's attacks at group level (mlp-digits).

    python -m bench.secagg_robust [--participants 12] [--assumed 0.25] [--rounds 8]
        [--attacks sign-flip,scaled,gaussian,alie,ipm,label-flip]
        [--rules mean,median,centered-clipping,median+validation]
        [--seeds 0] [--jobs 2] [--out bench/results/secagg_robust.txt]

Each round (a vectorised simulation of the math; the coordinator has no live group mode):

- every participant trains `inner_steps` AdamW steps on its own iid shard of the digits
  training split (bench.dp.local_updates; 200 training examples are held back as the
  server's validation probe);
- shared.secagg.groups.assign cuts the roster into g = group_count(n, assumed) groups from
  the round seed;
- attackers act at group level: one that lands in a group makes the group's MEAN what the
  attack says (it knows its group-mates' updates, the strongest case): its submission is
  (|G| a - sum of the honest members' updates) / (attackers in G), within the fixed-point
  range. a is bench.byzantine's attack (shared.attacks, registry defaults) of the
  attackers' own trained updates (sign-flip, scaled, gaussian; label-flip trains on flipped
  labels) or of the honest group means (alie, ipm: n = g, f = spoiled groups; ALIE's z
  at f = min(spoiled, (g - 1) // 2), since its formula has no z for a majority);
- each group runs a real secure-aggregation round (shared.secagg: ML-KEM-768 pair keys,
  ML-DSA-65 signed key messages, masked fixed-point vectors, Shamir recovery), one honest
  member of one group dropping after sending its masked update; every unmasked sum is
  checked against the plain fixed-point sum of the same updates (`sum_exact`);
- the server combines the group means (shared.secagg.groups.combine): "mean" is the plain
  mean of the groups, the others a robust rule with f = the groups it tolerates;
  "+validation" first drops group means that fail shared.validation on the probe;
- the outer Nesterov step (lr 0.7, momentum 0.9).

Two attacker counts: `minority` = tolerated(g) attackers (they hold fewer than half the
groups wherever they land) and `majority` = ceil(0.4 n) (they usually hold more than half).
Cells: final held-out accuracy (%) and loss, mean over seeds.

LAST stdout line: JSON with participants, groups, group_size, attackers {scenario: count},
spoiled {scenario: mean spoiled groups per round}, clean {rule: {acc, loss}}, grid
{scenario: {rule: {attack: {acc, loss}}}}, sum_exact, secagg_rounds, settings, wall_s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.dp import evaluate, local_updates
from ml.data import assign_shards
from ml.workload import resolve
from shared.attacks import flip_labels, get_attack
from shared.envelope import Identity
from shared.outer import OuterConfig, outer_step
from shared.secagg import FixedPoint, RoundConfig, SecAggError
from shared.secagg.groups import (
    GroupSum,
    assign,
    combine,
    group_count,
    group_seed,
    spoiled,
    tolerated,
    validate,
)
from shared.secagg.local import LocalRound

ATTACKS = ("sign-flip", "scaled", "gaussian", "alie", "ipm", "label-flip")
# trimmed-mean is left out of the defaults: with few groups it is (about) the median
RULES = ("mean", "median", "centered-clipping", "median+validation")
FP_CLIP = 1.0  # per-coordinate fixed-point range; honest updates stay below 0.02
PROBE = 200  # training examples held back as the server's validation probe
THRESHOLD = 0.1  # shared.validation's default relative threshold


def secure_group_sums(groups: Sequence[Sequence[str]], updates: dict[str, np.ndarray],
                      ids: dict[str, Identity], *, run_id: str, round_: int, seed: bytes,
                      fp: FixedPoint, drop_after: Sequence[str] = (),
                      drop_before: Sequence[str] = ()) -> tuple[list[GroupSum], int]:
    """One real secure-aggregation round per group. Returns the groups' sums (a group
    whose round cannot unmask is left out) and how many sums differed from the plain
    fixed-point sum of their contributors' updates (0 when correct)."""
    sums, wrong = [], 0
    dim = len(next(iter(updates.values())))
    for i, members in enumerate(groups):
        cfg = RoundConfig(run_id=run_id, round=round_, seed=group_seed(seed, i),
                          dimension=dim, fixed_point=fp)
        lr = LocalRound(cfg, [ids[n] for n in members])
        agg = lr.setup(drop_before_submit=drop_before)
        for n in lr.live:
            lr.submit(n, lr.participants[n].masked_update(updates[n]))
        try:
            res = lr.unmask([n for n in sorted(agg.submitted) if n not in drop_after])
        except SecAggError as exc:  # TooManyDropouts and kin: the group is left out
            logging.getLogger("bench.secagg_robust").info("group %d: %s", i, exc)
            continue
        want = np.zeros(dim, np.uint32)
        for n in res.contributors:
            want += np.asarray(fp.encode(updates[n]), np.uint32)
        wrong += int(not np.array_equal(np.asarray(res.ring_sum, np.uint32), want))
        sums.append(GroupSum(index=i, total=res.values, count=len(res.contributors)))
    return sums, wrong


def group_attack(attack: str, groups: Sequence[Sequence[str]], bad: set[str],
                 own: dict[str, np.ndarray], honest: dict[str, np.ndarray],
                 seed: int) -> dict[str, np.ndarray]:
    """What each attacker submits so that its group's mean becomes the attack vector."""
    spec = get_attack(attack)
    n_bad = spoiled(groups, bad)
    means = [np.mean([honest[n] for n in g], 0).astype(np.float32) for g in groups]
    out: dict[str, np.ndarray] = {}
    for gi, g in enumerate(groups):
        mine = [n for n in g if n in bad]
        if not mine:
            continue
        if spec.uses_own:
            target = np.mean([np.asarray(spec.apply(own=own[n], seed=seed * 7919 + gi),
                                         np.float64) for n in mine], 0)
        else:
            # ALIE's z needs f < n/2; past that the attackers need not hide: z at that f
            f_z = min(n_bad, (len(groups) - 1) // 2) if attack == "alie" else n_bad
            target = np.asarray(spec.apply(honest=means, n=len(groups), f=max(f_z, 1),
                                           seed=seed), np.float64)
        rest = sum((honest[n].astype(np.float64) for n in g if n not in bad),
                   np.zeros_like(target))
        x = ((len(g) * target - rest) / len(mine)).astype(np.float32)
        out.update({n: x for n in mine})
    return out


def run(*, participants: int, attackers: int, attack: str | None, rule: str, rounds: int,
        assumed: float, inner_steps: int, batch: int, inner_lr: float, seed: int,
        say: Any = None) -> dict[str, Any]:
    wl = resolve(model="mlp-digits", flavour=None, data="digits", data_path=None,
                 partition="iid", alpha=0.5, seed=seed)
    ds = wl.dataset
    model = wl.new_model()
    shapes = [tuple(p.shape) for _, p in model.named_parameters()]
    theta = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    theta = theta.astype(np.float32)
    x = np.asarray(ds.x_train, np.float32)
    y = np.asarray(ds.y_train, np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    probe, pool = perm[:PROBE], perm[PROBE:]
    owner = assign_shards(np.asarray(ds.keys_train)[pool], n_shards=participants,
                          partition="iid", alpha=0.5, seed=seed)
    shards = [pool[owner == i] for i in range(participants)]
    xv, yv = np.asarray(ds.x_val, np.float32), np.asarray(ds.y_val, np.int64)
    yflip = np.asarray(flip_labels(y, 10), np.int64)
    idents = {i.node_id: i for i in (Identity.generate() for _ in range(participants))}
    nodes = sorted(idents)
    rng = np.random.default_rng(seed + 1)
    bad = set(rng.permutation(nodes)[:attackers].tolist()) if attack else set()
    g = group_count(participants, assumed)
    fp = FixedPoint.for_sum(FP_CLIP, math.ceil(participants / g))
    base_rule, validating = rule.removesuffix("+validation"), rule.endswith("+validation")
    momentum, outer = np.zeros_like(theta), OuterConfig(lr=0.7, momentum=0.9)
    torch.manual_seed(seed)
    wrong = dropped = n_spoiled = secagg_rounds = 0
    for r in range(rounds):
        rows = local_updates(theta, shapes, shards, x, y, steps=inner_steps, batch=batch,
                             lr=inner_lr, rng=rng)
        honest = dict(zip(nodes, rows, strict=True))
        own = dict(honest)
        if attack == "label-flip" and bad:
            flips = sorted(bad)
            frows = local_updates(theta, shapes, [shards[nodes.index(n)] for n in flips], x,
                                  yflip, steps=inner_steps, batch=batch, lr=inner_lr, rng=rng)
            own.update(zip(flips, frows, strict=True))
        rseed = hashlib.sha256(f"secagg-robust|{seed}|{r}".encode()).digest()
        groups = assign(rseed, nodes, g)
        n_spoiled += spoiled(groups, bad)
        sent = dict(honest)
        if attack:
            sent.update(group_attack(attack, groups, bad, own, honest, seed * 1000 + r))
        # one honest member of one group drops after sending its masked update: the first
        # group from r % g on that has one (attackers may fill a group: identities are random)
        gone = next(([n] for k in range(g) for n in groups[(r + k) % g] if n not in bad), [])
        sums, w = secure_group_sums(groups, sent, idents, run_id="secagg-robust", round_=r,
                                    seed=rseed, fp=fp, drop_after=gone)
        wrong, dropped, secagg_rounds = wrong + w, dropped + len(gone), secagg_rounds + g
        keep = None
        if validating:
            base = evaluate(theta, shapes, x[probe], y[probe])[0]
            losses = []
            for s in sums:
                mean_g = (np.asarray(s.total) / s.count).astype(np.float32)
                v = evaluate(theta - mean_g, shapes, x[probe], y[probe])[0]
                losses.append(v if math.isfinite(v) else None)
            keep = validate(base, losses, threshold=THRESHOLD)
        if sums and (keep is None or any(keep)):
            agg = np.asarray(combine(sums, rule=base_rule, f=tolerated(g), keep=keep),
                             np.float32)
            theta, momentum = outer_step(theta, agg, momentum, outer)
    loss, acc = evaluate(theta, shapes, xv, yv)
    if say:
        say(f"  {rule} / {attack or 'clean'} / {attackers} attackers: acc {acc:.3f}, "
            f"loss {loss:.4f}")
    return {"loss": loss if math.isfinite(loss) else None, "accuracy": acc,
            "spoiled": n_spoiled / rounds, "wrong_sums": wrong, "dropped": dropped,
            "secagg_rounds": secagg_rounds, "groups": g}


def _job(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    torch.set_num_threads(1)
    return kw, run(**kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.secagg_robust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=int, default=12)
    p.add_argument("--assumed", type=float, default=0.25,
                   help="attacker fraction the group count is sized for")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--inner-lr", type=float, default=3e-3)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--out", default="bench/results/secagg_robust.txt")
    a = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    attacks, rules = a.attacks.split(","), a.rules.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    g = group_count(a.participants, a.assumed)
    counts = {"minority": tolerated(g), "majority": math.ceil(0.4 * a.participants)}
    common = {"participants": a.participants, "rounds": a.rounds, "assumed": a.assumed,
              "inner_steps": a.inner_steps, "batch": a.batch, "inner_lr": a.inner_lr}
    jobs = [{**common, "attackers": 0, "attack": None, "rule": r, "seed": s}
            for r in rules for s in seeds]
    jobs += [{**common, "attackers": counts[sc], "attack": at, "rule": r, "seed": s}
             for sc in counts for r in rules for at in attacks for s in seeds]

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    say(f"{len(jobs)} runs, {g} groups of {a.participants} participants, attackers {counts}")
    done = []
    with multiprocessing.get_context("spawn").Pool(max(1, a.jobs)) as pool:
        for kw, res in pool.imap_unordered(_job, jobs):
            done.append((kw, res))
            say(f"  [{len(done)}/{len(jobs)}] {kw['rule']} / {kw['attack'] or 'clean'} / "
                f"{kw['attackers']} attackers: acc {res['accuracy']:.3f}, {res['spoiled']:.2f} "
                f"groups spoiled per round")
    scen = {v: k for k, v in counts.items()}

    def cell(results: list[dict[str, Any]]) -> dict[str, Any]:
        losses = [r["loss"] for r in results]
        return {"acc": round(100 * float(np.mean([r["accuracy"] for r in results])), 2),
                "loss": None if None in losses else round(float(np.mean(losses)), 4)}

    by: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for kw, res in done:
        key = (scen.get(kw["attackers"]) if kw["attack"] else "clean", kw["rule"], kw["attack"])
        by.setdefault(key, []).append(res)
    clean = {r: cell(by[("clean", r, None)]) for r in rules}
    grid = {sc: {r: {at: cell(by[(sc, r, at)]) for at in attacks} for r in rules}
            for sc in counts}
    spoil = {sc: round(float(np.mean([x["spoiled"] for (s, _, _), v in by.items() if s == sc
                                      for x in v])), 2) for sc in counts}
    every = [x for v in by.values() for x in v]
    out = {"participants": a.participants, "groups": g,
           "group_size": math.ceil(a.participants / g), "attackers": counts,
           "spoiled": spoil, "tolerated": tolerated(g), "clean": clean, "grid": grid,
           "sum_exact": all(x["wrong_sums"] == 0 for x in every),
           "secagg_rounds": sum(x["secagg_rounds"] for x in every),
           "dropped_after_submit": sum(x["dropped"] for x in every),
           "settings": {**common, "seeds": seeds, "fp_clip": FP_CLIP, "probe": PROBE,
                        "threshold": THRESHOLD, "outer": "nesterov lr 0.7 momentum 0.9"},
           "wall_s": round(time.perf_counter() - t0, 1)}
    lines = [f"{a.participants} participants in {g} groups (secure aggregation per group), "
             f"{a.rounds} rounds, mlp-digits; held-out accuracy % (loss), mean of seeds "
             f"{seeds}", ""]
    for sc in counts:
        lines += [f"### {sc}: {counts[sc]} attackers, {spoil[sc]} of {g} groups spoiled per "
                  f"round on average (a robust rule tolerates {tolerated(g)})", "",
                  "| rule | clean | " + " | ".join(attacks) + " |",
                  "|---" * (len(attacks) + 2) + "|"]
        for r in rules:
            cells = [clean[r]] + [grid[sc][r][at] for at in attacks]
            lines.append(f"| {r} | " + " | ".join(f"{c['acc']:.1f} ({c['loss']})"
                                                  for c in cells) + " |")
        lines.append("")
    lines.append(f"sums exact: {out['sum_exact']} ({out['secagg_rounds']} group rounds, "
                 f"{out['dropped_after_submit']} dropouts after submitting recovered)")
    text = "\n".join(lines) + "\n" + json.dumps(out)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
