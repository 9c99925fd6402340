"""The bench report: derived figures and ratios, the terminal tables (rich), the JSON file and the PNG plot.

    result = build(meta, points, entries)     # adds the per-token rows, ratios and goals
    write(result, out_dir)                    # bench.json, bench.png, bench.txt (the tables as printed)

Ratios: `vs_eager` = eager ms / target ms (a speedup, > 1 is faster than hattn's eager mode); `vs_floor` = target
ms / floor ms for decode rows, where floor = weight bytes / copy bandwidth measured in the same run.
"""
from __future__ import annotations

import json
import os

from hattn.bench import goals
from hattn.bench.workloads import Point

ORDER = ("eager", "pcg", "bcg", "full", "hf-eager-fla", "hf-eager", "hf-static", "tc-default", "tc-ro")
SCHEMA = 1


def ordered(names) -> list[str]:
    names = list(names)
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


# -- derived figures -----------------------------------------------------------------------------------------------
def add_per_token(entries: dict, meta: dict) -> None:
    """Per generated token: (generate N tokens - generate 1 token) / (N - 1), so prefill is not in it."""
    one, many = meta["e2e_ids"]
    n, pid = meta["plan"]["new_tokens"], meta["per_token_id"]
    for e in entries.values():
        r1, rn = e["results"].get(one), e["results"].get(many)
        if r1 is None or rn is None:
            continue
        if "ms" in r1 and "ms" in rn:
            e["results"][pid] = {"ms": (rn["ms"] - r1["ms"]) / (n - 1), "derived": f"({many} - {one}) / {n - 1}"}
        else:
            bad = rn if "ms" not in rn else r1
            e["results"][pid] = {"skipped": f"needs both generate rows: {bad.get('error') or bad.get('skipped')}"}


def ratios(entries: dict, floor_ms: float | None, floor_rows: set[str], base: str = "eager") -> dict:
    """{"base", "vs_eager": {target: {point: base_ms / ms}}, "vs_floor": {target: {point: ms / floor}}}."""
    base_res = entries.get(base, {}).get("results", {})
    vs_base, vs_floor = {}, {}
    for name, e in entries.items():
        res = {pid: r["ms"] for pid, r in e["results"].items() if "ms" in r and r["ms"] > 0}
        vs_base[name] = {pid: base_res[pid]["ms"] / ms for pid, ms in res.items() if "ms" in base_res.get(pid, {})}
        vs_floor[name] = {pid: ms / floor_ms for pid, ms in res.items() if floor_ms and pid in floor_rows}
    return {"base": base, "vs_eager": vs_base, "vs_floor": vs_floor}


def build(meta: dict, points: list[Point], entries: dict) -> dict:
    """The whole result: meta, points (in table order, the derived per-token row last), entries, ratios, goals."""
    add_per_token(entries, meta)
    rows = [p.as_dict() for p in points]
    if any(meta["per_token_id"] in e["results"] for e in entries.values()):
        rows.append({"id": meta["per_token_id"], "label": "generate: ms per new token", "kind": "per_token"})
    floor_rows = {p.id for p in points if p.kind == "decode"} | {meta["per_token_id"]}
    result = {"schema": SCHEMA, "meta": meta, "points": rows, "entries": entries,
              "ratios": ratios(entries, meta.get("floor_ms"), floor_rows)}
    result["goals"] = goals.evaluate(result)
    return result


# -- terminal tables -----------------------------------------------------------------------------------------------
class Notes:
    """Numbered reasons: a table cell shows `skip[3]` / `FAIL[3]`, the notes list says what 3 is."""

    def __init__(self):
        self.items: list[str] = []

    def ref(self, name: str, text: str) -> int:
        item = f"{name}: {text}"
        if item not in self.items:
            self.items.append(item)
        return self.items.index(item) + 1


def _cell(r: dict | None, name: str, notes: Notes, extra: str = "") -> str:
    if r is None:
        return ""
    if "ms" in r:
        return f"{r['ms']:.3f}{extra}"
    if "error" in r:
        return f"FAIL[{notes.ref(name, r['error'])}]"
    return f"skip[{notes.ref(name, r['skipped'])}]"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def tables(result: dict) -> list:
    """rich renderables: latency, floor, targets, goals, notes (the reasons the other tables point at), profiles."""
    entries, notes = result["entries"], Notes()
    names = ordered(entries)
    out = [_latency_table(result, names, notes), _floor_table(result, names), _target_table(result, names, notes),
           goals_table(result["goals"])]
    for name in names:  # entry-level failures too
        if entries[name]["status"] != "ok" and entries[name].get("reason"):
            notes.ref(name, entries[name]["reason"])
    return out + [_notes_table(notes)] + _profile_tables(entries, names)


