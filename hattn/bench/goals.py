"""The goals of issue 7 (1B-class Qwen3.5, bf16, H100), each evaluated on a bench result: figure and met/missed.

A goal whose figure is missing is "unknown", with the reason the figure is missing (a skipped or failed point).
"""
from __future__ import annotations

from hattn.bench.workloads import Point

DECODE_FLOOR_X = 1.3      # full at decode batch 1 <= 1.3x the bandwidth floor
GRAPH_VS_FULL_X = 1.25    # pcg and bcg <= 1.25x full
PEER_SPEEDUP_X = 3.0      # full, pcg, bcg >= 3x faster than HF static cache + torch.compile (+fla)
PREFILL_MAX_TOKENS = 2048
CAPTURE_S, CAPTURE_SIZES = 10.0, 16
POOL_FRACTION = 0.05


def ms_of(result: dict, entry: str, pid: str) -> tuple[float | None, str | None]:
    """(median ms, None) or (None, why it is missing)."""
    e = result["entries"].get(entry)
    if e is None:
        return None, f"{entry} was not run (add it to --modes)"
    r = e["results"].get(pid)
    if r is None:
        return None, f"{entry} has no {pid} (add the workload)"
    if "ms" in r:
        return r["ms"], None
    return None, f"{entry} {pid}: {r.get('error') or r.get('skipped')}"


def _goal(goal: str, figure: str, ok: bool | None, detail: str = "") -> dict:
    status = "unknown" if ok is None else "met" if ok else "missed"
    return {"goal": goal, "figure": figure, "status": status, "detail": detail}


def _decode_b1(result: dict) -> str:
    return Point("decode", batch=1, context=result["meta"]["plan"]["context"]).id


def goal_floor(result: dict) -> dict:
    goal = f"decode B=1: full <= {DECODE_FLOOR_X}x the bandwidth floor"
    floor = result["meta"].get("floor_ms")
    ms, why = ms_of(result, "full", _decode_b1(result))
    if ms is None or not floor:
        return _goal(goal, "-", None, why or "no floor (copy bandwidth not measured)")
    return _goal(goal, f"full {ms:.3f} ms = {ms / floor:.2f}x floor ({floor:.3f} ms)", ms / floor <= DECODE_FLOOR_X)


def goal_vs_full(result: dict, mode: str) -> dict:
    goal = f"decode B=1: {mode} <= {GRAPH_VS_FULL_X}x full"
    pid = _decode_b1(result)
    (ms, why), (full, why_full) = ms_of(result, mode, pid), ms_of(result, "full", pid)
    if ms is None or full is None:
        return _goal(goal, "-", None, why or why_full)
    return _goal(goal, f"{mode} {ms:.3f} ms = {ms / full:.2f}x full ({full:.3f} ms)", ms / full <= GRAPH_VS_FULL_X)


def goal_vs_peer(result: dict) -> dict:
    goal = f"decode B=1: full, pcg, bcg each >= {PEER_SPEEDUP_X:g}x faster than HF static cache + torch.compile (+fla)"
    peer, why = ms_of(result, "hf-static", result["meta"]["per_token_id"])
    if peer is None:
        return _goal(goal, "-", None, why)
    parts, oks, missing = [], [], []
    for mode in ("full", "pcg", "bcg"):  # per generated token on both sides; a decode step if that is missing
        ms, why = ms_of(result, mode, result["meta"]["per_token_id"])
        what = ""
        if ms is None:
            (ms, why), what = ms_of(result, mode, _decode_b1(result)), " (decode step)"
        if ms is None:
            missing.append(why)
            continue
        parts.append(f"{mode} {peer / ms:.1f}x{what}")
        oks.append(peer / ms >= PEER_SPEEDUP_X)
    kernels = result["entries"]["hf-static"].get("kernels") or {}
    fla = "with fla" if any(v != "torch" for v in kernels.values()) else "without fla (not found)"
    figure = f"hf-static {peer:.3f} ms/token ({fla}); " + ", ".join(parts)
    ok = None if missing and all(oks) else all(oks) and not missing
    return _goal(goal, figure, ok, "; ".join(missing))


