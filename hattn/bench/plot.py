"""The bench report as a PNG: one panel per series (ms against size, a line per target, the floor dashed), and a
bar panel of the per-token rows. Needs matplotlib; without it the result records why there is no plot.

    write_png(result, "out/bench/bench.png")     # sets result["plot"] to {"path"} or {"error"}
"""
from __future__ import annotations

from hattn.bench.data import ORDER, ordered

COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "k", "C0", "C1", "C2", "C3")  # one per ORDER entry


def _color(name: str) -> str:
    return COLORS[ORDER.index(name)] if name in ORDER else "gray"


def _series(result: dict) -> dict[str, list[dict]]:
    """Rows by series, for series of two or more sizes (the generate pairs and derived rows are left out)."""
    out: dict[str, list[dict]] = {}
    for p in result["points"]:
        if p["kind"] not in ("e2e", "per_token"):
            out.setdefault(p["series"], []).append(p)
    return {s: rows for s, rows in out.items() if len(rows) > 1}


def _lines(ax, result: dict, names: list[str], title: str, rows: list[dict]) -> None:
    """One line per target over `rows` (log-log), x ticks at the measured sizes, the rows' floor dashed."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    key = "tokens" if rows[0]["tokens"] else "batch"
    for n in names:
        res = result["entries"][n]["results"]
        pts = [(p[key], res[p["id"]]["ms"]) for p in rows if "ms" in res.get(p["id"], {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=n, color=_color(n))
    floor = [(p[key], p["floor_ms"]) for p in rows if p["floor_ms"]]
    if floor:
        ax.plot(*zip(*floor), "k--", label="floor")
    ax.set(xscale="log", yscale="log", xlabel=key, ylabel="ms", title=title)
    ax.set_xticks([p[key] for p in rows])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)


def _per_token_bars(ax, result: dict, names: list[str], rows: list[dict]) -> None:
    width = 0.8 / max(1, len(rows))
    for i, p in enumerate(rows):
        bars = [(j + i * width, result["entries"][n]["results"][p["id"]]["ms"]) for j, n in enumerate(names)
                if "ms" in result["entries"][n]["results"].get(p["id"], {})]
        if bars:
            ax.bar(*zip(*bars), width=width, label=f"B={p['batch']}", alpha=1 - 0.4 * i)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set(ylabel="ms", title="generate: ms per new token")
    ax.legend(fontsize=8)


class NothingToPlot(ValueError):
    """A result without a series to draw (one size per workload, or nothing measured)."""


def plot(result: dict, path: str) -> None:
    series, names = _series(result), ordered(result["entries"])
    per_token = [p for p in result["points"] if p["kind"] == "per_token"]
    panels = len(series) + bool(per_token)
    if not panels:
        raise NothingToPlot("nothing to plot: no series of two or more sizes, nor a per-token row")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = 2 if panels > 1 else 1
    fig, axes = plt.subplots((panels + cols - 1) // cols, cols, figsize=(7 * cols, 5 * ((panels + cols - 1) // cols)),
                             squeeze=False)
    axes = [ax for row in axes for ax in row]
    for ax, (title, rows) in zip(axes, series.items()):
        _lines(ax, result, names, title, rows)
    if per_token:
        _per_token_bars(axes[len(series)], result, names, per_token)
    for ax in axes[panels:]:
        ax.set_visible(False)
    m = result["meta"]
    fig.suptitle(f"hattn bench --suite {m['suite']}: {m.get('model') or ''} {m.get('dtype') or ''}, "
                 f"{m['env']['device_name']}\ntorch {m['env']['torch']}, transformers {m['env']['transformers']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_png(result: dict, path: str) -> None:
    """Write the plot, or record why not in result["plot"] (no matplotlib, no points)."""
    try:
        plot(result, path)
        result["plot"] = {"path": path}
    except NothingToPlot as e:
        result["plot"] = {"error": str(e)}
    except Exception as e:  # noqa: BLE001  (no matplotlib, no display: the reason goes in the JSON and the text)
        hint = " (pip install matplotlib)" if isinstance(e, ImportError) else ""
        result["plot"] = {"error": f"{type(e).__name__}: {e}{hint}"}
