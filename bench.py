"""
Speed of the splatting backends and of a GMAE training step against MAE, as ratios measured in one run.

    python bench.py                      # on cuda if there is a GPU, else cpu; every backend that runs there
    python bench.py --device cpu --splat cpu torch --json bench.json
    python bench.py --quick              # fewer repeats (smoke test)

Everything timed (the splat backends, the torch reference, the GMAE and MAE models) runs on --device, so
every ratio compares two steps on the same device. torch runs anywhere; the cpu kernel needs --device cpu
and the cuda kernel --device cuda: by default every backend that runs there is timed; one asked for with --splat
that cannot build or run on the device is an error.

1. Rasterization, forward + backward through splat.render, batch 16 of random Gaussians
   (splat.random_gaussians), for each scene (H x W / K): 32x32/64, 64x64/256, 64x64/1024, 128x128/4096.
   Reported: median ms per batch and the speed-up over the torch reference (same scenes, same run).
   The dense reference holds several [B, H*W, K] tensors; above --max-dense-gb it is skipped and says so.
2. Training step (forward, backward, AdamW step) at train.py's defaults (GMAEConfig.preset("tiny"), batch
   --train-batch): GMAE with each splat backend vs MAE (--decoder pixels), steps interleaved so machine
   noise hits both alike. The paper reports that splatting adds about 1.5 % to a step on GPUs
   (GMAE / MAE = 1.015): a number for --device cuda.

3. --per-token laptop|paper: the training-step ratio GMAE / MAE for K in {64, 256, 512, 1024, 4096} Gaussians,
   at one Gaussian per decoder token (the paper, g = 1) and at the g the presets pick (model.per_token_for: at
   most one query token per patch). laptop = GMAEConfig.preset("tiny") at 32 px, batch 32; paper = ViT-B/16
   at 224 px (preset("base", **PAPER)), batch 2 (--per-token-batch), which a CPU can step.
4. --sim: the cost of the cuda-sim backend (splat_cuda.cu run one GPU thread at a time by cuda_sim.h) on scenes
   like those of tests/test_cuda_sim.py, forward + backward, under the in-order and warp-greedy schedules, as a
   ratio to the cpu kernel on the same scenes. cuda-sim is for tests and reading, never for work.

Machines are shared and noisy: compare ratios within one run, never absolute times across runs.
"""
import argparse
import contextlib
import json
import os
import statistics
import time
from dataclasses import replace

import torch

import splat
from data import build_dataset
from engine import check_device, check_ranges, check_result_file, param_groups, run_main, write_whole
from model import GMAE, PAPER, GMAEConfig, per_token_for

SCENES = [(32, 64), (64, 256), (64, 1024), (128, 4096)]  # (image side, Gaussians)
CPU = torch.device("cpu")
TRAIN_BATCH = 32  # train.py's --batch-size default
WEIGHT_DECAY = 0.05  # train.py's --weight-decay default (the paper's)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeats, device, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def runs_on(backend, device):
    """torch rasterizes tensors on any device; each compiled kernel only those of its own device type (cuda-sim:
    CPU tensors)."""
    return backend == "torch" or {"cuda-sim": "cpu"}.get(backend, backend) == device.type


def choose_backends(requested, device):
    """The requested backends that can run on `device`, the torch reference first (every ratio is taken
    against it), and one line for each that is skipped."""
    backends = ["torch"] + [b for b in requested if b != "torch" and runs_on(b, device)]
    skipped = [f"skipping backend {b!r}: it rasterizes {b} tensors, and --device is {device}"
               for b in requested if not runs_on(b, device)]
    return backends, skipped


def bench_render(backends, batch, repeats, max_dense_gb, device):
    """Forward + backward of splat.render for every scene and backend, all on `device`."""
    rows = []
    for size, k in SCENES:
        g = splat.random_gaussians(batch, k, generator=torch.Generator().manual_seed(0)).to(device)
        row = {"scene": f"{size}x{size}/{k}", "ms": {}}
        for backend in backends:
            dense_gb = 6 * batch * size * size * k * 4 / 1e9  # ~6 live [B, HW, K] float32 tensors
            if backend == "torch" and dense_gb > max_dense_gb:
                row["ms"][backend] = None
                continue
            x = g.clone().requires_grad_()

            def step():
                splat.render(x, size, size, backend=backend).sum().backward()
                x.grad = None

            row["ms"][backend] = median_ms(step, repeats, device)
        ref = row["ms"]["torch"]
        row["speedup"] = {b: ref / row["ms"][b] for b in backends if b != "torch" and ref is not None}
        rows.append(row)
    return rows