def goal_prefill(result: dict, mode: str) -> dict:
    goal = f"prefill/extend <= {PREFILL_MAX_TOKENS} tokens: {mode} faster than eager and inductor at every size"
    pids = [p["id"] for p in result["points"] if p["kind"] == "prefill" and p["tokens"] <= PREFILL_MAX_TOKENS]
    worst: dict[str, tuple[float, str]] = {}
    missing = []
    for pid in pids:
        ms, why = ms_of(result, mode, pid)
        if ms is None:
            missing.append(why)
            continue
        for base in ("eager", "inductor"):
            b, why_b = ms_of(result, base, pid)
            if b is None:
                missing.append(why_b)
            elif base not in worst or b / ms < worst[base][0]:
                worst[base] = (b / ms, pid)
    if not worst:
        return _goal(goal, "-", None, "; ".join(missing[:3]) or "no prefill points")
    figure = "; ".join(f"slowest vs {b}: {x:.2f}x at {pid}" for b, (x, pid) in worst.items())
    beaten = all(x > 1.0 for x, _ in worst.values())
    ok = beaten and len(worst) == 2 and not missing
    return _goal(goal, figure, None if beaten and not ok else ok, "; ".join(missing[:3]))


def goal_capture(result: dict, mode: str) -> dict:
    goal = f"{mode}: capture of {CAPTURE_SIZES} sizes < {CAPTURE_S:g} s"
    e = result["entries"].get(mode)
    if e is None or e.get("capture_s") is None or not e.get("capture_sizes_done"):
        return _goal(goal, "-", None, f"{mode}: nothing captured ({(e or {}).get('reason') or 'not run'})")
    sizes = e["capture_sizes_done"]
    figure = f"{e['capture_s']:.2f} s for {sizes} sizes ({e['cuda_graphs']} graphs)"
    return _goal(goal, figure, _partial(e["capture_s"] < CAPTURE_S, sizes),
                 "" if sizes == CAPTURE_SIZES else f"{sizes} sizes captured (Dynamo graphs: {e.get('dynamo_graphs')})")


def _partial(ok: bool, sizes: int):
    """Fewer sizes than the goal's give a lower bound: it can show a miss, never a pass (unknown instead)."""
    return ok if ok is False or sizes >= CAPTURE_SIZES else None


def goal_pool(result: dict, mode: str) -> dict:
    goal = f"{mode}: graph pool memory < {POOL_FRACTION:.0%} of weight memory"
    e, weights = result["entries"].get(mode), result["meta"]["weight_bytes"]
    if e is None or not e.get("cuda_graphs"):
        return _goal(goal, "-", None, f"{mode}: no graphs ({(e or {}).get('reason') or 'not run'})")
    frac = e["pool_bytes"] / weights
    # full captures the decode sizes that fit the cache's slots only, by design; pcg and bcg should have all 16
    sizes = CAPTURE_SIZES if mode == "full" else e.get("capture_sizes_done") or 0
    return _goal(goal, f"{e['pool_bytes'] / 2**20:.0f} MiB = {frac:.1%} of {weights / 2**30:.2f} GiB",
                 _partial(frac < POOL_FRACTION, sizes),
                 "" if sizes >= CAPTURE_SIZES else f"only {sizes} sizes captured: the pool of {CAPTURE_SIZES} may be larger")


def evaluate(result: dict) -> list[dict]:
    """Every goal of the issue on this result, in the issue's order."""
    return [
        goal_floor(result), goal_vs_full(result, "pcg"), goal_vs_full(result, "bcg"), goal_vs_peer(result),
        goal_prefill(result, "pcg"), goal_prefill(result, "bcg"),
        goal_capture(result, "pcg"), goal_capture(result, "bcg"),
        goal_pool(result, "pcg"), goal_pool(result, "bcg"), goal_pool(result, "full"),
    ]
