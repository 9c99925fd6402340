"""Report: per-token rows, floors and ratios, the goals of issues 17 and 18 met / missed / unknown, tables that show
every reason, JSON, text and PNG files."""
import dataclasses
import io
import json

import pytest
from rich.console import Console

from hattn.bench import data, goals, tables
from hattn.bench.cli import SIZES16, write_report
from hattn.bench.workloads import Plan

PLAN = Plan(tokens=[16, 256, 1024, 4096, 8192], seqs=4, batches=[1, 16, 64], context=1024, prompt=128,
            new_tokens=128, gen_batches=[1, 16])
WEIGHTS, BANDWIDTH, PEAK = 2 * 10**9, 2e12, 1e15


def points():
    """Decode and per-token rows floor at 0.5 ms (1 GB at 2 TB/s); prefill 8192 at 5 ms (5 TFLOP at 1 PFLOP/s)."""
    out = []
    for p in PLAN.points() + PLAN.derived():
        if p.kind in ("decode", "per_token"):
            p = dataclasses.replace(p, bytes=10**9)
        elif p.kind == "prefill":
            p = dataclasses.replace(p, bytes=10**8, flops=5 * 10**12 if p.tokens == 8192 else 10**9)
        out.append(p)
    return out


def meta(device="cuda:0"):
    return {"suite": "model", "model": "fake", "dtype": "bfloat16", "params": WEIGHTS // 2, "weight_bytes": WEIGHTS,
            "copy_bandwidth": BANDWIDTH, "matmul_flops": PEAK, "plan": PLAN.as_dict(), "capture_sizes": SIZES16,
            "base": "eager", "budget_s": 480.0, "total_s": 300.0, "workloads": ["decode", "prefill", "e2e"],
            "env": {"device": device, "device_name": "fake GPU", "torch": "t", "triton": "x", "transformers": "y",
                    "fla": "z"}}


def entry(decode, prefill, ttft=50.0, per_token=2.0, **extra):
    """decode, prefill: ms by batch / tokens (or one value for all); x4 prefill rows: 1.1x the x1 row."""
    results = {}
    for p in PLAN.points():
        if p.kind == "decode":
            ms = decode[p.batch] if isinstance(decode, dict) else decode
        elif p.kind == "prefill":
            ms = (prefill[p.tokens] if isinstance(prefill, dict) else prefill) * (1.1 if p.seqs > 1 else 1.0)
        else:
            ms = ttft + (p.new_tokens - 1) * per_token
        results[p.id] = {"ms": ms, "first_ms": 10.0, "reps": 3, "times_ms": [ms], "calls": 1}
    return {"kind": "hattn", "about": "", "status": "ok", "reason": None, "results": results, "notes": [], **extra}


def graphs(pool_mib):
    return {"capture_s": 3.0, "capture_sizes_done": 16, "cuda_graphs": 64, "pool_bytes": pool_mib * 2**20}


def good_entries():
    full_prefill = {16: 0.8, 256: 1.5, 1024: 4.0, 4096: 10.0, 8192: 6.0}
    return {
        "eager": entry(10.0, 20.0),
        "pcg": entry(1.0, 2.0, **graphs(100)),
        "bcg": entry(1.1, 2.5, **graphs(150)),
        "full": entry(0.9, full_prefill, ttft=1.5, per_token=0.92, **graphs(50)),
        "tc-ro": entry(3.0, 5.0),
        "hf-static": {**entry(0, 0, ttft=30.0, per_token=4.0), "kind": "peer"},
    }


def good_result(device="cuda:0", partial=()):
    return data.build(meta(device), points(), good_entries(), list(partial))


def by_goal(result):
    return {g["goal"]: g for g in result["goals"]}


