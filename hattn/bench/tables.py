"""The bench report as text: rich tables on the terminal, and the same text in bench.txt.

    print_report(result, "out/bench/bench.txt")

Tables: latency (median ms, speedup vs the base in brackets), x floor, startup (the first call split by hattn's
counters), targets (status, compile, capture, memory), goals (GPU runs; one line on a CPU), notes (the reasons the
cells point at: `skip[3]` / `FAIL[3]`) and profiles.
"""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from hattn.bench.data import ordered
from hattn.bench.goals import probe_us


class Notes:
    """Numbered reasons: a table cell shows `skip[3]` / `FAIL[3]`, the notes list says what 3 is."""

    def __init__(self):
        self.items: list[str] = []

    def ref(self, name: str, text: str) -> int:
        item = f"{name}: {text}"
        if item not in self.items:
            self.items.append(item)
        return self.items.index(item) + 1


def _table(title: str, headers, **kw) -> Table:
    t = Table(title=title, title_justify="left", **kw)
    for h in headers:
        t.add_column(h, overflow="fold")
    return t


def _cell(r: dict | None, name: str, notes: Notes, extra: str = "") -> str:
    if r is None:
        return ""
    if "ms" in r:
        return f"{r['ms']:.4g}{extra}"
    if "error" in r:
        return f"FAIL[{notes.ref(name, r['error'])}]"
    return f"skip[{notes.ref(name, r['skipped'])}]"


