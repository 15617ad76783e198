"""study.py: docs/results.md is exactly what render writes from results/*.json; the oracle's numbers; a tiny
table run end to end puts its run's own numbers on the page; `long` needs --cifar, and a failed table fails the
command."""
import json
import math
import os

import pytest
import torch

import data
import study
from model import patchify


def test_committed_results_page_is_what_render_writes(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(open(os.path.join(study.HERE, "README.md")).read())
    study.render(page=str(tmp_path / "results.md"), readme=str(readme))
    with open(os.path.join(study.HERE, "docs", "results.md")) as f:
        assert (tmp_path / "results.md").read_text() == f.read()
    assert readme.read_text() == open(os.path.join(study.HERE, "README.md")).read()  # README's block too


def test_mean_colour_oracle_by_hand():
    got = study.mean_colour_oracle(n_val=8, img_size=16, mask_ratio=0.5, batch_size=3)
    val = data.build_dataset("synthetic", 16, train=False, n_synthetic=8, seed=0)
    imgs = torch.stack([val[i][0] for i in range(8)]).double()  # [8, 3, 16, 16]
    mean = imgs.mean(dim=(2, 3), keepdim=True)
    full = [10 * math.log10(1 / ((x - m) ** 2).mean().item()) for x, m in zip(imgs, mean)]  # per image, then mean
    assert math.isclose(got["psnr_full"], sum(full) / 8, rel_tol=1e-5)
    assert got["psnr_full"] > 10 * math.log10(1 / ((imgs - mean) ** 2).mean().item())  # above the pooled PSNR
    gen, masked = torch.Generator().manual_seed(0), []
    for i in range(0, 8, 3):  # the masks model.reconstruction_metrics draws: torch.rand(b, N) per batch, argsort
        x = imgs[i: i + 3]
        keep = torch.rand(x.shape[0], 16, generator=gen).argsort(1)[:, :8]
        m = torch.ones(x.shape[0], 16)
        m[torch.arange(x.shape[0])[:, None], keep] = 0
        per_patch = (patchify((x - mean[i: i + 3]) ** 2, 4)).sum(-1)  # [b, 16]
        masked += [10 * math.log10(mj.sum().item() * 48 / (pj * mj).sum().item()) for pj, mj in zip(per_patch, m)]
    assert math.isclose(got["psnr_masked"], sum(masked) / 8, rel_tol=1e-5)


def test_a_tiny_table_runs_and_its_numbers_reach_the_page(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(study, "RESULTS", str(tmp_path / "results"))
    flags = ["--img-size", "16", "--gaussians", "32", "--n-synthetic", "32", "--batch-size", "16", "--epochs", "1",
             "--val-size", "8"]
    rows = [study.train("tiny", *flags), study.train("tiny", *flags)]  # the second is reused, not rerun
    tables = {"tiny": ("A tiny table", "Two rows of one run.", rows)}
    monkeypatch.setattr(study, "TABLES", tables)
    monkeypatch.setattr(study, "LONG", {})
    assert study.run_tables(["tiny"], tables, "python study.py quick") == {}
    result = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["tiny", "tiny"]
    assert result["command"] == "python study.py quick --only tiny"
    log = [json.loads(line) for line in open(tmp_path / "runs" / "tiny" / "log.jsonl")]
    assert len(log) == 1 and result["rows"][0]["result"] == log[0]
    assert result["rows"][0]["config"]["num_gaussians"] == 32
    assert result["rows"][0]["config"]["gaussians_per_token"] == 2  # 32 Gaussians, 16 patches: 16 tokens of 2
    page = tmp_path / "results.md"
    study.render(page=str(page), readme=str(tmp_path / "none.md"))
    text = page.read_text()
    assert "## A tiny table" in text and f"| {log[0]['psnr_masked']:.2f} | {log[0]['psnr_full']:.2f} |" in text


def test_long_without_cifar_is_one_line_naming_the_flag_and_layout(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(study, "run_tables", lambda *a: ran.append(a) or {})
    monkeypatch.setattr(study, "render", lambda *a, **k: None)
    for argv, start in ((["long"], "long needs --cifar DIR"), (["long", "--cifar", str(tmp_path)], "--cifar ")):
        with pytest.raises(SystemExit) as stop:
            study.main(argv)
        message = capsys.readouterr().err.strip().splitlines()[-1].split(": error: ", 1)[1]
        assert stop.value.code == 2 and message.startswith(start)
        assert "DIR/train/<class>/<image> and DIR/val/<class>/<image>" in message
    assert ran == []  # nothing ran


def test_long_with_a_failed_table_exits_nonzero_and_says_why(tmp_path, monkeypatch, capsys):
    cifar = tmp_path / "cifar"
    (cifar / "train").mkdir(parents=True)
    (cifar / "val").mkdir()
    monkeypatch.setattr(study, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(study, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(study, "render", lambda *a, **k: None)
    bad = study.train("bad", "--data", str(cifar), "--epochs", "0")  # train.py refuses --epochs 0, exit status 2
    monkeypatch.setattr(study, "long_tables", lambda cifar, ecssd=None, bsds=None: {"cifar": ("A failing table", "One bad run.", [bad])})
    with pytest.raises(SystemExit) as stop:
        study.main(["long", "--cifar", str(cifar)])
    assert stop.value.code not in (0, None)
    assert str(stop.value.code).startswith("study.py long: 1 of 1 tables not written: cifar (`python train.py --data")
    assert "exited with 2" in str(stop.value.code)
    assert not (tmp_path / "results" / "cifar.json").exists()


def test_the_cifar_table_shows_probes_against_untrained_and_figure_ground_with_controls():
    rows = study.long_tables("DIR", "ECSSD")["cifar"][2]
    assert [r["name"] for r in rows] == ["cifar_gmae", "cifar_mae", "cifar_gmae_mean", "cifar_gmae_mean_random",
                                         "cifar_mae_mean", "cifar_mae_mean_random", "eval-fg cifar_gmae"]
    assert rows[-1]["json"].endswith("zeroshot_cifar_gmae/fg_ECSSD.json")
    edges = study.long_tables("DIR", "ECSSD", "BSDS")["cifar_edges"][2]  # a table of its own, on the same GMAE
    assert edges[0] == rows[0] and edges[1]["name"] == "eval-edges cifar_gmae"
    assert edges[1]["argv"][-4:-2] == ["--limit", str(study.BSDS_EDGE_IMAGES)]
    assert edges[1]["json"].endswith("zeroshot_cifar_gmae/bsds_val/scores.json")  # where eval-edges writes them
    assert "cifar_edges" not in study.long_tables("DIR", "ECSSD")
    train = lambda name, psnr: {"name": name, "command": f"python train.py {name}", "wall_s": 60,  # noqa: E731
                                "config": {"num_gaussians": 64, "gaussians_per_token": 1},
                                "result": {"psnr_masked": psnr, "psnr_full": psnr + 2, "img_per_s": 100.0}}
    probe = lambda name, lin, knn: {"name": name, "command": f"python probe.py {name}", "wall_s": 10,  # noqa: E731
                                    "result": {"linear": {"top1": lin}, "knn": {"top1": knn}, "num_train": 20000,
                                               "num_val": 5000}}
    fg = {"name": "eval-fg cifar_gmae", "command": "python zeroshot.py eval-fg", "wall_s": 5,
          "result": {"learned": {"IoU": 0.31, "F": 0.42}, "permuted": {"IoU": 0.2, "F": 0.3}}}
    page = study.render_cifar({"rows": [train("cifar_gmae", 17.0), train("cifar_mae", 18.0),
                                        probe("cifar_gmae_mean", 30.25, 28.5), probe("cifar_gmae_mean_random", 20.0, 19.0),
                                        probe("cifar_mae_mean", 35.0, 31.0), probe("cifar_mae_mean_random", 21.0, 18.0),
                                        fg]})
    assert "| GMAE | `python probe.py cifar_gmae_mean` | 30.2 / 20.0 | 28.5 / 19.0 | 20000 / 5000 |" in page
    assert "| MAE | `python probe.py cifar_mae_mean` | 35.0 / 21.0 | 31.0 / 18.0 | 20000 / 5000 |" in page
    assert "| learned | 0.310 | 0.420 |" in page and "| `python train.py cifar_mae` | 64 | 1 | 18.00 | 20.00 |" in page