def test_per_token_rows_are_the_difference_of_the_generate_rows():
    r = good_result()
    assert r["entries"]["hf-static"]["results"]["per_token/B1/P128/N128"]["ms"] == pytest.approx(4.0)
    assert r["entries"]["full"]["results"]["per_token/B16/P128/N128"]["ms"] == pytest.approx(0.92)
    assert [p["id"] for p in r["points"][-2:]] == ["per_token/B1/P128/N128", "per_token/B16/P128/N128"]
    entries = good_entries()
    entries["pcg"]["results"]["e2e/B1/P128/N128"]["ms"] = 40.0  # took less than its 1-token row (50 ms): noise
    got = data.build(meta(), points(), entries)["entries"]["pcg"]["results"]["per_token/B1/P128/N128"]
    assert "ms" not in got and got["error"].startswith("not measurable: e2e/B1/P128/N128 (40.000 ms) took no longer")


def test_rows_carry_their_floor_and_ratios_use_it():
    r = good_result()
    row = {p["id"]: p for p in r["points"]}
    assert (row["decode/B16/C1024"]["floor_ms"], row["decode/B16/C1024"]["floor_bound"]) == (0.5, "memory")
    assert (row["prefill/T8192/x1"]["floor_ms"], row["prefill/T8192/x1"]["floor_bound"]) == (5.0, "compute")
    assert row["e2e/B1/P128/N1"]["floor_ms"] is None
    vs_base, vs_floor = r["ratios"]["vs_base"], r["ratios"]["vs_floor"]
    assert vs_base["pcg"]["prefill/T16/x1"] == pytest.approx(10.0) and vs_base["eager"]["decode/B1/C1024"] == 1.0
    assert vs_floor["full"]["decode/B1/C1024"] == pytest.approx(1.8)
    assert vs_floor["full"]["per_token/B1/P128/N128"] == pytest.approx(1.84)
    assert "e2e/B1/P128/N1" not in vs_floor["full"]


def test_every_goal_of_issues_17_and_18_met():
    g = by_goal(good_result())
    assert len(g) == 23
    assert [k for k, v in g.items() if v["status"] != "met"] == []
    assert g["full decode B=1 <= 2.0x its floor"]["figure"] == "full 0.900 ms = 1.80x its memory floor (0.500 ms)"
    assert g["decode B=16: full >= 3x faster than tc-ro"]["figure"] == "tc-ro 3.000 ms / full 0.900 ms = 3.33x"
    assert g["full prefill of 8192 tokens <= 1.3x its compute floor"]["figure"].endswith("1.20x its compute floor "
                                                                                       "(5.000 ms)")
    assert g["full time to first token (prompt 128, B=1) <= 2 ms"]["figure"] == "full 1.500 ms"
    assert g["pcg: graph pool < 10% of the weights (16 capture sizes up to 2048 tokens)"]["figure"] == \
        "100 MiB = 5.2% of 1.86 GiB"


def test_goals_missed_and_unknown_say_why():
    r = good_result()
    r["entries"]["full"]["results"]["decode/B1/C1024"]["ms"] = 1.1  # 2.2x the floor, and pcg's B=1 is 0.91x
    r["entries"]["bcg"]["results"]["prefill/T256/x1"]["ms"] = 27.5  # slower than eager (20 ms) there
    r["entries"]["bcg"]["pool_bytes"] = 300 * 2**20
    r["entries"]["full"]["results"]["prefill/T16/x1"] = {"skipped": "its time box was spent"}
    del r["entries"]["tc-ro"]
    g = by_goal({**r, "goals": goals.evaluate(r)})
    status = {k: v["status"] for k, v in g.items()}
    assert status["full decode B=1 <= 2.0x its floor"] == "missed"
    assert status["decode B=1: pcg <= 1.25x full"] == "met"
    assert status["bcg: graph pool < 10% of the weights (16 capture sizes up to 2048 tokens)"] == "missed"
    assert status["full prefill of 16 tokens <= 1 ms"] == "unknown"
    assert g["full prefill of 16 tokens <= 1 ms"]["detail"] == "full prefill/T16/x1: its time box was spent"
    assert status["decode B=1: full >= 3x faster than tc-ro"] == "unknown"
    assert g["decode B=1: full >= 3x faster than tc-ro"]["detail"] == "tc-ro was not run (add it to --modes)"
    bcg = g["prefill <= 2048 tokens: bcg faster than eager and tc-ro at every size"]
    assert bcg["status"] == "missed" and bcg["figure"] == "slowest vs eager: 0.73x at prefill/T256/x1"


