"""Smoke tests of the benchmark scripts (bench/sweep.py, bench/bench_gpu.py) at tiny sizes."""
import json

import pytest
import torch

import sweep as bench

pytestmark = pytest.mark.cpu_only  # CI runs it; skipped under CK_TEST_DEVICE=cuda

GiB = 1 << 30


def _rows(path):
    with open(path) as f:
        data = json.load(f)
    return data, {(r["n"], r["method"]): r for r in data["results"]}


def test_tiny_sweep_writes_table_json_and_plot(tmp_path, capsys):
    rc = bench.main(["--full", "--min-n", "256", "--max-n", "512", "--d", "32", "--repeats", "1",
                     "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    be = bench.cpu_backends()
    methods = (["naive"] + be + ["siglip-naive"] + [f"siglip-{b}" for b in be]
               + [f"siglip-{b}-4p" for b in be if b == "cpu"] + ["gemm"])
    data, rows = _rows(tmp_path / "sweep.json")
    assert [(r["n"], r["method"]) for r in data["results"]] == [
        (n, m) for n in (256, 512) for m in methods]
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["time_s"] > 0 and r["peak_rss"] >= r["rss_inputs"] > 0
    assert rows[(512, "naive")]["ratio_naive"] == 1.0
    assert rows[(512, "siglip-naive")]["ratio_naive"] == 1.0     # against its own naive loss
    assert abs(rows[(512, "gemm")]["ratio_floor"] - 0.25) < 1e-12
    assert data["machine"]["torch"] and data["machine"]["threads"] >= 1
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert "demo: symmetric CLIP loss" in out
    table = [line.split() for line in out.splitlines()]
    for n in (256, 512):
        for m in methods:
            assert [str(n), "32", m] in [t[:3] for t in table], (n, m)
    # the variants' table, side by side with plain cpu at the sweep's largest N
    if "cpu" in be:
        variants = {r["method"]: r for r in data["variants"]}
        assert sorted(variants) == ["cpu", "cpu:dcl", "cpu:margin", "cpu:teacher", "cpu:temp",
                                    "gemm"]
        assert all(r["status"] == "ok" and r["n"] == 512 for r in variants.values())
        assert "InfoNCE variants on the cpu backend" in out
        for m in ("cpu:margin", "cpu:dcl", "cpu:temp", "cpu:teacher"):
            assert any(t[:1] == [m] for t in table), m


def test_tour_is_the_default_and_shows_headline_speed_and_training(tmp_path, capsys):
    # the default case at tiny sizes: a 2 MiB budget, N = 64..96, a 3-step training run
    rc = bench.main(["--budget-gib", str(2 / 1024), "--headline-s", "5", "--min-n", "64",
                     "--max-n", "96", "--d", "16", "--per-n-s", "0", "--min-rounds", "3",
                     "--train-args", "--batch 256 --chunk 64 --steps 3 --naive-steps 2 "
                     "--memory-budget 0.002 --hidden 32 --dim 16",
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for section in ("[1/4] the same loss", "[2/4] the headline", "[3/4] speed",
                    "[4/4] training"):
        assert section in out
    assert "PASS" not in out and "FAIL" not in out       # targets only under --targets
    with open(tmp_path / "tour.json") as f:
        data = json.load(f)
    head = data["headline"]
    # the naive loss's largest batch in the budget, and a larger one only the fused loss runs
    n_naive, n_big = head["n_naive"], head["n_big"]
    assert bench.need_bytes("naive", n_naive, 128) <= 2 << 20 < bench.need_bytes(
        "naive", 2 * n_naive, 128)
    assert n_big > n_naive
    rows = {(r["method"], r["n"]): r for r in head["rows"]}
    assert rows[("naive", n_naive)]["status"] == "ok"
    assert rows[("naive", n_big)]["status"] == "skipped"
    assert rows[("auto", n_big)]["status"] == "ok" and rows[("auto", n_big)]["time_s"] > 0
    assert "in the same budget the fused loss runs N=" in out
    speed = data["speed"]
    assert [r["n"] for r in speed] == [64, 96]
    for r in speed:
        assert r["rounds"] >= 3 and set(r["time_s"]) >= {"naive", "auto", "gemm",
                                                         "siglip-naive", "siglip-auto"}
        assert r["auto_path"] == r["siglip_auto_path"] == "dense"    # 96 x 96 <= DENSE_MAX
    assert "ck.siglip_loss (auto) vs naive" in out
    assert data["training"]["status"] == "ok"
    assert any("fused loss decreased" in line or "fused loss did not decrease" in line
               for line in data["training"]["output"])
    assert (tmp_path / "tour.png").stat().st_size > 0


def test_speed_sizes_and_crossover():
    import tour
    assert tour.speed_sizes(256, 4096) == [256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    rows = [dict(n=n, time_s=dict(naive=1.0, cpu=c)) for n, c in
            ((256, 2.0), (512, 0.9), (1024, 1.1), (2048, 0.5), (4096, 0.4))]
    assert tour.crossover(rows, "cpu") == 2048          # from there on, never slower
    assert tour.crossover(rows[:1], "cpu") is None
    # 2 GiB, D = 128: naive fits 8192 (5 N^2 fp32), the fused batch is 4x unless too slow
    assert tour.headline_sizes(2 * GiB, 128, 1e12, 60) == (8192, 32768)
    assert tour.headline_sizes(2 * GiB, 128, 1e9, 60) == (8192, 8192)


def test_memory_skip_estimates():
    # N = 32768: the naive loss needs several 4 GiB buffers; the fused one a few tiles.
    assert bench.need_bytes("naive", 32768, 128) > 12 * GiB
    assert bench.need_bytes("cpu", 32768, 128) < 1 * GiB
    note = bench.memory_skip("naive", 32768, 128, avail=24 * GiB)
    assert note.startswith("skipped: would need 20.1 GiB")
    assert bench.memory_skip("cpu", 32768, 128, avail=24 * GiB) is None
    assert bench.memory_skip("naive", 1024, 128, avail=24 * GiB) is None


def test_naive_skipped_when_memory_is_short(tmp_path, capsys):
    # 4 MiB "available": the naive loss at N = 512 needs ~5 MiB, one gemm 1 MiB.
    rc = bench.main(["--full", "--min-n", "512", "--max-n", "512", "--d", "32", "--repeats", "1",
                     "--methods", "naive,gemm", "--no-demo", "--out", str(tmp_path)],
                    avail_fn=lambda: 4 * (1 << 20))
    assert rc == 0
    out = capsys.readouterr().out
    _, rows = _rows(tmp_path / "sweep.json")
    assert rows[(512, "naive")]["status"] == "skipped"
    assert rows[(512, "naive")]["note"].startswith("skipped: would need")
    assert rows[(512, "gemm")]["status"] == "ok"
    assert "skipped: would need" in out


def test_skipped_when_over_time_budget(tmp_path, capsys):
    rc = bench.main(["--full", "--min-n", "256", "--max-n", "256", "--d", "32", "--budget-s", "1e-9",
                     "--no-demo", "--out", str(tmp_path)])
    assert rc == 0
    _, rows = _rows(tmp_path / "sweep.json")
    assert rows and all(r["status"] == "skipped" and r["note"].startswith("skipped: est.")
                        for r in rows.values())
    assert "> budget" in capsys.readouterr().out


def test_target_lines():
    def row(method, n, d, **kw):
        return dict(method=method, n=n, d=d, status="ok", note="", **kw)
    rows = [row("naive", 8192, 256, time_s=2.0), row("gemm", 8192, 256, time_s=0.3),
            row("cpu", 8192, 256, time_s=1.6),  # 0.8 x naive; 1.33 x 4 t_gemm
            row("cpu", 32768, 128, above_inputs=300 << 20),
            dict(method="naive", n=32768, d=128, status="skipped", note="skipped: would need")]
    lines = bench.check_targets(rows)
    assert [line.split()[0] for line in lines] == ["PASS", "FAIL", "PASS"], lines
    assert "0.85 x naive" in lines[0] and "1.25 x 4 t_gemm" in lines[1] and "1 GiB" in lines[2]
    # the cpu backend missing: every target fails, saying why
    lines = bench.check_targets([r for r in rows if r["method"] != "cpu"], "not built")
    assert len(lines) == 3 and all(line.startswith("FAIL") and "not built" in line for line in lines)


def test_siglip_target_lines():
    def row(method, n, d, **kw):
        return dict(method=method, n=n, d=d, status="ok", note="", **kw)
    rows = [row("naive", 8192, 256, time_s=2.0), row("gemm", 8192, 256, time_s=0.3),
            row("cpu", 8192, 256, time_s=1.0), row("siglip-naive", 8192, 256, time_s=3.0),
            row("siglip-cpu", 8192, 256, time_s=2.7),   # 0.9 x naive: FAIL; 2.25 x 4 t_gemm
            row("cpu", 32768, 128, above_inputs=300 << 20),
            row("siglip-cpu", 32768, 128, above_inputs=2 << 30)]
    lines = bench.check_targets(rows)
    assert [line.split()[0] for line in lines] == ["PASS", "PASS", "FAIL", "FAIL", "PASS",
                                                   "FAIL"], lines
    assert all(line.split()[1] == "siglip-cpu" for line in lines[2:4] + lines[5:])
    assert "(ratio 0.90)" in lines[2]


def _bench_gpu():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "bench", "bench_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_targets_summary_from_rows():
    # bench/bench_gpu.py needs a GPU; its acceptance summary is checked on made-up rows.
    B = _bench_gpu()
    n, d = 65536, 768
    ideal = B.ideal_bytes(n, d)
    row = lambda m, ms, peak, frac: dict(method=m, N=n, D=d, ms=ms, peak_bytes=peak,
                                         frac_matmul=frac)
    rows = [row("naive", 300.0, 40 * GiB, 0.2), row("triton", 100.0, int(1.04 * ideal), 0.65),
            row("cuda", 250.0, int(2.0 * ideal), 0.3), row("naive", 1.0, 1, 0.1) | {"N": 8192}]
    text = "\n".join(B.targets(rows))
    line = lambda m, what: next(l for l in text.splitlines() if l.split()[:1] == [m] and what in l)
    assert text.startswith(f"targets at N={n}, D={d}:")
    assert line("triton", "matmul").split()[-2:] == ["65%", "PASS"]
    assert line("triton", "naive").split()[-2:] == ["3.00x", "PASS"]
    assert line("triton", "peak").split()[-2:] == ["1.04x", "PASS"]
    assert line("triton", "inf_cl").endswith("not measured  n/a")      # no Inf-CL row
    assert line("cuda", "matmul").split()[-2:] == ["30%", "FAIL"]
    assert line("cuda", "naive").split()[-2:] == ["1.20x", "FAIL"]
    assert line("cuda", "peak").split()[-2:] == ["2.00x", "FAIL"]
    assert "faster GPU backend (for 'auto'): triton" in text
    assert "faster form of the blocked" not in text               # no triton-epi row
    text = "\n".join(B.targets(rows + [row("triton-epi", 80.0, int(1.5 * ideal), 0.8)]))
    assert "faster form of the blocked algorithm: epilogue (triton-epi) (triton 100.0 ms, " \
           "triton-epi 80.0 ms)" in text
    assert B.targets([]) == ["targets: no results"]


def test_gpu_bench_steps_run_on_cpu():
    # The step functions of bench/bench_gpu.py (which needs a GPU to run) on CPU tensors:
    # a step returns (dq, dk), the forward alone the loss, without a graph; every method
    # gives the same loss.
    B = _bench_gpu()
    q = torch.randn(40, 12, requires_grad=True)
    k = torch.randn(40, 12, requires_grad=True)
    want = B.naive_step(q, k, backward=False)
    for step in (B.naive_step, B.ck_step("torch")):
        dq, dk = step(q, k)
        assert dq.shape == q.shape and dk.shape == k.shape
        loss = step(q, k, backward=False)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, want)
    # The correctness check the GPU benchmark runs first: small for a right step, large
    # for a wrong one.
    ref = (float(want), *B.naive_step(q, k))
    errs = B.check_errors(B.ck_step("torch"), q, k, ref)
    assert max(errs) < 1e-5, errs
    wrong = lambda q, k, backward=True: tuple(2 * g for g in B.naive_step(q, k)) if backward \
        else B.naive_step(q, k, backward=False)
    errs = B.check_errors(wrong, q, k, ref)
    assert errs[0] < 1e-6 and min(errs[1:]) > B.CHECK_TOL["grad"], errs
    assert B.check_ok((0.0, 0.0, 0.0)) and not B.check_ok(errs)
    assert not B.check_ok((0.0, 0.0, float("nan"))) and not B.check_ok((float("nan"), 0.0, 0.0))


def test_gpu_bench_main_runs_on_cpu(tmp_path, capsys):
    # The whole script (checks, rows, JSON, targets) on CPU tensors at tiny sizes: it has
    # one shot on a GPU, so its own logic is run here (float32: the Triton interpreter
    # rejects bf16).
    B = _bench_gpu()
    out = tmp_path / "gpu.json"
    rc = B.main(["--device", "cpu", "--dtype", "float32", "--sizes", "48,64", "--dim", "24",
                 "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"naive", "torch"} <= methods and len(data["rows"]) == 2 * len(methods), text
    assert all(r["ms"] and r["loss"] is not None for r in data["rows"]), text
    assert all(c["ok"] for c in data["checks"].values()) and "naive" in data["checks"]
    assert "targets at N=64" in text and "WRONG" not in text and "LOSS" not in text


def test_gpu_bench_siglip_runs_on_cpu(tmp_path, capsys):
    """--loss siglip: the sigmoid-loss rows, checked against the float32 naive SigLIP."""
    B = _bench_gpu()
    out = tmp_path / "gpu.json"
    try:
        rc = B.main(["--device", "cpu", "--dtype", "float32", "--sizes", "48,64", "--dim", "24",
                     "--json", str(out), "--loss", "siglip"])
    finally:
        B.LOSS = "clip"
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    assert data["loss"] == "siglip" and data["flops_per_step"] == "6*N^2*D"
    methods = {r["method"] for r in data["rows"]}
    assert {"naive", "torch", "cpu"} <= methods, methods
    assert all(c["ok"] for c in data["checks"].values()), data["checks"]
    assert "sigmoid loss" in text and ">= 1.3x siglip_kernel" in text