def _f(x, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else f"{x / scale:{fmt}}"


def tables(result: dict) -> list:
    """rich renderables (and strings) in print order."""
    entries, notes = result["entries"], Notes()
    names = ordered(entries)
    out = [latency_table(result, names, notes), floor_table(result, names)]
    host = host_table(result, names)
    if host.row_count:
        out.append(host)
    chained = back_to_back_table(result, names)
    if chained.row_count:
        out.append(chained)
    out += [startup_table(entries, names), targets_table(result, names, notes)]
    out.append(goals_table(result["goals"], result["meta"]["env"]["device_name"]) if result["goals"] is not None
               else result["goals_note"])
    for name in names:  # entry-level failures too
        if entries[name]["status"] != "ok" and entries[name].get("reason"):
            notes.ref(name, entries[name]["reason"])
    return out + [notes_table(notes)] + profile_tables(entries, names)


def latency_table(result: dict, names: list[str], notes: Notes) -> Table:
    base, vs_base = result["ratios"]["base"], result["ratios"]["vs_base"]
    t = _table(f"latency, ms (median); (x): speedup vs {base}", ["workload"] + names)
    for p in result["points"]:
        row = []
        for n in names:
            x = vs_base.get(n, {}).get(p["id"])
            extra = f" ({x:.2f}x)" if x is not None and n != base else ""
            row.append(_cell(result["entries"][n]["results"].get(p["id"]), n, notes, extra))
        t.add_row(p["label"], *row)
    return t


def floor_table(result: dict, names: list[str]) -> Table:
    m = result["meta"]
    peak = f"{m['matmul_flops'] / 1e12:.0f} TFLOP/s bf16 matmul" if m.get("matmul_flops") else "no matmul peak"
    # a CPU's copy bandwidth is measured on buffers larger than its caches: a small row that stays in them beats it
    on_cpu = m.get("env", {}).get("device") == "cpu"
    cached = "; on a CPU, rows whose bytes fit its caches may go under 1x" if on_cpu else ""
    t = _table(f"x floor: bytes / {_f(m.get('copy_bandwidth'), '.0f', 1e9)} GB/s copy, FLOPs / {peak} "
               f"(hattn.bench.floor){cached}", ["workload", "floor ms", "bound"] + names)
    for p in result["points"]:
        row = [result["ratios"]["vs_floor"].get(n, {}).get(p["id"]) for n in names]
        if p["floor_ms"] and any(v is not None for v in row):
            t.add_row(p["label"], f"{p['floor_ms']:.4g}", p["floor_bound"], *[_f(v, ".2f") + "x" if v else ""
                                                                               for v in row])
    return t


def host_table(result: dict, names: list[str]) -> Table:
    """Per point and target, the host's ms in the call against the call's ms (GPU runs): a host time near the
    latency is a host-bound step (or one that waited for the GPU), one far below it a GPU-bound step."""
    t = _table("host time in the call / latency, ms (median; after a sync, so the GPU waits for the host's first "
               "launch); (n): the host probe, us of fixed Python work while the row ran (harness.host_probe_us: "
               "rows compare where it agrees)", ["workload"] + names)

    def cell(name: str, pid: str) -> str:
        r, probe = result["entries"][name]["results"].get(pid) or {}, probe_us(result, name, pid)
        if "host_ms" not in r:
            return ""
        return f"{r['host_ms']:.3g} / {r['ms']:.3g}" + (f" ({probe:.0f})" if probe is not None else "")
    for p in result["points"]:
        cells = [cell(n, p["id"]) for n in names]
        if any(cells):
            t.add_row(p["label"], *cells)
    return t


def back_to_back_table(result: dict, names: list[str]) -> Table:
    """Per decode point and target, a step's ms among steps called back to back (the host queues the next while the
    GPU runs the last, as a serving loop does) and its floor ratio: what the GPU side costs when the host keeps up.
    The latency rows (and the goals) time each call after a sync, host work before the first launch included."""
    t = _table("decode back to back, ms a step (x floor): no sync between steps, so host work overlaps the GPU's",
               ["workload"] + names)
    for p in result["points"]:
        cells = [result["entries"][n]["results"].get(p["id"]) or {} for n in names]
        if not any("back_to_back_ms" in r for r in cells):
            continue
        floor = p.get("floor_ms")

        def cell(ms):
            return "" if ms is None else f"{ms:.4g}" + (f" ({ms / floor:.2f}x)" if floor else "")
        t.add_row(p["label"], *[cell(r.get("back_to_back_ms")) for r in cells])
    return t


def startup_table(entries: dict, names: list[str]) -> Table:
    """The first call's seconds: each counter of hattn's backend (`*_seconds`), and what no counter covers."""
    starts = {n: entries[n]["startup"] for n in names if "first_call_s" in entries[n].get("startup", {})}
    counters = [k for s in starts.values() for k in s if k not in ("first_call_s", "other_s")]
    counters = list(dict.fromkeys(counters))
    t = _table("startup: the first call, s", ["target", "first call"] + counters
               + ["other (Dynamo, inductor, first kernels)"])
    for n, s in starts.items():
        t.add_row(n, _f(s["first_call_s"]), *[_f(s.get(k)) for k in counters], _f(s["other_s"]))
    return t


def targets_table(result: dict, names: list[str], notes: Notes) -> Table:
    weights = result["meta"].get("weight_bytes")
    t = _table("targets: time, compile, capture, memory",
               ("target", "status", "time s", "first calls s", "capture s", "graphs", "pool MiB", "pool/weights",
                "peak MiB", "peak over base MiB", "dynamo graphs", "graph breaks", "notes"))
    for n in names:
        e = result["entries"][n]
        pool = e.get("pool_bytes")
        status = e["status"] if e["status"] == "ok" else f"{e['status']}[{notes.ref(n, e.get('reason') or '?')}]"
        t.add_row(n, status, _f(e.get("time_s"), ".0f"), _f(e.get("warmup_overhead_s")), _f(e.get("capture_s")),
                  str(e.get("cuda_graphs", "-")), _f(pool, ".0f", 2**20),
                  f"{pool / weights:.1%}" if pool is not None and weights else "-",
                  _f(e.get("peak_bytes"), ".0f", 2**20),
                  _f(e.get("peak_over_base_bytes"), ".0f", 2**20), str(e.get("dynamo_graphs", "-")),
                  str(e.get("graph_breaks", "-")), "; ".join(e.get("notes", [])))
    return t


def goals_table(goal_rows: list[dict], device: str) -> Table:
    """The goals, set for an H200, judged on this run's figures (from `device`: another GPU's figures differ)."""
    t = _table(f"goals (issues 17 and 18: set for the H200, qwen3.5-1b, bf16; judged on this run, {device})",
               ("goal", "figure", "status", "detail"))
    style = {"met": "green", "missed": "red", "unknown": "yellow"}
    for g in goal_rows:
        t.add_row(g["goal"], g["figure"], f"[{style[g['status']]}]{g['status']}[/]", g["detail"])
    return t


def notes_table(notes: Notes) -> Table:
    t = _table("notes (skips and failures, by number)", ("n", "reason"), show_header=False)
    for i, item in enumerate(notes.items, 1):
        t.add_row(f"[{i}]", item)
    return t


def profile_tables(entries: dict, names: list[str]) -> list[Table]:
    out = []
    for n in names:
        for pid, prof in (entries[n].get("profile") or {}).items():
            if "top" not in prof:
                continue
            unit = f"{prof['time']} ms/step"
            t = _table(f"profile {n} {pid}: {prof['total_ms_per_step']:.3f} {unit}, of which split ops "
                       f"{prof['split_ops_ms_per_step']:.3f} (top ops by self time)",
                       ("op", "calls/step", unit, "cpu self ms/step"))
            split = {r["name"] for r in prof["split_ops"]}
            for r in prof["split_ops"]:
                t.add_row(f"{r['name']} (with what it calls)", f"{r['calls']:g}", f"{r['total_ms_per_step']:.3f}",
                          f"{r['cpu_ms_per_step']:.3f}")
            for r in [r for r in prof["top"] if r["name"] not in split][:8]:
                t.add_row(r["name"], f"{r['calls']:g}", f"{r['ms_per_step']:.3f}", f"{r['cpu_ms_per_step']:.3f}")
            out.append(t)
    return out


def header(result: dict) -> str:
    m, env = result["meta"], result["meta"]["env"]
    what = m.get("model") or ", ".join(m["workloads"])
    size = f" ({m['params'] / 1e9:.3f}B params, {m['dtype']})" if m.get("params") else ""
    partial = f"\nPARTIAL: {'; '.join(result['partial_reasons'])}" if result["partial"] else ""
    total = f"{m['total_s']:.0f} s" if m.get("total_s") is not None else "?"
    return (f"hattn bench --suite {m['suite']}: {what}{size} on {env['device_name']} | torch {env['torch']} | "
            f"triton {env['triton']} | transformers {env['transformers']} | fla {env['fla']} | {total} of a "
            f"{m['budget_s']:.0f} s budget{partial}")


def print_report(result: dict, txt_path: str, console: Console | None = None) -> None:
    """Print the header and every table; write the same text to `txt_path`."""
    console = console or Console(record=True, width=240)
    console.print(header(result))
    for t in tables(result):
        console.print(t)
    plot = result.get("plot", {})
    console.print(f"plot: {plot.get('path') or plot.get('error')}")
    with open(txt_path, "w") as f:
        f.write(console.export_text())