def bench_train_step(backends, repeats, device, batch=TRAIN_BATCH):
    """GMAE (each backend) and MAE training steps at train.py's defaults, interleaved, all on `device`."""
    cfg = GMAEConfig.preset("tiny")
    data = build_dataset("synthetic", cfg.img_size, train=True, n_synthetic=batch)
    x = torch.stack([data[i][0] for i in range(batch)]).to(device)
    steps = {f"gmae/{b}": training_step(cfg, x, b) for b in backends}
    steps["mae"] = training_step(replace(cfg, decoder="pixels"), x, "torch")
    ms = interleaved_ms(steps, repeats, device)
    # The splatting part alone, on Gaussians of the same count and batch: its share of the GMAE step.
    render_ms = {}
    g = splat.random_gaussians(batch, cfg.num_gaussians, torch.Generator().manual_seed(0)).to(device)
    for backend in backends:
        x_g = g.clone().requires_grad_()
        render_ms[backend] = median_ms(lambda: splat.render(x_g, cfg.img_size, cfg.img_size, backend=backend)
                                       .sum().backward(), repeats, device)
    return {"batch": batch, "img_size": cfg.img_size, "gaussians": cfg.num_gaussians, "ms": ms,
            "ratio_to_mae": {name: ms[name] / ms["mae"] for name in ms if name != "mae"},
            "render_ms": render_ms, "render_share": {b: render_ms[b] / ms[f"gmae/{b}"] for b in backends}}


SIM_SCENES = [(16, 16, 1, 300), (16, 16, 1, 600), (37, 23, 2, 90), (32, 32, 2, 256)]  # H, W, B, K
SIM_SCHEDULES = ("in-order", "warp-greedy:1")


def bench_sim(repeats):
    """Forward + backward ms of the cpu kernel and of cuda-sim under each of SIM_SCHEDULES, per scene of
    SIM_SCENES (on the CPU), and cuda-sim's slowdown against the cpu kernel."""
    rows = []
    for H, W, B, K in SIM_SCENES:
        g = splat.random_gaussians(B, K, generator=torch.Generator().manual_seed(K)).requires_grad_()

        def step(backend):
            splat.render(g, H, W, backend=backend).sum().backward()
            g.grad = None

        ms = {"cpu": median_ms(lambda: step("cpu"), repeats, CPU)}
        for schedule in SIM_SCHEDULES:
            with scoped_env("CUDA_SIM_SCHEDULE", schedule):
                ms[f"cuda-sim {schedule}"] = median_ms(lambda: step("cuda-sim"), repeats, CPU)
        rows.append({"scene": f"{H}x{W}/B{B}/K{K}", "ms": ms,
                     "slowdown": {name: t / ms["cpu"] for name, t in ms.items() if name != "cpu"}})
        print(f"{rows[-1]['scene']:>16}: cpu {ms['cpu']:.1f} ms, " + ", ".join(
            f"{name} {ms[name]:.1f} ms ({x:.0f}x)" for name, x in rows[-1]["slowdown"].items()), flush=True)
    return rows


@contextlib.contextmanager
def scoped_env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


PER_TOKEN_SCALES = {"laptop": (dict(), 32), "paper": (PAPER, 2)}  # preset("tiny" / "base") overrides, batch
PER_TOKEN_KS = (64, 256, 512, 1024, 4096)