def test_pool_goal_with_other_capture_sizes_is_unknown_unless_missed():
    r = good_result()
    r["meta"]["capture_sizes"] = [1, 2, 4]
    g = by_goal({**r, "goals": goals.evaluate(r)})
    pcg = g["pcg: graph pool < 10% of the weights (16 capture sizes up to 2048 tokens)"]
    assert pcg["status"] == "unknown" and "captured sizes [1, 2, 4]" in pcg["detail"]
    r["entries"]["pcg"]["pool_bytes"] = WEIGHTS
    assert goals.goal_pool(r, "pcg")["status"] == "missed"


def test_pool_goal_of_a_target_whose_box_was_spent_is_unknown_unless_missed():
    """Sizes are captured at first use: a target cut by its time box never grew its pool for the rows it skipped."""
    r = good_result()
    r["entries"]["pcg"]["box_spent"] = "out of time before e2e/B16/P128/N1 (time box 100 s)"
    got = goals.goal_pool(r, "pcg")
    assert got["status"] == "unknown" and "time box was spent" in got["detail"]
    r["entries"]["pcg"]["pool_bytes"] = WEIGHTS
    assert goals.goal_pool(r, "pcg")["status"] == "missed"


def test_pool_goal_of_a_target_without_prefill_rows_is_unknown_unless_missed():
    """Prefill and decode are two Dynamo graphs with a pool each: without a measured prefill row the pool figure
    lacks the prefill graph's (it said met before)."""
    r = good_result()
    for pid, row in r["entries"]["pcg"]["results"].items():
        if pid.startswith("prefill/"):
            r["entries"]["pcg"]["results"][pid] = {"error": "RuntimeError: capture failed"}
    got = goals.goal_pool(r, "pcg")
    assert got["status"] == "unknown" and "measured no prefill row" in got["detail"]
    r["entries"]["pcg"]["pool_bytes"] = WEIGHTS
    assert goals.goal_pool(r, "pcg")["status"] == "missed"


def test_per_token_goals_apply_the_host_phase_rule():
    """A per-token row is derived from two generate rows: it carries their probes and host time, so the goals on it
    judge host phases as the other paired goals do (hf-static's slow phase made full look 4.5x faster: 'met')."""
    entries = good_entries()  # full 0.92 ms a token, hf-static 4.0: 4.35x, met
    for name, probe in (("full", 130.0), ("hf-static", 400.0)):
        for pid, row in entries[name]["results"].items():
            if pid.startswith("e2e/B1/"):
                row.update(host_ms=0.9 * row["ms"], host_probe_us=[probe, probe])
    r = data.build(meta(), points(), entries, [])
    per_token = r["entries"]["full"]["results"]["per_token/B1/P128/N128"]
    assert per_token["host_probe_us"] == [130.0] * 4 and per_token["host_ms"] == pytest.approx(0.9 * 0.92)
    got = by_goal(r)["generate B=1: full >= 4x faster than hf-static per new token"]
    assert got["status"] == "unknown" and "met with the slow phase on hf-static's side" in got["detail"]


