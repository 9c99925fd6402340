"""Report: per-token rows, ratios, goals met/missed/unknown, tables that show every reason, JSON and PNG files."""
import json

import pytest
from rich.console import Console

from hattn.bench import goals, report
from hattn.bench.workloads import Plan, e2e_ids, per_token_id

PLAN = Plan(tokens=[16, 1024, 4096], seqs=4, batches=[1, 4], context=1024, prompt=128, new_tokens=128)
POINTS = PLAN.points()
WEIGHTS = 2_000_000_000


def meta(floor_ms=0.5):
    return {"model": "fake", "dtype": "bfloat16", "params": WEIGHTS // 2, "weight_bytes": WEIGHTS,
            "copy_bandwidth": WEIGHTS / floor_ms * 1e3, "floor_ms": floor_ms, "plan": PLAN.as_dict(),
            "per_token_id": per_token_id(PLAN), "e2e_ids": list(e2e_ids(PLAN)), "budget_s": 420.0,
            "total_s": 100.0, "env": {"device_name": "fake", "torch": "t", "triton": "x", "transformers": "y",
                                      "fla": "z"}}


def entry(ms_by_id, status="ok", **extra):
    results = {p.id: ({"ms": ms_by_id[p.id], "first_ms": 10.0, "reps": 3, "times_ms": [ms_by_id[p.id]]}
                      if p.id in ms_by_id else {"skipped": "not measured here"}) for p in POINTS}
    return {"kind": "hattn", "about": "", "status": status, "reason": None, "results": results, "notes": [],
            **extra}


def all_points(decode_b1, prefill, gen1=50.0, gen128=50.0 + 127 * 1.0):
    ms = {p.id: prefill for p in POINTS if p.kind == "prefill"}
    ms.update({"decode/B1/C1024": decode_b1, "decode/B4/C1024": decode_b1 * 1.5})
    one, many = e2e_ids(PLAN)
    ms.update({one: gen1, many: gen128})
    return ms


def graphs(capture_s=3.0, sizes=16, pool=50 * 2**20):
    return {"capture_s": capture_s, "capture_sizes_done": sizes, "cuda_graphs": 64, "pool_bytes": pool}


def good_result():
    entries = {
        "eager": entry(all_points(10.0, 20.0)),
        "inductor": entry(all_points(5.0, 10.0)),
        "pcg": entry(all_points(0.6, 4.0), **graphs()),
        "bcg": entry(all_points(0.62, 4.5), **graphs()),
        "full": entry(all_points(0.55, 9.0), **graphs(sizes=9, pool=20 * 2**20)),
        "hf-static": entry({i: v for i, v in all_points(0, 0, 300.0, 300.0 + 127 * 4.0).items()
                            if i.startswith("e2e")}, kernels={"torch_chunk_gated_delta_rule": "fla.ops.x"}),
    }
    return report.build(meta(), POINTS, entries)


def test_per_token_row_is_the_difference_of_the_generate_rows():
    r = good_result()
    pid = per_token_id(PLAN)
    assert r["entries"]["hf-static"]["results"][pid]["ms"] == pytest.approx(4.0)
    assert r["entries"]["pcg"]["results"][pid]["ms"] == pytest.approx(1.0)
    assert r["points"][-1]["id"] == pid


def test_ratios_vs_eager_and_vs_floor():
    r = good_result()
    vs_eager, vs_floor = r["ratios"]["vs_eager"], r["ratios"]["vs_floor"]
    assert vs_eager["pcg"]["prefill/T16/x1"] == pytest.approx(20.0 / 4.0)
    assert vs_eager["eager"]["decode/B1/C1024"] == pytest.approx(1.0)
    assert vs_floor["full"]["decode/B1/C1024"] == pytest.approx(0.55 / 0.5)
    assert vs_floor["pcg"][per_token_id(PLAN)] == pytest.approx(1.0 / 0.5)
    assert "prefill/T16/x1" not in vs_floor["pcg"]


def test_goals_met():
    by_goal = {g["goal"]: g for g in good_result()["goals"]}
    assert len(by_goal) == 11
    assert all(g["status"] == "met" for g in by_goal.values()), [g for g in by_goal.values() if g["status"] != "met"]
    peer = next(g for g in by_goal.values() if "HF static" in g["goal"])
    assert "with fla" in peer["figure"] and "full 4.0x" in peer["figure"]  # per token: 4.0 ms vs 1.0 ms