def _latency_table(result: dict, names: list[str], notes: Notes):
    from rich.table import Table

    base, vs_eager = result["ratios"]["base"], result["ratios"]["vs_eager"]
    t = Table(title=f"latency, ms (median); (x): speedup vs {base}", title_justify="left")
    t.add_column("workload")
    for n in names:
        t.add_column(n, justify="right")
    for p in result["points"]:
        row = []
        for n in names:
            x = vs_eager.get(n, {}).get(p["id"])
            extra = f" ({x:.2f}x)" if x is not None and n != base else ""
            row.append(_cell(result["entries"][n]["results"].get(p["id"]), n, notes, extra))
        t.add_row(p["label"], *row)
    return t


def _floor_table(result: dict, names: list[str]):
    from rich.table import Table

    meta = result["meta"]
    floor = meta.get("floor_ms")
    title = (f"decode vs bandwidth floor: {meta['weight_bytes'] / 1e9:.2f} GB weights / "
             f"{(meta.get('copy_bandwidth') or 0) / 1e12:.2f} TB/s copy = {floor or 0:.3f} ms per step (x floor)")
    t = Table(title=title, title_justify="left")
    t.add_column("workload")
    for n in names:
        t.add_column(n, justify="right")
    for p in result["points"]:
        row = [result["ratios"]["vs_floor"].get(n, {}).get(p["id"]) for n in names]
        if any(v is not None for v in row):
            t.add_row(p["label"], *[f"{v:.2f}x" if v is not None else "" for v in row])
    return t


def _target_table(result: dict, names: list[str], notes: Notes):
    from rich.table import Table

    weights = result["meta"]["weight_bytes"]
    t = Table(title="targets: first call, compile, capture, memory", title_justify="left")
    for h in ("target", "status", "first call s", "compile s", "capture s", "graphs", "pool MiB", "pool/weights",
              "peak MiB", "peak over base MiB", "dynamo graphs", "graph breaks", "notes"):
        t.add_column(h, overflow="fold")
    for n in names:
        e = result["entries"][n]
        pool = e.get("pool_bytes")
        status = e["status"] if e["status"] == "ok" else f"{e['status']}[{notes.ref(n, e.get('reason') or '?')}]"
        t.add_row(n, status, _s(e.get("first_call_s")), _s(e.get("compile_s")), _s(e.get("capture_s")),
                  str(e.get("cuda_graphs", "-")), _mb(pool), f"{pool / weights:.1%}" if pool is not None else "-",
                  _mb(e.get("peak_bytes")), _mb(e.get("peak_over_base_bytes")), str(e.get("dynamo_graphs", "-")),
                  str(e.get("graph_breaks", "-")), "; ".join(e.get("notes", [])))
    return t


def goals_table(goal_rows: list[dict]):
    from rich.table import Table

    t = Table(title="goals (issue 7: 1B-class Qwen3.5, bf16, H100)", title_justify="left")
    for h in ("goal", "figure", "status", "detail"):
        t.add_column(h, overflow="fold")
    style = {"met": "green", "missed": "red", "unknown": "yellow"}
    for g in goal_rows:
        t.add_row(g["goal"], g["figure"], f"[{style[g['status']]}]{g['status']}[/]", g["detail"])
    return t


def _notes_table(notes: Notes):
    from rich.table import Table

    t = Table(title="notes (skips and failures, by number)", title_justify="left", show_header=False)
    t.add_column("n", justify="right")
    t.add_column("reason", overflow="fold")
    for i, item in enumerate(notes.items, 1):
        t.add_row(f"[{i}]", item)
    return t


def _profile_tables(entries: dict, names: list[str]) -> list:
    from rich.table import Table

    out = []
    for n in names:
        for pid, prof in (entries[n].get("profile") or {}).items():
            if "top" not in prof:
                continue
            unit = f"{prof['time']} ms/step"
            t = Table(title=f"profile {n} {pid}: {prof['total_ms_per_step']:.3f} {unit}, of which split ops "
                            f"{prof['split_ops_ms_per_step']:.3f} (top ops by self time)", title_justify="left")
            for h in ("op", "calls/step", unit, "cpu self ms/step"):
                t.add_column(h, overflow="fold")
            split = {r["name"] for r in prof["split_ops"]}
            for r in prof["split_ops"]:
                t.add_row(f"{r['name']} (with what it calls)", f"{r['calls']:g}", f"{r['total_ms_per_step']:.3f}",
                          f"{r['cpu_ms_per_step']:.3f}")
            for r in [r for r in prof["top"] if r["name"] not in split][:8]:
                t.add_row(r["name"], f"{r['calls']:g}", f"{r['ms_per_step']:.3f}", f"{r['cpu_ms_per_step']:.3f}")
            out.append(t)
    return out