def test_prefill_faster_goal_applies_the_host_phase_rule():
    entries = good_entries()  # bcg 2.5 ms against eager's 20 and tc-ro's 5 at every size: met
    bcg, tc = entries["bcg"]["results"]["prefill/T16/x1"], entries["tc-ro"]["results"]["prefill/T16/x1"]
    bcg.update(ms=4.0, host_ms=3.0, host_probe_us=[130.0, 130.0])
    tc.update(host_ms=3.0, host_probe_us=[300.0, 300.0])  # tc-ro ran in a slow phase: bcg's win may be that
    got = by_goal(data.build(meta(), points(), entries, []))[
        "prefill <= 2048 tokens: bcg faster than eager and tc-ro at every size"]
    assert got["status"] == "unknown" and "slow phase on tc-ro's side" in got["detail"]
    bcg.update(ms=6.0)  # slower than tc-ro although tc-ro ran slow: missed stands
    got = by_goal(data.build(meta(), points(), entries, []))[
        "prefill <= 2048 tokens: bcg faster than eager and tc-ro at every size"]
    assert got["status"] == "missed"


def test_json_is_strict_and_plot_says_when_there_is_nothing_to_draw(tmp_path):
    """Non-finite figures (a tensor-parallel run's unbounded time box) are written as null, not Infinity; a run
    with no series of two sizes records why no plot was drawn."""
    r = good_result()
    r["options"] = {"max_s": float("inf"), "ratio": float("nan")}
    data.write_json(r, str(tmp_path / "bench.json"))
    text = (tmp_path / "bench.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["options"] == {"max_s": None, "ratio": None}
    from hattn.bench.plot import write_png

    empty = {**r, "points": [], "entries": {}}
    write_png(empty, str(tmp_path / "bench.png"))
    assert empty["plot"] == {"error": "nothing to plot: no series of two or more sizes, nor a per-token row"}


def _text(result) -> str:
    console = Console(record=True, width=300, file=open("/dev/null", "w"))
    console.print(tables.header(result))
    for t in tables.tables(result):
        console.print(t)
    return console.export_text()


def test_tables_show_every_reason_the_startup_and_partial_runs():
    entries = good_entries()
    entries["pcg"]["startup"] = {"first_call_s": 40.0, "capture_seconds": 6.0, "other_s": 34.0}
    entries["tc-ro"] = {**entry(3.0, 5.0), "status": "failed", "reason": "failed in setup: RuntimeError: no compiler"}
    entries["tc-ro"]["results"] = {pid: {"error": "failed in setup: RuntimeError: no compiler"}
                                   for pid in entries["tc-ro"]["results"]}
    entries["eager"]["results"]["prefill/T16/x1"] = {"skipped": "not measured here"}
    r = data.build(meta(), points(), entries, ["stopped: SIGTERM during tc-ro setup"])
    text = _text(r)
    assert "PARTIAL: stopped: SIGTERM during tc-ro setup" in text
    assert "FAIL[" in text and "RuntimeError: no compiler" in text and "not measured here" in text
    assert "capture_seconds" in text and "34.00" in text  # the startup table
    assert "goals (issues 17 and 18" in text and "(10.00x)" in text  # pcg prefill vs eager
    assert "judged on this run, fake GPU" in text  # the goals are set for the H200; the title names this run's GPU


def test_the_host_table_sets_each_calls_host_time_beside_its_latency():
    entries = good_entries()
    assert "host time in the call" not in _text(data.build(meta(), points(), entries, []))  # no host figures: none
    entries["pcg"]["results"]["decode/B1/C1024"]["host_ms"] = 0.75
    text = _text(data.build(meta(), points(), entries, []))
    assert "host time in the call" in text and "0.75 / 1" in text


def test_a_ratio_of_rows_timed_at_different_host_speeds_stands_only_if_the_slow_phase_worked_against_it():
    entries = good_entries()  # decode B=1: pcg 1.0 ms, full 0.9 ms (pcg 1.11x full: met)
    pcg, full = entries["pcg"]["results"]["decode/B1/C1024"], entries["full"]["results"]["decode/B1/C1024"]
    pcg.update(host_ms=0.75, host_probe_us=[250.0, 270.0])
    full.update(host_ms=0.2, host_probe_us=[130.0, 130.0])
    r = data.build(meta(), points(), entries, [])
    got = by_goal(r)["decode B=1: pcg <= 1.25x full"]
    assert got["status"] == "met"  # met although pcg ran in the slow phase
    assert got["detail"] == ("the host ran Python at different speeds: probe 260 us for pcg, 130 us for full; met "
                             "even with the slow phase on pcg's side")
    assert by_goal(r)["decode B=1: bcg <= 1.25x full"]["detail"] == ""  # bcg has no probe: judged as measured
    assert "0.75 / 1 (260)" in _text(r)  # the host table shows each row's probe

    pcg.update(ms=1.5)  # 1.67x full, pcg in the slow phase: the phase may have decided it
    got = by_goal(data.build(meta(), points(), entries, []))["decode B=1: pcg <= 1.25x full"]
    assert got["status"] == "unknown" and "missed with the slow phase on pcg's side" in got["detail"]

    pcg.update(host_probe_us=[130.0, 130.0])
    full.update(host_probe_us=[260.0, 260.0])  # now full ran slow: a miss stands, a met would not
    got = by_goal(data.build(meta(), points(), entries, []))["decode B=1: pcg <= 1.25x full"]
    assert got["status"] == "missed" and got["detail"].endswith("missed even with the slow phase on full's side")
    pcg.update(ms=1.0)
    assert by_goal(data.build(meta(), points(), entries, []))["decode B=1: pcg <= 1.25x full"]["status"] == "unknown"

    tc = entries["tc-ro"]["results"]["decode/B1/C1024"]  # full 0.9 vs tc-ro 3.0 ms: 3.33x, met
    tc.update(host_probe_us=[130.0, 130.0])  # full (the fast side) ran slow: met even so
    got = by_goal(data.build(meta(), points(), entries, []))["decode B=1: full >= 3x faster than tc-ro"]
    assert got["status"] == "met" and got["detail"].endswith("met even with the slow phase on full's side")
    pcg.update(host_ms=0.05, host_probe_us=[130.0, 130.0])
    full.update(host_ms=0.05)  # the host under a tenth of both rows' latency: judged as measured
    assert by_goal(data.build(meta(), points(), entries, []))["decode B=1: pcg <= 1.25x full"]["detail"] == ""
    pcg.update(host_ms=0.75, host_probe_us=[140.0, 150.0])  # within 1.2x of each other: no note
    full.update(host_probe_us=[130.0, 130.0])
    assert by_goal(data.build(meta(), points(), entries, []))["decode B=1: pcg <= 1.25x full"]["detail"] == ""


def test_the_back_to_back_table_sets_each_steps_time_against_its_floor():
    entries = good_entries()
    assert "decode back to back" not in _text(data.build(meta(), points(), entries, []))
    entries["full"]["results"]["decode/B1/C1024"]["back_to_back_ms"] = 0.9
    result = data.build(meta(), points(), entries, [])
    floor = next(p["floor_ms"] for p in result["points"] if p["id"] == "decode/B1/C1024")
    text = _text(result)
    assert "decode back to back" in text and f"0.9 ({0.9 / floor:.2f}x)" in text


def test_cpu_runs_print_one_line_instead_of_the_goals():
    r = good_result("cpu")
    assert r["goals"] is None and r["goals_note"].startswith("goals: not evaluated, they mean nothing on a CPU")
    text = _text(r)
    assert "goals: not evaluated" in text and "goals (issues" not in text
    cached = "on a CPU, rows whose bytes fit its caches may go under 1x"  # the floor is a DRAM copy's
    assert cached in text.replace("\n", " ") or cached in " ".join(text.split())
    assert "caches may go under" not in _text(good_result())


def test_write_report_writes_json_and_text(tmp_path):
    r = write_report(meta(), points(), good_entries(), [], str(tmp_path))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved) >= {"schema", "partial", "partial_reasons", "meta", "points", "entries", "ratios", "goals",
                          "plot"}
    assert saved["partial"] is False and len(saved["goals"]) == 23 and saved["plot"] == r["plot"]
    assert "goals (issues 17 and 18" in (tmp_path / "bench.txt").read_text()


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    r = write_report(meta(), points(), good_entries(), [], str(tmp_path))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["plot"] == {"path": str(tmp_path / "bench.png")}


