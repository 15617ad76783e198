"""bench.py: every backend is timed on the same scenes, ratios come out, the dense reference is skipped by size."""
import bench
import splat


def test_bench_render_times_each_backend_and_skips_the_reference_above_the_memory_limit(monkeypatch):
    monkeypatch.setattr(bench, "SCENES", [(16, 8), (24, 32)])
    backends = [b for b in splat.available_backends() if b != "cuda"]
    rows = bench.bench_render(backends, batch=2, repeats=1, max_dense_gb=6.0)
    assert [r["scene"] for r in rows] == ["16x16/8", "24x24/32"]
    assert all(r["ms"][b] > 0 for r in rows for b in backends)
    # 6 tensors x 2 x 24*24 x 32 x 4 bytes = 0.88 MB: a 0.0005 GB limit keeps the small scene, drops the large
    rows = bench.bench_render(backends, batch=2, repeats=1, max_dense_gb=0.0005)
    assert rows[0]["ms"]["torch"] > 0 and rows[1]["ms"]["torch"] is None