def header(result: dict) -> str:
    m = result["meta"]
    return (f"hattn bench: {m['model']} ({m['params'] / 1e9:.3f}B params, {m['dtype']}) on {m['env']['device_name']} "
            f"| torch {m['env']['torch']} | triton {m['env']['triton']} | transformers {m['env']['transformers']} "
            f"| fla {m['env']['fla']} | {m['total_s']:.0f} s of a {m['budget_s']:.0f} s budget")


# -- files ---------------------------------------------------------------------------------------------------------
def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def plot(result: dict, path: str) -> None:
    """Latency per target: prefill (one / several sequences) vs tokens, decode vs batch, ms per generated token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    points, names = result["points"], ordered(result["entries"])
    seqs = max((p["seqs"] for p in points if p["kind"] == "prefill"), default=1)
    for ax, kind, s, key in [(axes[0][0], "prefill", 1, "tokens"), (axes[0][1], "prefill", seqs, "tokens"),
                             (axes[1][0], "decode", None, "batch")]:
        rows = [p for p in points if p["kind"] == kind and (s is None or p["seqs"] == s)]
        _lines(ax, result, names, rows, key)
        ctx = result["meta"]["plan"]["context"]
        ax.set(title=kind + (f" ({s} sequence{'s' if s > 1 else ''})" if s else f" (context {ctx})"))
    floor = result["meta"].get("floor_ms")
    if floor:
        axes[1][0].axhline(floor, color="k", linestyle="--", label=f"bandwidth floor {floor:.3f} ms")
        axes[1][0].legend(fontsize=8)
    _per_token_bars(axes[1][1], result, names)
    m = result["meta"]
    fig.suptitle(f"hattn bench: {m['model']}, {m['dtype']}, {m['env']['device_name']}\n"
                 f"torch {m['env']['torch']}, transformers {m['env']['transformers']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "k")  # one per ORDER entry, same in every panel


def _color(name: str) -> str:
    return COLORS[ORDER.index(name)] if name in ORDER else "gray"


def _lines(ax, result: dict, names: list[str], rows: list[dict], key: str) -> None:
    """One line per target over `rows` (log-log), x ticks at the measured sizes."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for n in names:
        res = result["entries"][n]["results"]
        pts = [(p[key], res[p["id"]]["ms"]) for p in rows if "ms" in res.get(p["id"], {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=n, color=_color(n))
    ax.set(xscale="log", yscale="log", xlabel=key, ylabel="ms")
    if rows:
        ax.set_xticks([p[key] for p in rows])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)


def _per_token_bars(ax, result: dict, names: list[str]) -> None:
    pid = result["meta"]["per_token_id"]
    bars = [(n, result["entries"][n]["results"][pid]["ms"]) for n in names
            if "ms" in result["entries"][n]["results"].get(pid, {})]
    if bars:
        ax.bar(*zip(*bars), color=[_color(n) for n, _ in bars])
        ax.tick_params(axis="x", rotation=30)
    ax.set(ylabel="ms", title="generate: ms per new token (batch 1)")


def write(result: dict, out_dir: str, console=None) -> dict:
    """Write bench.json, bench.png and bench.txt under out_dir; print the tables. Returns {file kind: path}."""
    from rich.console import Console

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "bench.json"), "png": os.path.join(out_dir, "bench.png"),
             "txt": os.path.join(out_dir, "bench.txt")}
    try:
        plot(result, paths["png"])
        result["plot"] = {"path": paths["png"]}
    except Exception as e:  # noqa: BLE001  (no matplotlib, no display: the reason goes in the JSON and the text)
        result["plot"] = {"error": f"{type(e).__name__}: {e} (pip install matplotlib)"}
        paths.pop("png")
    write_json(result, paths["json"])
    console = console or Console(record=True, width=240)
    console.print(header(result))
    for t in tables(result):
        console.print(t)
    console.print(f"plot: {result['plot'].get('path') or result['plot']['error']}; json: {paths['json']}")
    with open(paths["txt"], "w") as f:
        f.write(console.export_text())
    return paths