def test_missing_matplotlib_is_a_recorded_reason(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    r = write_report(meta(), points(), good_entries(), [], str(tmp_path))
    assert r["plot"] == {"error": "ImportError: No module named 'matplotlib' (pip install matplotlib)"}
    assert json.loads((tmp_path / "bench.json").read_text())["plot"] == r["plot"]



def _judge(entries=None, result=None):
    r = result or data.build(meta(), points(), entries, [])
    return by_goal({**r, "goals": goals.evaluate(r)})


def test_a_floor_goal_whose_row_has_no_floor_is_unknown_never_met():
    """No copy bandwidth or matmul peak: the floor goals cannot be judged (a 'met' here would read as done)."""
    r = good_result()
    for p in r["points"]:
        p["floor_ms"] = None
    g = _judge(result=r)
    for b, x in goals.FLOOR_X.items():
        got = g[f"full decode B={b} <= {x}x its floor"]
        assert got["status"] == "unknown" and "has no floor" in got["detail"], got
    assert g["full prefill of 8192 tokens <= 1.3x its compute floor"]["status"] == "unknown"


def test_a_ratio_goal_with_a_missing_row_is_unknown_never_met():
    entries = good_entries()
    entries["pcg"]["results"]["decode/B1/C1024"] = {"error": "RuntimeError: capture failed"}
    entries["full"]["results"]["prefill/T4096/x4"] = {"skipped": "its time box was spent"}
    g = _judge(entries)
    got = g["decode B=1: pcg <= 1.25x full"]
    assert got["status"] == "unknown" and got["detail"] == "pcg decode/B1/C1024: RuntimeError: capture failed"
    assert g["full prefill of 4 packed prompts of 1024 <= 1.15x one prompt of 4096"]["status"] == "unknown"


def test_goals_at_exactly_their_limit_are_met():
    """The goals say '<= x' and '>= x': a figure on the limit meets them (exact binary fractions: no rounding)."""
    entries = good_entries()
    entries["full"]["results"]["decode/B1/C1024"]["ms"] = 1.0      # 2.0x its 0.5 ms floor
    entries["pcg"]["results"]["decode/B1/C1024"]["ms"] = 1.25      # 1.25x full
    entries["tc-ro"]["results"]["decode/B1/C1024"]["ms"] = 3.0     # full 3.0x faster
    entries["full"]["results"]["prefill/T16/x1"]["ms"] = 1.0       # the 1 ms goal
    g = _judge(entries)
    assert g["full decode B=1 <= 2.0x its floor"]["status"] == "met"
    assert g["decode B=1: pcg <= 1.25x full"]["status"] == "met"
    assert g["decode B=1: full >= 3x faster than tc-ro"]["status"] == "met"
    assert g["full prefill of 16 tokens <= 1 ms"]["status"] == "met"


def test_a_pool_of_exactly_its_limit_misses_the_strict_goal():
    r = good_result()
    r["entries"]["pcg"]["pool_bytes"] = WEIGHTS // 10  # 10.0% of the weights: the goal is '< 10%'
    assert goals.goal_pool(r, "pcg")["status"] == "missed"


def test_pool_goal_with_sixteen_sizes_of_another_top_is_unknown():
    r = good_result()
    r["meta"]["capture_sizes"] = [s // 2 for s in r["meta"]["capture_sizes"]]  # 16 sizes, up to 1024 tokens
    got = goals.goal_pool(r, "pcg")
    assert len(r["meta"]["capture_sizes"]) == 16 and got["status"] == "unknown" and "captured sizes" in got["detail"]


def test_pool_goal_of_a_target_without_decode_rows_is_unknown():
    r = good_result()
    for pid in list(r["entries"]["pcg"]["results"]):
        if pid.startswith("decode/"):
            r["entries"]["pcg"]["results"][pid] = {"error": "RuntimeError: capture failed"}
    got = goals.goal_pool(r, "pcg")
    assert got["status"] == "unknown" and "measured no decode row" in got["detail"]


def test_host_phase_rule_edges_spread_of_exactly_1_2_and_host_share_of_exactly_a_tenth():
    entries = good_entries()  # decode B=1: full 0.9 ms
    pcg, full = entries["pcg"]["results"]["decode/B1/C1024"], entries["full"]["results"]["decode/B1/C1024"]
    pcg.update(ms=2.0, host_ms=1.5, host_probe_us=[120.0])  # 2.2x full: missed, pcg in the slower phase
    full.update(host_probe_us=[100.0])                      # exactly 1.2x apart: not 'further apart', judged plain
    got = _judge(entries)["decode B=1: pcg <= 1.25x full"]
    assert got["status"] == "missed" and got["detail"] == ""
    pcg.update(host_probe_us=[200.0], host_ms=0.2)          # host exactly a tenth of pcg's 2.0 ms: host-bound enough
    got = _judge(entries)["decode B=1: pcg <= 1.25x full"]
    assert got["status"] == "unknown" and "missed with the slow phase on pcg's side" in got["detail"]


def test_host_share_counts_either_row_of_a_pair():
    """tc-ro (the large row) is host-bound and ran slow; full's own host time is tiny: the pair is still host-bound."""
    entries = good_entries()
    full, tc = entries["full"]["results"]["decode/B1/C1024"], entries["tc-ro"]["results"]["decode/B1/C1024"]
    full.update(host_ms=0.01, host_probe_us=[130.0])
    tc.update(host_ms=2.9, host_probe_us=[300.0])
    got = _judge(entries)["decode B=1: full >= 3x faster than tc-ro"]
    assert got["status"] == "unknown" and "slow phase on tc-ro's side" in got["detail"]


def test_prefill_faster_goal_a_tie_is_not_faster_and_a_missing_row_makes_it_unknown():
    entries = good_entries()
    entries["bcg"]["results"]["prefill/T16/x1"]["ms"] = 5.0  # tc-ro's 5.0 ms: not faster
    goal = "prefill <= 2048 tokens: bcg faster than eager and tc-ro at every size"
    assert _judge(entries)[goal]["status"] == "missed"
    entries = good_entries()
    entries["bcg"]["results"]["prefill/T16/x1"] = {"skipped": "its time box was spent"}  # the rest are met
    got = _judge(entries)[goal]
    assert got["status"] == "unknown" and "bcg prefill/T16/x1: its time box was spent" in got["detail"]


def test_prefill_faster_goal_includes_a_2048_token_row():
    r = good_result()
    pid = "prefill/T2048/x1"
    r["points"].append({"id": pid, "kind": "prefill", "tokens": 2048, "seqs": 1, "floor_ms": None})
    for name, ms in (("bcg", 30.0), ("eager", 20.0), ("tc-ro", 5.0)):
        r["entries"][name]["results"][pid] = {"ms": ms}
    assert goals.goal_prefill_faster(r, "bcg")["status"] == "missed"


def test_each_goal_reads_its_own_row():
    """Every decode, per-token and generate row has its own time, so a goal that reads the wrong batch, context,
    row or figure (the back-to-back time instead of the after-sync one) shows in its figure."""
    entries = good_entries()
    for name, e in entries.items():
        for i, (pid, r) in enumerate(sorted(e["results"].items())):
            if pid.startswith("decode/") or (pid.startswith("e2e/") and name in ("full", "hf-static")):
                r["ms"] = r["ms"] + 0.001 * (i + 1)  # distinct, same verdicts
            if pid.startswith("decode/"):
                r["back_to_back_ms"] = 0.123
    r = data.build(meta(), points(), entries, [])
    g, res = by_goal(r), {n: e["results"] for n, e in r["entries"].items()}

    def ms(name, pid):
        return f"{res[name][pid]['ms']:.3f} ms"
    for b in (1, 16):
        d = f"decode/B{b}/C1024"
        assert g[f"decode B={b}: pcg <= 1.25x full"]["figure"].startswith(f"pcg {ms('pcg', d)} / full {ms('full', d)}")
        assert g[f"decode B={b}: full >= 3x faster than tc-ro"]["figure"].startswith(
            f"tc-ro {ms('tc-ro', d)} / full {ms('full', d)}")
        pt = f"per_token/B{b}/P128/N128"
        assert g[f"generate B={b}: full ms per new token <= 1.05x full's decode step at its context"]["figure"] \
            .startswith(f"full {ms('full', pt)} / full {ms('full', f'decode/B{b}/C192')}")
    assert g["full decode B=64 <= 3.0x its floor"]["figure"].startswith(f"full {ms('full', 'decode/B64/C1024')}")
    assert g["generate B=1: full >= 4x faster than hf-static per new token"]["figure"].startswith(
        f"hf-static {ms('hf-static', 'per_token/B1/P128/N128')} / full {ms('full', 'per_token/B1/P128/N128')}")
    assert g["full time to first token (prompt 128, B=1) <= 2 ms"]["figure"] == f"full {ms('full', 'e2e/B1/P128/N1')}"
    packed = g["full prefill of 4 packed prompts of 1024 <= 1.15x one prompt of 4096"]["figure"]
    assert packed == f"full {ms('full', 'prefill/T4096/x4')} / full {ms('full', 'prefill/T4096/x1')} = 1.10x"


def test_a_per_token_row_of_equal_generate_times_is_not_measurable_and_its_goals_unknown():
    """N tokens in the time of 1: a 0 ms per-token figure would meet every '<= x' goal (0 / y) and divide by 0."""
    entries = good_entries()
    rows = entries["full"]["results"]
    rows["e2e/B1/P128/N128"]["ms"] = rows["e2e/B1/P128/N1"]["ms"]
    r = data.build(meta(), points(), entries, [])
    assert r["entries"]["full"]["results"]["per_token/B1/P128/N128"]["error"].startswith("not measurable")
    g = by_goal(r)
    assert g["generate B=1: full ms per new token <= 1.05x full's decode step at its context"]["status"] == "unknown"
    assert g["generate B=1: full >= 4x faster than hf-static per new token"]["status"] == "unknown"


def _render(table) -> str:
    console = Console(record=True, width=300, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_the_floor_table_shows_each_rows_ms_over_its_floor():
    from hattn.bench import tables

    r = good_result()
    names = list(r["entries"])
    text = _render(tables.floor_table(r, names))
    assert "20.00x" in text  # eager decode: 10 ms over the 0.5 ms floor (vs eager itself it is 1.00x)
    assert "1.80x" in text   # full decode B=1: 0.9 / 0.5


def test_the_targets_table_shows_the_pool_as_a_share_of_the_weights():
    from hattn.bench import tables

    r = good_result()
    text = _render(tables.targets_table(r, list(r["entries"]), tables.Notes()))
    assert "5.2%" in text and "2.6%" in text  # pcg 100 MiB, full 50 MiB of 2e9 bytes


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_row_whose_time_is_not_a_measured_time_makes_its_goals_unknown(bad):
    """0 ms would be 'met' by every '<= x' goal (and a division by zero in '>= x faster'); NaN compares false both
    ways. Such a row decides nothing."""
    entries = good_entries()
    entries["full"]["results"]["decode/B1/C1024"]["ms"] = bad
    entries["full"]["results"]["prefill/T16/x1"]["ms"] = bad
    g = _judge(entries)
    for name in ("full decode B=1 <= 2.0x its floor", "decode B=1: pcg <= 1.25x full",
                 "decode B=1: full >= 3x faster than tc-ro", "full prefill of 16 tokens <= 1 ms"):
        assert g[name]["status"] == "unknown" and "is not a measured time" in g[name]["detail"], g[name]
