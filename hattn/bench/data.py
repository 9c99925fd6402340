"""The bench result as data: derived rows, floors, ratios and goals around what the runner measured; the JSON file.

    result = build(meta, points, entries, partial=[])   # rows (measured, then derived), ratios, goals
    write_json(result, "out/bench/bench.json")

Ratios: `vs_base` = base ms / target ms (a speedup; base: hattn's eager mode, or "ours" in the kernels suite);
`vs_floor` = target ms / the row's floor (hattn.bench.floor), for rows that have one.
"""
from __future__ import annotations

import json
import math

from hattn.bench import goals
from hattn.bench.floor import floor_ms
from hattn.bench.workloads import Point, generate_pair

SCHEMA = 2
ORDER = ("eager", "pcg", "bcg", "full", "hf-eager-fla", "hf-eager", "hf-static", "tc-default", "tc-ro",
         "ours", "fla", "torch", "copy")


def ordered(names) -> list[str]:
    names = list(names)
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def add_per_token(entries: dict, per_token: list[Point]) -> None:
    """Per generated token: (generate N tokens - generate 1 token) / (N - 1), so the prefill is not in it."""
    for p in per_token:
        one, many = generate_pair(p)
        for e in entries.values():
            r1, rn = e["results"].get(one), e["results"].get(many)
            if r1 is None or rn is None:
                continue
            if "ms" in r1 and "ms" in rn and rn["ms"] <= r1["ms"]:  # never a negative or zero time per token
                e["results"][p.id] = {"error": f"not measurable: {many} ({rn['ms']:.3f} ms) took no longer than "
                                               f"{one} ({r1['ms']:.3f} ms); the host was too noisy for this size"}
            elif "ms" in r1 and "ms" in rn:
                e["results"][p.id] = _per_token_row(r1, rn, p.new_tokens - 1, f"({many} - {one}) / {p.new_tokens - 1}")
            else:
                bad = rn if "ms" not in rn else r1
                e["results"][p.id] = {"skipped": f"needs both generate rows: {bad.get('error') or bad.get('skipped')}"}


def _per_token_row(r1: dict, rn: dict, steps: int, derived: str) -> dict:
    """The per-token row from its two generate rows, with their host probes and host time (the goals' host-phase
    rule reads them: a per-token figure is as host-bound as the rows it comes from)."""
    row = {"ms": (rn["ms"] - r1["ms"]) / steps, "derived": derived}
    probes = (r1.get("host_probe_us") or []) + (rn.get("host_probe_us") or [])
    if probes:
        row["host_probe_us"] = probes
    if r1.get("host_ms") is not None and rn.get("host_ms") is not None:
        row["host_ms"] = max(0.0, (rn["host_ms"] - r1["host_ms"]) / steps)
    return row


def rows(points: list[Point], meta: dict) -> list[dict]:
    """The points as JSON rows, each with its floor (ms and the bound that sets it) where known."""
    out = []
    for p in points:
        row = p.as_dict()
        row["floor_ms"], row["floor_bound"] = floor_ms(row, meta.get("copy_bandwidth"), meta.get("matmul_flops"))
        out.append(row)
    return out


def ratios(entries: dict, rows_: list[dict], base: str) -> dict:
    """{"base", "vs_base": {target: {row: base ms / ms}}, "vs_floor": {target: {row: ms / floor ms}}}."""
    floors = {r["id"]: r["floor_ms"] for r in rows_ if r["floor_ms"]}
    base_res = entries.get(base, {}).get("results", {})
    vs_base, vs_floor = {}, {}
    for name, e in entries.items():
        res = {pid: r["ms"] for pid, r in e["results"].items() if "ms" in r and r["ms"] > 0}
        vs_base[name] = {pid: base_res[pid]["ms"] / ms for pid, ms in res.items() if "ms" in base_res.get(pid, {})}
        vs_floor[name] = {pid: ms / floors[pid] for pid, ms in res.items() if pid in floors}
    return {"base": base, "vs_base": vs_base, "vs_floor": vs_floor}


def build(meta: dict, points: list[Point], entries: dict, partial: list[str] = ()) -> dict:
    """The whole result. points: measured then derived rows (per-token rows are filled in from the generate rows).
    Goals are evaluated for a GPU run of the model suite only (on a CPU they mean nothing)."""
    add_per_token(entries, [p for p in points if p.kind == "per_token"])
    table = rows(points, meta)
    result = {"schema": SCHEMA, "partial": bool(partial), "partial_reasons": list(partial), "meta": meta,
              "points": table, "entries": entries, "ratios": ratios(entries, table, meta["base"])}
    result["goals"] = None
    if meta["suite"] == "kernels":
        result["goals_note"] = "goals: none for the kernels suite"
    elif not meta["env"]["device"].startswith("cuda"):
        result["goals_note"] = ("goals: not evaluated, they mean nothing on a CPU (they are for a GPU run: H200, "
                                "qwen3.5-1b, bf16)")
    elif "plan" not in meta:
        result["goals_note"] = "goals: not evaluated, the run ended before its setup did (no plan, no rows)"
    else:
        result["goals"] = goals.evaluate(result)
    return result


def write_json(result: dict, path: str) -> None:
    """`result` as strict JSON: a non-finite float (an unbounded time box, a ratio without a base) is written as
    null, which every JSON parser reads (json.dump's default writes Infinity and NaN, which strict ones reject)."""
    with open(path, "w") as f:
        json.dump(_finite(result), f, indent=1, default=str, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
