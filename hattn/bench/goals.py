"""The goals of issues 17 and 18 (H200, qwen3.5-1b, bf16, one run), each evaluated on a bench result: its figure
and met / missed / unknown. A goal whose figure is missing is "unknown", with the reason the figure is missing.

Floors are the rows' own (hattn.bench.floor): decode bytes / copy bandwidth, prefill FLOPs / bf16 matmul peak.
"""
from __future__ import annotations

import math

from hattn.bench.workloads import Point, generate_context

GOAL_BATCHES = (1, 16)
PREFILL_MAX_TOKENS = 2048
FLOOR_X = {1: 2.0, 16: 2.5, 64: 3.0}       # full decode <= x its floor, by batch
GENERATE_X = 1.05                          # generate ms per new token <= x full's decode step
GRAPH_VS_FULL_X = 1.25                     # pcg, bcg decode <= x full
TC_RO_SPEEDUP, HF_STATIC_SPEEDUP = 3.0, 4.0
POOL_FRACTION = {"pcg": 0.10, "bcg": 0.10, "full": 0.05}
POOL_SIZES = (16, 2048)                    # the pool goals are for 16 capture sizes up to 2048 tokens
PREFILL_MS = {16: 1.0, 256: 2.0, 1024: 5.0}
PREFILL_FLOOR_X = (8192, 1.3)
PACKED_X = (4, 1024, 1.15)                 # 4 packed prompts of 1024 <= 1.15x one prompt of 4096
TTFT_MS = 2.0
PROBE_SPREAD = 1.2                         # two rows' host probes further apart: see _paired
HOST_SHARE = 0.1                           # ... and host time at least this share of a row's latency


def ms_of(result: dict, entry: str, pid: str) -> tuple[float | None, str | None]:
    """(median ms, None) or (None, why it is missing)."""
    e = result["entries"].get(entry)
    if e is None:
        return None, f"{entry} was not run (add it to --modes)"
    r = e["results"].get(pid)
    if r is None:
        return None, f"{entry} has no {pid} (add the workload or size)"
    if "ms" in r:
        if not (math.isfinite(r["ms"]) and r["ms"] > 0):  # a goal would divide by it or call it met
            return None, f"{entry} {pid}: {r['ms']} ms is not a measured time"
        return r["ms"], None
    return None, f"{entry} {pid}: {r.get('error') or r.get('skipped')}"


def _row(result: dict, entry: str, pid: str) -> dict:
    """A target's result of one point ({} if either is missing)."""
    return result["entries"].get(entry, {}).get("results", {}).get(pid) or {}


def probe_us(result: dict, entry: str, pid: str) -> float | None:
    """The mean host probe (`harness.host_probe_us`) of a row: the host's Python speed while it ran."""
    probe = _row(result, entry, pid).get("host_probe_us")
    return sum(probe) / len(probe) if probe else None


def _host_share(result: dict, *rows: tuple[str, str]) -> bool:
    """Whether the host's time in the call is at least HOST_SHARE of the latency in one of the rows: a row that is
    mostly GPU time (a long prefill, decode at B=64) barely moves with the host's phase."""
    for entry, pid in rows:
        r = _row(result, entry, pid)
        if r.get("host_ms") is not None and r.get("ms") and r["host_ms"] >= HOST_SHARE * r["ms"]:
            return True
    return False


def _paired(result: dict, goal: str, figure: str, ok: bool, small: tuple[str, str], large: tuple[str, str]) -> dict:
    """A goal that row `small` is fast enough against row `large` ((target, point id) each), judged on `ok`, unless
    the two rows ran at host speeds more than PROBE_SPREAD apart and the host's time is a share of them (HOST_SHARE):
    a host-bound row timed in a slow phase is slower (docs/benchmarks.md, forty-third session). Then the outcome
    stands only if the slow phase worked against it (the small row slower and still met, the large row slower and
    still missed); otherwise it is unknown."""
    pa, pb = probe_us(result, *small), probe_us(result, *large)
    if pa is None or pb is None or max(pa, pb) <= PROBE_SPREAD * min(pa, pb) or not _host_share(result, small, large):
        return _goal(goal, figure, ok)
    slow = small if pa > pb else large
    note = (f"the host ran Python at different speeds: probe {pa:.0f} us for {small[0]}, {pb:.0f} us for "
            f"{large[0]}")
    if ok == (slow is small):
        return _goal(goal, figure, ok, f"{note}; {'met' if ok else 'missed'} even with the slow phase on "
                                       f"{slow[0]}'s side")
    return _goal(goal, figure, None, f"{note}; {'met' if ok else 'missed'} with the slow phase on {slow[0]}'s side, "
                                     f"which may have decided it: rerun, or compare them with "
                                     f"scripts/step_host.py --alternate")


