"""bench.py: every backend is timed on one device, the ratios are the quotients of the times it reports,
backends that cannot run on the device are skipped, the dense reference is skipped by size."""
import json
import os

import pytest
import torch

import bench
import splat
from cli import cli_error

CPU = torch.device("cpu")


@pytest.fixture
def small_scenes(monkeypatch):
    monkeypatch.setattr(bench, "SCENES", [(16, 8), (24, 32)])


def test_bench_render_times_each_backend_and_skips_the_reference_above_the_memory_limit(small_scenes):
    backends = [b for b in splat.available_backends() if b != "cuda"]
    rows = bench.bench_render(backends, batch=2, repeats=1, max_dense_gb=6.0, device=CPU)
    assert [r["scene"] for r in rows] == ["16x16/8", "24x24/32"]
    assert all(set(r["ms"]) == set(backends) and all(r["ms"][b] > 0 for b in backends) for r in rows)
    # 6 tensors x 2 x 24*24 x 32 x 4 bytes = 0.88 MB: a 0.0005 GB limit keeps the small scene, drops the large
    rows = bench.bench_render(backends, batch=2, repeats=1, max_dense_gb=0.0005, device=CPU)
    assert rows[0]["ms"]["torch"] > 0 and rows[1]["ms"]["torch"] is None
    assert rows[1]["speedup"] == {}  # no reference time, no ratio


def test_backends_that_cannot_run_on_the_device_are_skipped_with_a_message():
    backends, skipped = bench.choose_backends(["cuda", "cpu"], CPU)
    assert backends == ["torch", "cpu"]
    assert skipped == ["skipping backend 'cuda': it rasterizes cuda tensors, and --device is cpu"]
    backends, skipped = bench.choose_backends(["cpu", "torch"], torch.device("cuda"))
    assert backends == ["torch"] and skipped[0].startswith("skipping backend 'cpu'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    message = cli_error(capsys, bench.main, ["--device", "cuda", "--quick"])
    assert message.startswith("--device cuda: a CPU-only torch build") or "no GPU visible" in message


def test_quick_run_on_cpu_reports_every_backend_and_ratios_that_are_the_quotients_of_its_times(
    small_scenes, tmp_path, capsys
):
    path = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--splat", "cpu", "--quick", "--batch", "2", "--train-batch", "4",
                "--json", str(path)])
    out = capsys.readouterr().out
    assert "device cpu" in out
    result = json.loads(path.read_text())
    assert result["device"] == "cpu" and result["backends"] == ["torch", "cpu"]

    for row in result["render"]:
        assert set(row["ms"]) == {"torch", "cpu"} and all(ms > 0 for ms in row["ms"].values())
        assert row["speedup"] == {"cpu": pytest.approx(row["ms"]["torch"] / row["ms"]["cpu"], rel=1e-12)}

    step = result["train_step"]
    assert (step["batch"], step["img_size"], step["gaussians"]) == (4, 32, 64)  # GMAEConfig.preset("tiny")
    assert set(step["ms"]) == {"gmae/cpu", "mae"} and all(ms > 0 for ms in step["ms"].values())
    assert step["ratio_to_mae"] == {"gmae/cpu": pytest.approx(step["ms"]["gmae/cpu"] / step["ms"]["mae"], rel=1e-12)}
    assert step["render_share"] == {"cpu": pytest.approx(step["render_ms"]["cpu"] / step["ms"]["gmae/cpu"],
                                                         rel=1e-12)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_quick_run_on_cuda_renders_and_trains_only_on_the_gpu(small_scenes, monkeypatch):
    devices = set()
    render = splat.render

    def recording_render(gaussians, *args, **kwargs):
        devices.add(gaussians.device.type)
        return render(gaussians, *args, **kwargs)

    monkeypatch.setattr(splat, "render", recording_render)
    result = bench.main(["--device", "cuda", "--quick", "--batch", "2", "--train-batch", "4"])
    assert result["device"].startswith("cuda") and devices == {"cuda"}
    assert "cpu" not in result["backends"] and "torch" in result["render"][0]["ms"]


def test_sim_section_times_cuda_sim_under_each_schedule_against_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "SIM_SCENES", [(16, 16, 1, 20), (17, 9, 2, 12)])
    monkeypatch.setenv("CUDA_SIM_SCHEDULE", "reversed")  # bench sets its own, then puts this back
    result = bench.main(["--sim", "--quick", "--json", str(tmp_path / "sim.json")])
    assert result == json.loads((tmp_path / "sim.json").read_text())
    assert [row["scene"] for row in result["sim"]] == ["16x16/B1/K20", "17x9/B2/K12"]
    for row in result["sim"]:
        names = [f"cuda-sim {s}" for s in bench.SIM_SCHEDULES]
        assert set(row["ms"]) == {"cpu", *names} and all(ms > 0 for ms in row["ms"].values())
        assert row["slowdown"] == {n: pytest.approx(row["ms"][n] / row["ms"]["cpu"], rel=1e-12) for n in names}
    assert os.environ["CUDA_SIM_SCHEDULE"] == "reversed"


@pytest.mark.parametrize("argv, message", [
    (["--splat", "cpu", "cuda"], "--splat cuda cannot run on --device cpu"),
    (["--batch", "0"], "--batch must be in [1, inf), got 0"),
    (["--repeats", "0"], "--repeats must be in [1, inf), got 0"),
    (["--train-batch", "0"], "--train-batch must be in [1, inf), got 0"),
    (["--per-token", "laptop", "--per-token-ks", "64", "0"], "--per-token-ks must be in [1, inf), got 0"),
    (["--max-dense-gb", "nan"], "--max-dense-gb must be a finite number, got nan"),
    (["--device", "gpu"], "--device 'gpu' is not a device torch knows"),
])
def test_bad_flags_stop_in_one_line_before_any_work(capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("cuda runs here")
    device = [] if argv[0] == "--device" else ["--device", "cpu"]
    assert cli_error(capsys, bench.main, device + argv).startswith(message)


def test_json_never_replaces_another_file(tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert "is not a result of this command" in cli_error(capsys, bench.main, ["--sim", "--json", str(notes)])
    assert notes.read_text() == '{"mine": 1}'
    assert "is a folder" in cli_error(capsys, bench.main, ["--sim", "--json", str(tmp_path)])
