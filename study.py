"""
The measurements behind docs/results.md, run by one script, and the page written from their JSON alone.

    python study.py quick                    # the laptop tables: about 45 min on a 2-core CPU -> results/*.json
    python study.py quick --only loss speed  # some of them (names: python study.py --help)
    python study.py long --cifar DIR         # the CIFAR-10 tables: hours (DIR/train/<class>/, DIR/val/<class>/)
        [--ecssd DIR] [--bsds ROOT]          # ... with the CIFAR GMAE's figure-ground and edges on photos
    python study.py render                   # docs/results.md (and README's result block) from results/*.json

Each table is a list of command lines (train.py, probe.py, zeroshot.py, bench.py), run one after another as
subprocesses so that each wall time is that of a user's run; a training run writes to runs/study/<name>/ and is
reused by later tables of the same invocation. results/<table>.json keeps, for every row, its command, its wall
time and what its outputs said (the last line of log.jsonl, a probe's JSON, ...), plus the machine and date.
`render` reads only those files: no number in docs/results.md is typed by hand, and the committed page is
exactly what render writes (tests/test_study.py checks it).

The mean-colour oracle predicts every pixel of an image as that image's own mean colour (it sees the whole
image, masked patches included): the level below which a reconstruction has learned nothing about the scene.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from data import build_dataset
from engine import read_checkpoint, run_main, write_whole
from model import patchify, psnr_db, random_masking

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
RUNS = os.path.join("runs", "study")
CIFAR_LAYOUT = "DIR/train/<class>/<image> and DIR/val/<class>/<image> (README \"Data\")"


def train(name, *flags):  # the study owns runs/study/: a table run again starts its runs over
    return {"kind": "train", "name": name, "argv": ["train.py", *flags, "--overwrite", "--out", f"{RUNS}/{name}"]}


def probe(run, pool="mean", random_init=False, data=None):
    name = f"{run}_{pool}" + ("_random" if random_init else "")
    argv = ["probe.py", "--ckpt", f"{RUNS}/{run}/checkpoint.pt", "--pool", pool, "--out", f"{RUNS}/probe_{name}.json"]
    argv += (["--random-init"] if random_init else []) + (["--data", data] if data else [])
    return {"kind": "probe", "name": name, "argv": argv, "json": f"{RUNS}/probe_{name}.json"}


def zeroshot(command, run="gmae", *flags):
    out = f"{RUNS}/zeroshot_{run}"
    where = "synthetic_anywhere" if "--anywhere" in flags else "synthetic"
    if "--masks" in flags:  # a folder of photos: zeroshot_eval names the JSON after it
        where = os.path.basename(os.path.normpath(flags[flags.index("--masks") + 1]))
    json_path = f"{out}/{'depth' if command == 'eval-depth' else 'fg'}_{where}.json"
    if command == "eval-edges":  # OUT/<where>/scores.json, beside each method's edge maps
        json_path = f"{out}/{'bsds_val' if '--bsds' in flags else where}/scores.json"
    return {"kind": "zeroshot", "name": f"{command} {run}" + (" anywhere" if "--anywhere" in flags else ""),
            "argv": ["zeroshot.py", command, "--ckpt", f"{RUNS}/{run}/checkpoint.pt", *flags, "--out", out],
            "json": json_path}


def bench(name, *flags):
    return {"kind": "bench", "name": name, "argv": ["bench.py", "--device", "cpu", *flags,
                                                     "--json", f"{RUNS}/bench_{name}.json"],
            "json": f"{RUNS}/bench_{name}.json"}


# The tables: name -> (title, what it shows, rows). Rows are run in order; a train run already made by an
# earlier table of the same invocation is reused (same name, same flags).
QUICK = {
    "laptop": ("The default run: GMAE, MAE with the same flags, the mean-colour oracle",
               "`python train.py` and `python train.py --decoder pixels` (20 epochs of 2048 synthetic scenes, "
               "32 px), scored on 256 validation scenes; probes on their frozen encoders against the same encoder "
               "untrained (`--random-init`).",
               [train("gmae"), train("mae", "--decoder", "pixels"), {"kind": "oracle", "name": "oracle"},
                probe("gmae"), probe("gmae", random_init=True), probe("mae"), probe("mae", random_init=True)]),
    "loss": ("Loss ablation (paper Table 1c at laptop scale)",
             "GMAE with the loss on the whole image (the laptop default), on the masked patches only (the paper's) "
             "and on per-patch normalised targets, the render regressed onto them as MAE's flag does. That row is "
             "scored after scaling each predicted patch back with the image's own patch mean and std, which hands it "
             "every masked patch's true mean and contrast: its PSNR flatters it (docs/design.md 1).",
             [train("gmae"), train("gmae_masked", "--loss-on", "masked"), train("gmae_normpix", "--norm-pix")]),
    "scale": ("Scale range c (paper Table 1d at laptop scale)",
              "scale = c sigmoid(s): c = 1 is the paper's, c = 2 the laptop default.",
              [train("gmae_c1", "--scale-max", "1"), train("gmae")]),
    "per_token": ("Number of Gaussians, several per decoder token",
                  "K = 64 g Gaussians from 64 query tokens (`--gaussians K`: the preset picks g = K / 64); "
                  "4096 Gaussians once. Two rows keep K and give the decoder more query tokens (g = 1 at K = 128, "
                  "g = 16 at 4096): what tokens buy that Gaussians per token do not. The last two rows time "
                  "`--epochs 2` of the mission's command against the default.",
                  [train("gmae"), train("gmae_k128", "--gaussians", "128"),
                   train("gmae_k128_g1", "--gaussians", "128", "--gaussians-per-token", "1"),
                   train("gmae_k256", "--gaussians", "256"),
                   train("gmae_k512", "--gaussians", "512", "--mask", "0.75"),
                   train("gmae_k4096", "--gaussians", "4096"),
                   train("gmae_k4096_g16", "--gaussians", "4096", "--gaussians-per-token", "16"),
                   train("epochs2_k64", "--epochs", "2"), train("epochs2_k512", "--gaussians", "512", "--mask", "0.75",
                                                                "--epochs", "2")]),
    "zeroshot": ("Zero-shot diagnostics of the default GMAE, against controls",
                 "`zeroshot.py eval-depth` (threshold-free: does depth separate the foreground, does it follow the "
                 "paint order) and `eval-fg` (figure-ground masks) on 200 synthetic scenes, each reading also with "
                 "depth permuted among an image's Gaussians and with a position-only (radial) depth.",
                 [train("gmae"), zeroshot("eval-depth", "gmae", "--synthetic", "200"),
                  zeroshot("eval-fg", "gmae", "--synthetic", "200")]),
    "speed": ("Speed: rasterizers and training steps, as ratios within one run",
              "`bench.py` on the CPU (the machine is shared and noisy: compare ratios, not times).",
              [bench("render", "--quick"), bench("per_token", "--per-token", "laptop", "paper",
                                                  "--train-repeats", "2")]),
}


BSDS_EDGE_IMAGES = 20  # BSDS matching costs about 90 CPU-seconds an image (4 readings x 99 thresholds x ~5 annotators)


def long_tables(cifar, ecssd=None, bsds=None):
    """The tables of `study.py long`, on the CIFAR-10 image folder `cifar` (--cifar; CIFAR_LAYOUT), with the
    CIFAR-trained GMAE's figure-ground on ECSSD's photos when `ecssd` is given (--ecssd), and its edges on the
    first BSDS_EDGE_IMAGES BSDS500 val images, a table of its own, when `bsds` is (--bsds)."""
    gmae = train("cifar_gmae", "--data", cifar, "--epochs", "10")
    rows = [gmae, train("cifar_mae", "--data", cifar, "--epochs", "10", "--decoder", "pixels"),
            probe("cifar_gmae", data=cifar), probe("cifar_gmae", random_init=True, data=cifar),
            probe("cifar_mae", data=cifar), probe("cifar_mae", random_init=True, data=cifar)]
    if ecssd:
        rows.append(zeroshot("eval-fg", "cifar_gmae", "--masks", ecssd))
    tables = {
        "cifar": ("CIFAR-10 subset: probes after an equal pretraining budget, and figure-ground on photos",
                  "20k train / 5k val photos at 32 px, 10 epochs each, laptop defaults otherwise; probes on their "
                  "frozen encoders (mean pool) against the same encoders untrained; with `--ecssd DIR`, the "
                  "CIFAR-trained GMAE's figure-ground masks on ECSSD's photos beside their controls.",
                  rows),
    }
    if bsds:
        tables["cifar_edges"] = (
            "CIFAR-10 GMAE: edges on BSDS500 photos",
            f"The CIFAR GMAE of the table above read as edges (docs/design.md 5) on the first {BSDS_EDGE_IMAGES} "
            "BSDS500 val images, scored with the BSDS protocol (99 thresholds) beside its depth controls and Sobel. "
            f"{BSDS_EDGE_IMAGES} of the 100 val images, because the matching costs about 90 CPU-seconds an image "
            "(spread over the cores by `--workers`): `zeroshot.py eval-edges` without `--limit` runs them all.",
            [gmae, zeroshot("eval-edges", "cifar_gmae", "--bsds", bsds, "--limit", str(BSDS_EDGE_IMAGES))])
    return tables


LONG = long_tables("DIR", bsds="BSDS")  # names, titles (render, --only); `long` builds rows on its own folders
TABLES = {**QUICK, **LONG}


# ---------------------------------------------------------------------------------------------------------
# Running


@torch.no_grad()
def mean_colour_oracle(n_val=256, img_size=32, patch_size=4, mask_ratio=0.75, seed=0, batch_size=64):
    """PSNR of predicting each validation image as its own mean colour, over the masked pixels (the same seeded
    masks model.reconstruction_metrics draws) and over the whole image, each the mean of per-image PSNRs."""
    val = build_dataset("synthetic", img_size, train=False, n_synthetic=n_val, seed=seed)
    imgs = torch.stack([val[i][0] for i in range(n_val)])
    gen = torch.Generator().manual_seed(seed)
    masked_db, full_db = [], []
    for i in range(0, n_val, batch_size):
        x = patchify(imgs[i: i + batch_size], patch_size)  # [b, N, P]
        err = ((x - x.reshape(x.shape[0], -1, 3).mean(1).repeat(1, patch_size ** 2)[:, None]) ** 2).sum(-1)
        _, mask, _, _ = random_masking(x, mask_ratio, gen)  # [b, N], 1 = masked
        masked_db.append(psnr_db((err * mask).sum(1), mask.sum(1) * x.shape[-1]))
        full_db.append(psnr_db(err.sum(1), x[0].numel()))
    return {"psnr_masked": torch.cat(masked_db).mean().item(), "psnr_full": torch.cat(full_db).mean().item()}


def run_row(row, done):
    """Run one row (or reuse a train run made earlier); its record for the JSON."""
    if row["kind"] == "oracle":
        t0 = time.time()
        result = mean_colour_oracle()
        return {"name": row["name"], "command": "study.mean_colour_oracle()", "wall_s": time.time() - t0,
                "result": result}
    command = "python " + " ".join(row["argv"])
    if row["kind"] == "train" and command not in done:
        done[command] = finished_run(row, command)
    if row["kind"] == "train" and done[command] is not None:
        return done[command]
    print(f"\n$ {command}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *row["argv"]], check=True, cwd=HERE)
    record = {"name": row["name"], "command": command, "wall_s": time.time() - t0}
    if row["kind"] == "train":
        with open(os.path.join(HERE, row["argv"][-1], "log.jsonl")) as f:
            record["result"] = json.loads(f.readlines()[-1])
        cfg = read_checkpoint(os.path.join(HERE, row["argv"][-1], "checkpoint.pt"))["config"]
        record["config"] = asdict(cfg)
        done[command] = record
        write_whole(os.path.join(HERE, row["argv"][-1], "study.json"), json.dumps(record, indent=1).encode())
    else:
        with open(os.path.join(HERE, row["json"])) as f:
            record["result"] = json.load(f)
    return record


def finished_run(row, command):
    """The record of a train run an earlier `study.py` left in its folder (study.json), so that a stopped study
    picks up where it was; None when there is none for this command. A folder whose run finished (its last log
    line at the last epoch) but has no study.json is reused with train.py's own time_s as its wall time."""
    out = os.path.join(HERE, row["argv"][-1])
    if os.path.exists(os.path.join(out, "study.json")):
        with open(os.path.join(out, "study.json")) as f:
            record = json.load(f)
        return record if record["command"] == command else None
    epochs = int(row["argv"][row["argv"].index("--epochs") + 1]) if "--epochs" in row["argv"] else 20
    if not os.path.exists(os.path.join(out, "log.jsonl")):
        return None
    with open(os.path.join(out, "log.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    if last["epoch"] != epochs:
        return None
    cfg = read_checkpoint(os.path.join(out, "checkpoint.pt"))["config"]
    return {"name": row["name"], "command": command, "wall_s": last["time_s"], "wall_source": "log time_s",
            "result": last, "config": asdict(cfg)}


def run_tables(names, tables, invocation):
    """Run the tables `names` of `tables` (name -> (title, about, rows)) into results/<name>.json, each recorded as
    measured by `<invocation> --only <name>`. Returns {name: why} for the tables a failed command left unwritten."""
    done, failed = {}, {}
    os.makedirs(RESULTS, exist_ok=True)
    for name in names:
        title, about, rows = tables[name]
        t0 = time.time()
        try:
            records = [run_row(row, done) for row in rows]
        except subprocess.CalledProcessError as e:  # one failed command costs its table, not the others
            failed[name] = f"`python {' '.join(e.cmd[1:])}` exited with {e.returncode}"
            print(f"table {name} not written: {failed[name]}", flush=True)
            continue
        result = {"table": name, "command": f"{invocation} --only {name}",
                  "wall_s": time.time() - t0, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
                  "rows": records}
        write_whole(os.path.join(RESULTS, f"{name}.json"), json.dumps(result, indent=1).encode())
        print(f"wrote results/{name}.json ({result['wall_s'] / 60:.1f} min)", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------------------
# Rendering docs/results.md from results/*.json


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def minutes(seconds):
    return f"{seconds / 60:.1f} min"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def train_cells(rec):
    r = rec["result"]
    depth = (f"{fmt(r['z_std'])} / {r['z_saturated']:.0%} / {fmt(r['corr_scale_z'])}" if "z_std" in r else "")
    return [fmt(r["psnr_masked"]), fmt(r["psnr_full"]), depth, f"{r['img_per_s']:.0f}", minutes(rec["wall_s"])]


TRAIN_HEADER = ["masked PSNR (dB)", "full PSNR, mask 0", "z std / abs(z) > 0.99 / corr(scale, z)", "img/s",
                "wall"]


def render_laptop(t):
    rows = {r["name"]: r for r in t["rows"]}
    probes = lambda run: (f"{rows[run + '_mean']['result']['linear']['top1']:.1f} / "  # noqa: E731
                          f"{rows[run + '_mean_random']['result']['linear']['top1']:.1f}",
                          f"{rows[run + '_mean']['result']['knn']['top1']:.1f} / "
                          f"{rows[run + '_mean_random']['result']['knn']['top1']:.1f}")
    table = [["GMAE", f"`{rows['gmae']['command']}`", *train_cells(rows["gmae"])[:3], *probes("gmae")],
             ["MAE", f"`{rows['mae']['command']}`", *train_cells(rows["mae"])[:2], "", *probes("mae")],
             ["mean-colour oracle", "sees the whole image", fmt(rows["oracle"]["result"]["psnr_masked"]),
              fmt(rows["oracle"]["result"]["psnr_full"]), "", "", ""]]
    return md_table(["", "command", *TRAIN_HEADER[:3], "linear top-1, trained / untrained",
                     "k-NN top-1, trained / untrained"], table)


def render_train_rows(t):
    table = []
    for rec in t["rows"]:
        if "config" in rec:
            c = rec["config"]
            table.append([f"`{rec['command']}`", c["num_gaussians"], c["gaussians_per_token"], *train_cells(rec)])
    return md_table(["command", "K", "g", *TRAIN_HEADER], table)


def render_zeroshot(t):
    parts = []
    for rec in t["rows"]:
        if "config" in rec:
            continue
        res = rec["result"]
        columns = list(next(iter(res.values())))
        parts.append(f"`{rec['command']}`\n\n" + md_table(["reading", *columns],
                                                          [[m, *(fmt(v[c], 3) for c in columns)] for m, v in res.items()]))
    return "\n\n".join(parts)


def render_speed(t):
    parts = []
    for rec in t["rows"]:
        res = rec["result"]
        if "render" in res:
            backends = res["backends"]
            parts.append(f"`{rec['command']}` ({res['device_name']})\n\n" + md_table(
                ["scene (px / K)", *(f"{b} ms" for b in backends), "speed-up over torch"],
                [[r["scene"], *(fmt(r["ms"][b], 1) for b in backends),
                  ", ".join(f"{b} {v:.0f}x" for b, v in r["speedup"].items())] for r in res["render"]]))
            step = res["train_step"]
            parts.append(md_table(["training step (32 px, batch 32)", "ms", "GMAE / MAE", "splatting share"],
                                  [[name, fmt(ms, 0), fmt(step["ratio_to_mae"].get(name), 3),
                                    f"{step['render_share'][name.split('/')[-1]]:.1%}" if name != "mae" else ""]
                                   for name, ms in step["ms"].items()]))
        for scale in res.get("per_token", []):
            parts.append(f"`{rec['command']}`: {scale['scale']} scale, {scale['img_size']} px, patch "
                         f"{scale['patch_size']}, encoder {scale['enc_dim']} wide, decoder {scale['dec_dim']} x "
                         f"{scale['dec_depth']}, batch {scale['batch']}\n\n" + md_table(
                             ["K Gaussians", "MAE step ms", "GMAE / MAE at g = 1", "recommended g", "GMAE / MAE there",
                              "splatting share there"],
                             [[r["gaussians"], fmt(r["ms"]["mae"], 0), fmt(r["ratio_to_mae"]["g=1"]),
                               r["recommended_g"], fmt(r["ratio_to_mae"][f"g={r['recommended_g']}"]),
                               f"{r['render_share']:.1%}"] for r in scale["rows"]]))
    return "\n\n".join(parts)


def render_cifar(t):
    rows = {r["name"]: r for r in t["rows"]}
    parts = [render_train_rows(t)]
    probes = []
    for run, label in (("cifar_gmae", "GMAE"), ("cifar_mae", "MAE")):
        trained, untrained = rows[f"{run}_mean"]["result"], rows[f"{run}_mean_random"]["result"]
        probes.append([label, f"`{rows[run + '_mean']['command']}`",
                       f"{trained['linear']['top1']:.1f} / {untrained['linear']['top1']:.1f}",
                       f"{trained['knn']['top1']:.1f} / {untrained['knn']['top1']:.1f}",
                       f"{trained['num_train']} / {trained['num_val']}"])
    parts.append(md_table(["probe", "command", "linear top-1, trained / untrained", "k-NN top-1, trained / untrained",
                           "train / val images"], probes))
    zeroshot_rows = [r for r in t["rows"] if r["name"].startswith("eval-")]
    if zeroshot_rows:
        parts.append(render_zeroshot({"rows": zeroshot_rows}))
    return "\n\n".join(parts)


RENDERERS = {"laptop": render_laptop, "zeroshot": render_zeroshot, "speed": render_speed, "cifar": render_cifar,
             "cifar_edges": render_zeroshot}
PAGE_HEAD = """# Results

Written by `python study.py render` from `results/*.json` alone; do not edit by hand. Each table names the command
that measures it (`python study.py quick --only NAME`), its wall time (the sum of its rows' runs, each run alone on
the machine named) and the commands of its rows. Laptop tables: tiny ViT (192 x 6, decoder 128 x 2), 32 px
synthetic scenes, 256 validation scenes with seeded masks. PSNR is the mean over images of each image's PSNR, in
pixel space (`--norm-pix` rows are scaled back with each patch's true mean and std, which flatters them:
docs/design.md 1); corr(scale, z) is taken within images (each image's Gaussians centred on its own means).
"""


def render_table(name):
    title, about, _ = TABLES[name]
    path = os.path.join(RESULTS, f"{name}.json")
    mode = "quick" if name not in LONG else "long --cifar DIR" + (" --bsds BSDS" if name == "cifar_edges" else "")
    if not os.path.exists(path):
        return f"## {title}\n\nNot measured yet: `python study.py {mode} --only {name}`.\n"
    try:
        with open(path) as f:
            t = json.load(f)
        body = RENDERERS.get(name, render_train_rows)(t)
        wall = sum(r["wall_s"] for r in t["rows"])
        return (f"## {title}\n\n{about}\n\n`{t['command']}`: {minutes(wall)} on {t['date']} ({t['machine']}, torch "
                f"{t['torch']}).\n\n{body}\n")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # truncated, edited, another layout
        raise ValueError(f"{os.path.relpath(path, HERE)} cannot be rendered ({type(e).__name__}: {e}); run "
                         f"`python study.py {mode} --only {name}` again or restore it. No page was changed") from None


def render(page=os.path.join(HERE, "docs", "results.md"), readme=os.path.join(HERE, "README.md")):
    """Write docs/results.md, and the laptop table into README's <!-- study:laptop --> block: every table is
    rendered first, then each file is written whole (engine.write_whole); a result file that cannot be read changes
    nothing (ValueError naming it)."""
    text_page = PAGE_HEAD + "".join("\n" + render_table(name) for name in TABLES)
    start, end = "<!-- study:laptop -->", "<!-- /study:laptop -->"
    text = None
    if os.path.exists(readme):
        with open(readme) as f:
            text = f.read()
        if start in text and end in text:
            block = render_table("laptop").split("\n\n", 1)[1].strip()
            text = text[: text.index(start) + len(start)] + "\n" + block + "\n" + text[text.index(end):]
    write_whole(page, text_page.encode())
    if text is not None:
        write_whole(readme, text.encode())
    print(f"wrote {os.path.relpath(page, HERE)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["quick", "long", "render"])
    p.add_argument("--only", nargs="+", default=None, choices=list(TABLES), help="these tables only")
    p.add_argument("--cifar", metavar="DIR", help=f"CIFAR-10 for `long`: {CIFAR_LAYOUT}")
    p.add_argument("--ecssd", metavar="DIR", help="ECSSD for `long` (optional): DIR/images/ and DIR/ground_truth_mask/ "
                   "(or masks/), as README \"Data\" says")
    p.add_argument("--bsds", metavar="ROOT", help="BSDS500 for `long` (optional): ROOT/images/val/ and "
                   "ROOT/groundTruth/val/ (the official archive's BSR/BSDS500/data), as README \"Data\" says")
    args = p.parse_args(argv)
    if args.mode == "render":
        try:
            render()
        except ValueError as e:  # a result file that cannot be rendered; engine.OutputError: a page not written
            p.error(str(e))
        return
    if args.mode == "long" and not args.cifar:
        p.error(f"long needs --cifar DIR, a CIFAR-10 image folder: {CIFAR_LAYOUT}")
    if args.mode == "long" and not all(os.path.isdir(os.path.join(args.cifar, s)) for s in ("train", "val")):
        p.error(f"--cifar {args.cifar} needs train/ and val/ class folders: {CIFAR_LAYOUT}")
    if args.ecssd and not os.path.isdir(os.path.join(args.ecssd, "images")):
        p.error(f"--ecssd {args.ecssd} needs images/ and ground_truth_mask/ (or masks/) folders (README \"Data\")")
    if args.bsds and not os.path.isdir(os.path.join(args.bsds, "groundTruth", "val")):
        p.error(f"--bsds {args.bsds} needs images/val/ and groundTruth/val/ folders (README \"Data\")")
    # The rows run with this folder as their working directory: paths relative to it (as they appear in the page).
    here = lambda path: os.path.relpath(os.path.abspath(path), HERE)  # noqa: E731
    tables = QUICK if args.mode == "quick" else long_tables(*(here(d) if d else None for d in
                                                              (args.cifar, args.ecssd, args.bsds)))
    invocation = "python study.py quick" if args.mode == "quick" else (
        f"python study.py long --cifar {args.cifar}" + (f" --ecssd {args.ecssd}" if args.ecssd else "")
        + (f" --bsds {args.bsds}" if args.bsds else ""))
    names = args.only or list(tables)
    other = [n for n in names if n not in tables]
    if other:
        p.error(f"--only {' '.join(other)}: not a table of `{args.mode}` (quick: {', '.join(QUICK)}; long: "
                f"{', '.join(LONG)})")
    failed = run_tables(names, tables, invocation)
    try:
        render()
    except ValueError as e:
        p.error(str(e))
    if failed:
        sys.exit(f"study.py {args.mode}: {len(failed)} of {len(names)} tables not written: "
                 + "; ".join(f"{name} ({why})" for name, why in failed.items()))


if __name__ == "__main__":
    run_main(main)