def _goal(goal: str, figure: str, ok: bool | None, detail: str = "") -> dict:
    status = "unknown" if ok is None else "met" if ok else "missed"
    return {"goal": goal, "figure": figure, "status": status, "detail": detail}


def _ratio(result: dict, goal: str, a: tuple[str, str], b: tuple[str, str], limit: float) -> dict:
    """a's ms / b's ms <= limit; a, b: (target, point id)."""
    (x, why_a), (y, why_b) = ms_of(result, *a), ms_of(result, *b)
    if x is None or y is None:
        return _goal(goal, "-", None, why_a or why_b)
    return _paired(result, goal, f"{a[0]} {x:.3f} ms / {b[0]} {y:.3f} ms = {x / y:.2f}x", x / y <= limit, a, b)


def _faster(result: dict, goal: str, fast: tuple[str, str], slow: tuple[str, str], factor: float) -> dict:
    """fast is at least `factor` times faster than slow."""
    (x, why_a), (y, why_b) = ms_of(result, *fast), ms_of(result, *slow)
    if x is None or y is None:
        return _goal(goal, "-", None, why_a or why_b)
    return _paired(result, goal, f"{slow[0]} {y:.3f} ms / {fast[0]} {x:.3f} ms = {y / x:.2f}x", y / x >= factor,
                   fast, slow)


def _floor(result: dict, goal: str, target: str, pid: str, limit: float) -> dict:
    ms, why = ms_of(result, target, pid)
    row = next((r for r in result["points"] if r["id"] == pid), {})
    floor = row.get("floor_ms")
    if ms is None or not floor:
        return _goal(goal, "-", None, why or f"{pid} has no floor (bandwidth or matmul peak not measured)")
    return _goal(goal, f"{target} {ms:.3f} ms = {ms / floor:.2f}x its {row['floor_bound']} floor ({floor:.3f} ms)",
                 ms / floor <= limit)


def _under(result: dict, goal: str, target: str, pid: str, limit_ms: float) -> dict:
    ms, why = ms_of(result, target, pid)
    if ms is None:
        return _goal(goal, "-", None, why)
    return _goal(goal, f"{target} {ms:.3f} ms", ms <= limit_ms)


def goal_prefill_faster(result: dict, mode: str, bases=("eager", "tc-ro")) -> dict:
    """`mode` faster than each base at every prefill size; each pair judged as `_paired` judges (a short prefill is
    host-bound: a pair timed in different host phases decides nothing unless the slow phase worked against it)."""
    goal = f"prefill <= {PREFILL_MAX_TOKENS} tokens: {mode} faster than {' and '.join(bases)} at every size"
    pids = [p["id"] for p in result["points"] if p["kind"] == "prefill" and p["tokens"] <= PREFILL_MAX_TOKENS]
    worst: dict[str, tuple[float, str]] = {}
    missing, judged = [], []
    for pid, base in ((pid, base) for pid in pids for base in bases):
        (ms, why), (b, why_b) = ms_of(result, mode, pid), ms_of(result, base, pid)
        if ms is None or b is None:
            missing.append(why or why_b)
            continue
        judged.append(_paired(result, goal, "", b / ms > 1.0, (mode, pid), (base, pid)))
        if base not in worst or b / ms < worst[base][0]:
            worst[base] = (b / ms, pid)
    if not worst:
        return _goal(goal, "-", None, "; ".join(missing[:3]) or "no prefill points")
    figure = "; ".join(f"slowest vs {b}: {x:.2f}x at {pid}" for b, (x, pid) in worst.items())
    statuses = {g["status"] for g in judged}
    notes = [g["detail"] for g in judged if g["status"] != "met" and g["detail"]] + missing
    ok = False if "missed" in statuses else None if "unknown" in statuses or missing else True
    return _goal(goal, figure, ok, "; ".join(notes[:3]))