def test_peer_goal_falls_back_to_the_decode_step():
    r = good_result()
    for mode in ("full", "pcg", "bcg"):
        r["entries"][mode]["results"][per_token_id(PLAN)] = {"skipped": "no generate"}
    g = goals.goal_vs_peer(r)
    assert "full 7.3x (decode step)" in g["figure"] and g["status"] == "met"


def test_goals_missed_and_unknown():
    r = good_result()
    r["entries"]["full"]["results"]["decode/B1/C1024"]["ms"] = 1.0  # 2x the floor
    r["entries"]["pcg"]["results"]["prefill/T1024/x4"]["ms"] = 30.0  # slower than eager there
    r["entries"]["pcg"].update(capture_s=12.0, pool_bytes=200 * 2**20)
    del r["entries"]["bcg"]
    by_goal = {g["goal"]: g for g in goals.evaluate(r)}
    status = {k: g["status"] for k, g in by_goal.items()}
    assert status["decode B=1: full <= 1.3x the bandwidth floor"] == "missed"
    assert status["prefill/extend <= 2048 tokens: pcg faster than eager and inductor at every size"] == "missed"
    assert "prefill/T1024/x4" in by_goal[
        "prefill/extend <= 2048 tokens: pcg faster than eager and inductor at every size"]["figure"]
    assert status["pcg: capture of 16 sizes < 10 s"] == "missed"
    assert status["pcg: graph pool memory < 5% of weight memory"] == "missed"
    assert status["decode B=1: bcg <= 1.25x full"] == "unknown"
    assert "bcg was not run" in by_goal["decode B=1: bcg <= 1.25x full"]["detail"]


def test_capture_and_pool_goals_of_fewer_sizes_are_unknown_unless_missed():
    r = good_result()
    r["entries"]["pcg"].update(capture_s=1.4, capture_sizes_done=1, pool_bytes=2 * 2**20)
    r["entries"]["bcg"].update(capture_s=11.0, capture_sizes_done=3)
    by_goal = {g["goal"]: g for g in goals.evaluate(r)}
    assert by_goal["pcg: capture of 16 sizes < 10 s"]["status"] == "unknown"
    assert by_goal["pcg: graph pool memory < 5% of weight memory"]["status"] == "unknown"
    assert "only 1 sizes captured" in by_goal["pcg: graph pool memory < 5% of weight memory"]["detail"]
    assert by_goal["bcg: capture of 16 sizes < 10 s"]["status"] == "missed"  # already over with 3 sizes


def test_prefill_goal_ignores_sizes_above_2048():
    r = good_result()
    r["entries"]["pcg"]["results"]["prefill/T4096/x1"]["ms"] = 999.0
    g = goals.goal_prefill(r, "pcg")
    assert g["status"] == "met"


def test_tables_show_every_reason():
    r = good_result()
    r["entries"]["tc-ro"] = entry({}, status="failed", reason="failed in setup: RuntimeError: no compiler")
    for res in r["entries"]["tc-ro"]["results"].values():
        res.clear()
        res["error"] = "failed in setup: RuntimeError: no compiler"
    console = Console(record=True, width=300)
    for t in report.tables(r):
        console.print(t)
    text = console.export_text()
    assert "FAIL[" in text and "RuntimeError: no compiler" in text
    assert "skip[" in text and "not measured here" in text
    assert "goals" in text and "met" in text
    assert "(5.00x)" in text  # pcg prefill vs eager


def test_write_json_has_every_field(tmp_path):
    r = good_result()
    paths = report.write(r, str(tmp_path), console=Console(record=True, width=300, file=open("/dev/null", "w")))
    data = json.loads(open(paths["json"]).read())
    assert set(data) >= {"schema", "meta", "points", "entries", "ratios", "goals", "plot"}
    assert {"floor_ms", "weight_bytes", "copy_bandwidth", "env", "plan"} <= set(data["meta"])
    assert "FAIL" not in open(paths["txt"]).read() and "goals" in open(paths["txt"]).read()


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    r = good_result()
    paths = report.write(r, str(tmp_path), console=Console(record=True, file=open("/dev/null", "w")))
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert r["plot"] == {"path": paths["png"]}


def test_missing_matplotlib_is_a_recorded_reason(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    r = good_result()
    paths = report.write(r, str(tmp_path), console=Console(record=True, file=open("/dev/null", "w")))
    assert "png" not in paths and "matplotlib" in r["plot"]["error"]
    assert json.loads(open(paths["json"]).read())["plot"]["error"] == r["plot"]["error"]