def interleaved_ms(steps, repeats, device):
    """Median ms of each step function, run round-robin (the first round is warm-up) so noise hits all alike."""
    times = {name: [] for name in steps}
    for _ in range(repeats + 1):
        for name, step in steps.items():
            times[name].append(median_ms(step, 1, device, warmup=0))
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def training_step(cfg, x, backend):
    """A closure doing one AdamW training step of a fresh GMAE(cfg) on images x."""
    torch.manual_seed(0)
    model = GMAE(cfg).to(x.device)
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=1e-4, betas=(0.9, 0.95))

    def step():
        loss = model(x, backend=backend)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_per_token(scale, ks, backend, repeats, device, batch=None):
    """GMAE / MAE training-step ratios at `scale` for each K, at g = 1 and at the presets' g."""
    overrides, default_batch = PER_TOKEN_SCALES[scale]
    base = GMAEConfig.preset("base" if scale == "paper" else "tiny", **overrides)
    batch = batch or default_batch
    x = torch.rand(batch, 3, base.img_size, base.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for k in ks:
        g = per_token_for(k, base.num_patches)
        runs = {f"g={gg}": replace(base, num_gaussians=k, gaussians_per_token=gg) for gg in dict.fromkeys([1, g])}
        steps = {name: training_step(cfg, x, backend) for name, cfg in runs.items()}
        steps["mae"] = training_step(replace(base, decoder="pixels"), x, backend)
        ms = interleaved_ms(steps, repeats, device)
        gs = splat.random_gaussians(batch, k, torch.Generator().manual_seed(0)).to(device).requires_grad_()
        render_ms = median_ms(lambda: splat.render(gs, base.img_size, base.img_size, backend=backend).sum().backward(),
                              repeats, device)  # the splatting part alone: its share of the step at the presets' g
        rows.append({"gaussians": k, "recommended_g": g, "ms": ms, "render_ms": render_ms,
                     "render_share": render_ms / ms[f"g={g}"],
                     "ratio_to_mae": {name: ms[name] / ms["mae"] for name in runs}})
        print(f"{scale:>7} K {k:5d}: " + ", ".join(f"{n} {r:.2f}x" for n, r in rows[-1]["ratio_to_mae"].items())
              + f" MAE's step ({ms['mae']:.0f} ms); splatting {rows[-1]['render_share']:.1%} of the g={g} step", flush=True)
    return {"scale": scale, "img_size": base.img_size, "patch_size": base.patch_size, "batch": batch,
            "enc_dim": base.enc_dim, "dec_dim": base.dec_dim, "dec_depth": base.dec_depth, "backend": backend,
            "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where every model and renderer runs (default: cuda if there is a GPU, else cpu)")
    p.add_argument("--splat", nargs="+", default=None, choices=splat.BACKENDS[1:],
                   help="backends to time (default: every one that loads here and runs on --device)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=TRAIN_BATCH, help="batch of the training step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-repeats", type=int, default=15)
    p.add_argument("--max-dense-gb", type=float, default=6.0, help="skip the torch reference above this")
    p.add_argument("--quick", action="store_true", help="2 repeats each (smoke test)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--per-token", nargs="+", default=None, choices=list(PER_TOKEN_SCALES),
                   help="only the Gaussians-per-token step ratios at these scales (section 3)")
    p.add_argument("--per-token-ks", nargs="+", type=int, default=list(PER_TOKEN_KS))
    p.add_argument("--per-token-batch", type=int, default=None, help="batch (default: 32 laptop, 2 paper)")
    p.add_argument("--sim", action="store_true", help="only the cuda-sim backend's cost against cpu (section 4)")
    args = p.parse_args(argv)
    check_ranges(p, args, {name: "[1, inf)" for name in ("batch", "train_batch", "repeats", "train_repeats",
                                                           "per_token_ks", "per_token_batch")}
                 | {"max_dense_gb": "(0, inf)"})
    try:  # before any work: the device exists, the JSON can be written and replaces no other file
        device = check_device(args.device)
        if args.json:
            check_result_file(args.json, [], ("threads", "torch"))
    except ValueError as e:
        p.error(str(e))
    if args.splat and any(not runs_on(b, device) for b in args.splat):
        p.error(f"--splat {' '.join(b for b in args.splat if not runs_on(b, device))} cannot run on --device {device}: "
                "each compiled kernel rasterizes its own device's tensors (cuda-sim: cpu); leave it out or change "
                "--device")
    for backend in set(args.splat or []) - {"torch"}:  # asked for by name: one that cannot build is an error
        try:
            splat._load_extension(backend)
        except splat.BackendUnavailable as e:
            p.error(f"{str(e).splitlines()[0][:300]} ...")
    if args.quick:
        args.repeats, args.train_repeats = 2, 2
    if args.sim:
        print("cuda-sim vs the cpu kernel, forward + backward, median ms (slowdown)")
        return write_json({"threads": torch.get_num_threads(), "torch": torch.__version__,
                           "sim": bench_sim(args.repeats)}, args.json)
    backends, skipped = choose_backends(args.splat or splat.available_backends(), device)
    if args.per_token:
        fast = [b for b in backends if b != "torch"] or ["torch"]
        result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "per_token": [bench_per_token(scale, args.per_token_ks, fast[0], args.train_repeats, device,
                                                args.per_token_batch) for scale in args.per_token]}
        return write_json(result, args.json)
    for line in skipped:
        print(line)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device {device} ({name}), backends {backends}")

    rows = bench_render(backends, args.batch, args.repeats, args.max_dense_gb, device)
    fast = [b for b in backends if b != "torch"]
    print(f"\nrasterize forward+backward on {device}, batch {args.batch}, median ms (speed-up over torch)")
    print(f"{'scene':>14} " + " ".join(f"{b:>20}" for b in backends))
    for row in rows:
        cells = []
        for b in backends:
            ms = row["ms"][b]
            text = "skipped (memory)" if ms is None else f"{ms:.1f}"
            if b in row["speedup"]:
                text += f" ({row['speedup'][b]:.0f}x)"
            cells.append(f"{text:>20}")
        print(f"{row['scene']:>14} " + " ".join(cells))

    step = bench_train_step(fast or ["torch"], args.train_repeats, device, args.train_batch)
    print(f"\ntraining step on {device} at train.py defaults ({step['img_size']} px, {step['gaussians']} Gaussians, "
          f"batch {step['batch']}), median ms and ratio to MAE")
    for run, ms in step["ms"].items():
        ratio = step["ratio_to_mae"].get(run)
        backend = run.split("/")[-1]
        share = f", splatting {step['render_share'][backend]:.1%} of it" if backend in step["render_share"] else ""
        print(f"{run:>14} {ms:8.1f}" + (f"   GMAE / MAE = {ratio:.3f}{share}" if ratio else ""))
    result = {"device": str(device), "device_name": name, "backends": backends, "skipped": skipped,
              "render": rows, "train_step": step, "threads": torch.get_num_threads()}
    return write_json(result, args.json)


def write_json(result, path):
    if path:
        write_whole(path, json.dumps(result, indent=1).encode())
    return result


if __name__ == "__main__":
    run_main(main)