def goal_pool(result: dict, mode: str) -> dict:
    limit, (n, top) = POOL_FRACTION[mode], POOL_SIZES
    goal = f"{mode}: graph pool < {limit:.0%} of the weights ({n} capture sizes up to {top} tokens)"
    e, weights = result["entries"].get(mode), result["meta"]["weight_bytes"]
    if e is None or not e.get("cuda_graphs"):
        return _goal(goal, "-", None, f"{mode}: no graphs ({(e or {}).get('reason') or 'not run'})")
    frac = e["pool_bytes"] / weights
    sizes = result["meta"]["capture_sizes"]
    same = len(sizes) == n and max(sizes) == top
    detail = "" if same else f"this run captured sizes {sizes}: a pool of the goal's sizes may be larger"
    if e.get("box_spent"):  # sizes are captured at first use: rows it never ran never grew the pool
        same, detail = False, f"{mode}'s time box was spent before all its rows ran: its pool may be larger"
    measured = {pid.split("/")[0] for pid, r in e.get("results", {}).items() if "ms" in r}
    lacking = [kind for kind in ("decode", "prefill") if kind not in measured]
    if lacking:  # prefill and decode are two Dynamo graphs, with a pool each
        same, detail = False, f"{mode} measured no {' or '.join(lacking)} row: its pool may be larger"
    return _goal(goal, f"{e['pool_bytes'] / 2**20:.0f} MiB = {frac:.1%} of {weights / 2**30:.2f} GiB",
                 frac < limit if same or frac >= limit else None, detail)


def evaluate(result: dict) -> list[dict]:
    """Every goal of issues 17 and 18 on this result, in the issues' order."""
    plan = result["meta"]["plan"]
    decode = {b: Point("decode", batch=b, context=plan["context"]).id for b in (*GOAL_BATCHES, 64)}
    per_token = {b: Point("per_token", batch=b, prompt=plan["prompt"], new_tokens=plan["new_tokens"]).id
                 for b in GOAL_BATCHES}
    ttft = Point("e2e", batch=1, prompt=plan["prompt"], new_tokens=1).id
    out = [_floor(result, f"full decode B={b} <= {x}x its floor", "full", decode[b], x) for b, x in FLOOR_X.items()]
    # at the generate steps' mean context (prompt + new_tokens / 2), not the decode rows' longer one
    gen_ctx = generate_context(plan["prompt"], plan["new_tokens"])
    at_gen = {b: Point("decode", batch=b, context=gen_ctx).id for b in GOAL_BATCHES}
    out += [_ratio(result, f"generate B={b}: full ms per new token <= {GENERATE_X}x full's decode step at its "
                           f"context", ("full", per_token[b]), ("full", at_gen[b]), GENERATE_X) for b in GOAL_BATCHES]
    out += [_ratio(result, f"decode B={b}: {m} <= {GRAPH_VS_FULL_X}x full", (m, decode[b]), ("full", decode[b]),
                   GRAPH_VS_FULL_X) for m in ("pcg", "bcg") for b in GOAL_BATCHES]
    out += [_faster(result, f"decode B={b}: full >= {TC_RO_SPEEDUP:g}x faster than tc-ro", ("full", decode[b]),
                    ("tc-ro", decode[b]), TC_RO_SPEEDUP) for b in GOAL_BATCHES]
    out.append(_faster(result, f"generate B=1: full >= {HF_STATIC_SPEEDUP:g}x faster than hf-static per new token",
                       ("full", per_token[1]), ("hf-static", per_token[1]), HF_STATIC_SPEEDUP))
    out += [goal_pool(result, m) for m in POOL_FRACTION]
    out += [_under(result, f"full prefill of {t} tokens <= {ms:g} ms", "full", Point("prefill", tokens=t, seqs=1).id,
                   ms) for t, ms in PREFILL_MS.items()]
    tokens, x = PREFILL_FLOOR_X
    out.append(_floor(result, f"full prefill of {tokens} tokens <= {x}x its compute floor", "full",
                      Point("prefill", tokens=tokens, seqs=1).id, x))
    seqs, each, x = PACKED_X
    out.append(_ratio(result, f"full prefill of {seqs} packed prompts of {each} <= {x}x one prompt of {seqs * each}",
                      ("full", Point("prefill", tokens=seqs * each, seqs=seqs).id),
                      ("full", Point("prefill", tokens=seqs * each, seqs=1).id), x))
    out.append(_under(result, f"full time to first token (prompt {plan['prompt']}, B=1) <= {TTFT_MS:g} ms", "full",
                      ttft, TTFT_MS))
    out += [goal_prefill_faster(result, m) for m in ("pcg", "bcg")]
    return out
