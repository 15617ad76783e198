"""
The stage scripts' shared plumbing: checkpoints, RNG state, torchrun process groups and DDP, the lr schedule
and parameter groups, and the pretrained encoder as a feature extractor. The model itself is model.py; this
file is what train.py, probe.py, finetune.py and zeroshot.py need around it (MAE keeps the same pieces in
util/misc.py, util/lr_sched.py and util/lr_decay.py).

    save_checkpoint / read_checkpoint / load_checkpoint     atomic writes, clear errors, the model rebuilt
    claim_run_folder / check_output / write_whole / save_image  outputs never over a run or an input, written whole
    check_flags / check_ranges                              every flag's range (and finiteness) before any work
    rng_states / set_rng_states                             every RNG a step draws from, for exact resume
    distributed / wrap_ddp / unwrap / all_reduce_sum        torchrun's process group (no-ops in one process)
    any_process                                             all processes stop an epoch together
    ReadableBatches                                         past batches with no readable image file
    collect_images                                          a command's input files and their output names
    param_groups / lr_at / set_lr                           AdamW groups, warmup + cosine per iteration
    load_encoder / encode / topk_accuracy                   frozen or fine-tuned encoder features

Try it: python -c "import engine; print(engine.lr_at(50, 100, 10, 1e-3, 0.0))"
"""
import collections
import contextlib
import fcntl
import glob
import json
import math
import os
import random
import sys
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from data import IMG_EXTENSIONS, VAL_FRACTION, list_images
from model import GMAE, Encoder, GMAEConfig, normalize
from splat import BackendUnavailable, DenseRenderTooLarge

# ---------------------------------------------------------------------------------------------------------
# Checkpoints (written by train.py, read by every later stage)


class CheckpointError(ValueError):
    """A checkpoint file that exists but cannot be used: truncated, not a torch file, or not GMAE's."""


def save_checkpoint(path, model, optimizer, cfg, epoch, step, extra=None):
    """Write {model, optimizer, config, epoch, step} plus the entries of `extra` (train.py adds the position
    in the epoch, the GradScaler and the RNG states) atomically: to path.tmp, flushed to disk, then renamed
    over path. A crash, SIGKILL or full disk mid-write leaves the previous checkpoint as it was."""
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(cfg),
                 "epoch": epoch, "step": step, **(extra or {})}, path)


def atomic_save(state, path):
    """torch.save(state) to path whole or not at all (write_whole): a crash, SIGKILL or full disk mid-write leaves
    the previous file at path as it was; a failed write is an OutputError."""
    write_whole(path, lambda f: torch.save(state, f))


# ---------------------------------------------------------------------------------------------------------
# Outputs: never over a run or an input, whole or not at all


class OutputError(ValueError):
    """An output that would replace a run or an input of the same command, or that cannot be written there."""


def write_whole(path, write):
    """write(f) into path.tmp, flushed to disk, then renamed over path; on any failure (disk full included) the
    .tmp is removed, the file at path is as it was, and OutputError says why in one line. write: a function of the
    open binary file, or the bytes themselves."""
    path, tmp = os.fspath(path), os.fspath(path) + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # check_output said it can be made
        with open(tmp, "wb") as f:
            write(f) if callable(write) else f.write(write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OutputError(f"could not write {path}: {e.strerror or e}; nothing there was changed") from None


def save_image(image, path):
    """A PIL image as a PNG file at path, whole or not at all (write_whole)."""
    write_whole(path, lambda f: image.save(f, format="PNG"))


def check_output(out, inputs=(), folder=True):
    """OutputError, before any work, unless `out` can be written (a folder, or a file when folder is False: an
    existing one of the other kind, a path under a file or in a folder this process cannot write are refused)
    and is none of `inputs` (files or folders) nor inside one of them: a command never writes over what it reads,
    nor reads what it wrote."""
    if not os.fspath(out).strip():
        raise OutputError(f"--out is empty; give {'a folder' if folder else 'a file'}")
    real = os.path.realpath(out)
    if os.path.exists(out) and os.path.isdir(out) != folder:
        raise OutputError(f"--out {out} is {'a file' if folder else 'a folder'}; give {'a folder' if folder else 'a file'}")
    for given in inputs:
        source = os.path.realpath(given)
        if real == source or real.startswith(source.rstrip(os.sep) + os.sep):
            raise OutputError(f"--out {out} {'is' if real == source else 'is inside'} the input {given}: outputs never "
                              "go where the command reads; give another --out")
    parent = os.path.dirname(real)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"--out {out}: {parent} is a file, so nothing can be made under it")
    target = real if os.path.exists(real) else parent
    if not os.access(target, os.W_OK):
        raise OutputError(f"--out {out}: {target} is not writable")


def check_result_file(out, inputs, keys):
    """check_output for a JSON result file, plus: an existing file there is replaced only when it is a result of the
    same command (a JSON object with all of `keys`), never another file (OutputError)."""
    check_output(out, inputs, folder=False)
    if os.path.exists(out):
        try:
            with open(out) as f:
                ours = set(keys) <= set(json.load(f))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise OutputError(f"--out {out} exists and is not a result of this command; it is kept: give another --out")


_held = {}  # the run folders this process holds -> their locks, kept for as long as it lives


def claim_run_folder(out, resume, overwrite, marks, owned=(), inputs=()):
    """Make `out` this run's folder, before any work, and hold it. OutputError if it cannot be written or lies in
    one of `inputs` (check_output), if it already holds a run (a file of `marks`) and neither resume (continue it)
    nor overwrite (start over) is given, or if another process holds it (a lock on the folder, released when this
    one ends). overwrite deletes the old run's files (marks and the glob patterns of `owned`) and nothing else."""
    if resume and overwrite:
        raise OutputError("--resume continues the run in --out, --overwrite starts it over: give one of them")
    check_output(out, inputs)
    found = [m for m in marks if os.path.exists(os.path.join(out, m))]
    if found and not (resume or overwrite):
        raise OutputError(f"--out {out} already holds a run ({', '.join(found)}): --resume continues it, --overwrite "
                          "starts it over (deleting it), or give a new --out")
    os.makedirs(out, exist_ok=True)
    if os.path.realpath(out) not in _held:  # this process may run again in a folder it holds (tests do)
        lock = os.open(out, os.O_RDONLY)  # a lock on the folder itself: no file is left behind
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise OutputError(f"--out {out} is in use by another run; wait for it to end or give another --out") from None
        _held[os.path.realpath(out)] = lock
    if overwrite:
        for pattern in (*marks, *owned):
            for path in glob.glob(os.path.join(glob.escape(out), pattern)):
                os.remove(path)


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict with its config as a GMAEConfig; a clear error when there is none."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: make one with `python train.py --out {os.path.dirname(path) or '.'}`")
    try:  # weights_only: tensors, numbers, strings and containers only; a foreign pickle runs no code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zip, pickle and EOF errors, depending on where the file was cut
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        with open(path, "rb") as f:
            zipped = b"PK\x03\x04".startswith(f.read(4))  # torch.save writes a zip archive (or was cut before it)
        raise CheckpointError(f"{path} cannot be read as a checkpoint: " + (
            f"a cut or damaged torch file ({type(e).__name__}: {reason}); resume from an older copy or train again"
            if zipped else "it is not a file written by torch.save; pass the checkpoint.pt a train.py run wrote")) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py or finetune.py (no 'model' and 'config')")
    names = {f.name for f in fields(GMAEConfig)}
    try:
        ckpt["config"] = GMAEConfig(**{k: v for k, v in ckpt["config"].items() if k in names})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} holds an invalid config: {e}") from None
    return ckpt


def load_checkpoint(path, device="cpu"):
    """Load a train.py checkpoint and rebuild its whole model (encoder and decoder; zeroshot.py reads it).
    Returns (model, checkpoint dict). CheckpointError for a finetune.py classifier (no decoder) or weights that do
    not fit the checkpoint's config."""
    ckpt = read_checkpoint(path, device)
    if ckpt.get("kind") == "finetune" or not any(k.startswith("decoder.") for k in ckpt["model"]):
        raise CheckpointError(f"{path} holds no decoder (a finetune.py classifier keeps the encoder and a class head); "
                              "zero-shot readings need GMAE's Gaussians: pass a checkpoint written by train.py")
    model = GMAE(ckpt["config"]).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing or unexpected keys, or shapes that differ from the config's
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}'s weights do not fit a GMAE of its config: {first}; pass a checkpoint "
                              "written by train.py") from None
    return model, ckpt


def rng_states():
    """Every RNG a training step can draw from (torch CPU, the current CUDA device, numpy, python), as plain
    tensors and tuples so that read_checkpoint's weights_only loading accepts them. For exact resume."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
              has_gauss, cached), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    """Restore what rng_states() returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Distributed training, shared by train.py, probe.py and finetune.py (PyTorch DDP launched by torchrun)
#
# `torchrun --nproc_per_node N script.py` starts N copies of a script and describes the job in environment
# variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Each copy joins one process group,
# wraps its model in DistributedDataParallel (which averages gradients over the copies in backward) and
# reads its own share of every batch (data.make_loader). Plain `python script.py` has no WORLD_SIZE: no
# process group is made and every helper below is a no-op.


# What a stage script's main turns into one parser.error line: bad data or flags, a missing or foreign checkpoint
# (CheckpointError is a ValueError), a rasterizer that cannot build or a dense render too large for memory.
USER_ERRORS = (ValueError, FileNotFoundError, BackendUnavailable, DenseRenderTooLarge)


def run_main(main):
    """A stage script's entry point: main()'s result, and Ctrl-C as one line and exit 130 instead of a traceback
    (train.py saves first; every file is written whole, so an interrupted command leaves nothing half-written)."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted (Ctrl-C); the files already written are whole",
              file=sys.stderr)
        raise SystemExit(130) from None


def default_device():
    """Every stage script's --device default: the GPU when torch sees one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device):
    """A --device value -> torch.device, or ValueError in one line when it names something torch cannot use here
    (a misspelt device, a CUDA device on a machine or torch build without one, a GPU index past the last)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible to torch"
            raise ValueError(f"--device {device}: {build} (torch {torch.__version__}); use --device cpu, or install "
                             "torch's CUDA build on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s), cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: this project runs on cpu or cuda, not {dev.type}")
    return dev


def add_run_flags(p):
    """--device and --val-fraction, the same in every stage script (checked by check_flags)."""
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help="share of a folder without train/ and val/ held out for validation (by a hash of each path)")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when available)")


def add_labelled_data_flags(p):
    """The flags probe.py and finetune.py share: the checkpoint, the labelled data, device, loaders and seed."""
    p.add_argument("--ckpt", default="runs/gmae/checkpoint.pt", help="checkpoint written by train.py")
    p.add_argument("--data", default="synthetic", help="'synthetic' (labelled scenes), a folder root/{train,val}/<class>/ "
                   "or root/<class>/ (then --val-fraction of it is held out)")
    p.add_argument("--n-synthetic", type=int, default=2048, help="synthetic training scenes (train.py's default set)")
    p.add_argument("--n-val", type=int, default=512, help="synthetic validation scenes")
    p.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's (another size recomputes "
                   "the fixed sin-cos position embedding)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed and the initialisation of what is trained")
    add_run_flags(p)


def check_flags(p, args, at_least_one=(), ranges=None):
    """parser.error in one line, before any work, for a flag of at_least_one (dest names) below 1, one outside its
    range (check_ranges), any number that is NaN or infinite, a --device torch cannot use here (check_device) or a
    --val-fraction outside (0, 1)."""
    for name in at_least_one:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_ranges(p, args, {"val_fraction": "(0, 1)", "seed": "[0, 4294967295]", **(ranges or {})})
    try:
        check_device(args.device)
    except ValueError as e:
        p.error(str(e))


def check_ranges(p, args, ranges):
    """parser.error in one line for the first number among args (lists included) that is NaN or infinite, or
    outside the interval `ranges` gives its dest, written as text with an optional note: "[0, inf)",
    "(0, 1] a fraction". A dest args lacks (another subcommand's flag) or a None value (not given) is skipped."""
    for dest, value in vars(args).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                p.error(f"--{dest.replace('_', '-')} must be a finite number, got {v}")
    for dest, spec in ranges.items():
        end = min(i for i in (spec.find(")"), spec.find("]")) if i >= 0) + 1
        interval, note = spec[:end], spec[end:].strip()
        low, high = (float(x) for x in interval[1:-1].split(","))
        value = getattr(args, dest, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not ((v > low or (interval[0] == "[" and v == low))
                                      and (v < high or (interval[-1] == "]" and v == high))):
                p.error(f"--{dest.replace('_', '-')} must be in {interval}, got {v}" + (f" ({note})" if note else ""))


def init_distributed(device):
    """Join torchrun's process group if there is one. Returns (rank, world_size, device): nccl and GPU
    LOCAL_RANK on CUDA, gloo on CPU; (0, 1, device) for a plain single-process run."""
    device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()  # no copy leaves while another still writes or reduces
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device):
    """`with distributed(args.device) as (rank, world_size, device):` the body of a script's main, inside
    torchrun's process group when there is one (init_distributed), left cleanly on the way out."""
    rank, world_size, device = init_distributed(device)
    try:
        yield rank, world_size, device
    finally:
        cleanup_distributed()


def wrap_ddp(model, device):
    """DistributedDataParallel(model) inside a process group, else model unchanged."""
    if not dist.is_initialized():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    """The plain module inside DDP: what checkpoints, evaluation and PNGs use."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values, device):
    """Sum a list of numbers over all processes (one all-reduce); the list itself when single-process."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_process(flag, device):
    """True when flag is true in this or any other process: one all-reduce, which every process must join; flag
    itself in one process. train.py and finetune.py ask it before each forward whether some shard has run out
    (whole batches of unreadable files), so that all processes take the step or all stop: one that stopped alone
    would leave the others waiting in DDP's collectives (forward broadcasts buffers and, after the first step,
    bucket layouts; backward averages gradients)."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process; [obj] when single-process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------------
# Inputs: unreadable batches, and the files a command reads with the names it writes them under


class ReadableBatches:
    """Iterates the batches of a data.collate_skip_broken loader that hold a readable image, reading past those that
    hold none (None): the one way every stage meets unreadable files. `read` counts the loader's batches taken,
    None ones included (where a resumed epoch continues); `skipped` the files dropped, counted against
    loader.batch_size (exact for loaders that drop their last short batch, as make_loader's do)."""

    def __init__(self, loader):
        self.batches, self.batch_size, self.read, self.skipped = iter(loader), loader.batch_size, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        for batch in self.batches:
            self.read += 1
            self.skipped += self.batch_size - (0 if batch is None else len(batch[0]))
            if batch is not None:
                return batch
        raise StopIteration


def collect_images(paths):
    """(file, output name) pairs from a list of files and folders (folders: data.list_images, recursive, sorted).

    The name is the file's path under the folder argument it came from (its own name for a file given directly)
    without the extension: DIR/a/1.jpg -> a/1, and a BSDS folder gives the <stem>.png edge maps that
    `eval-edges --pred` reads. A file listed twice is read once. ValueError when two inputs would still share a
    name (see output_names): nothing is overwritten silently."""
    found = {}  # absolute path -> (path as given, path under its folder argument)
    for p in paths:
        if os.path.isdir(p):
            files = list_images(p)
            if not files:
                raise FileNotFoundError(f"no images found under {p} (looked for {', '.join(IMG_EXTENSIONS)})")
            pairs = [(f, os.path.relpath(f, p)) for f in files]
        elif os.path.isfile(p):
            pairs = [(p, os.path.basename(p))]
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
        for f, rel in pairs:
            found.setdefault(os.path.abspath(f), (f, rel))
    files = [f for f, _ in found.values()]
    return list(zip(files, output_names(files, [rel for _, rel in found.values()])))


def check_outputs_are_not_inputs(files, out, suffixes):
    """engine.OutputError if one of the files a command would write (OUT/<name><suffix>) is one of its inputs."""
    inputs = {os.path.realpath(path) for path, _ in files}
    for _, name in files:
        for dest in (os.path.join(out, name + suffix) for suffix in suffixes):
            if os.path.realpath(dest) in inputs:
                raise OutputError(f"--out {out}: the output {dest} is one of the inputs; give another --out")


def output_names(files, rels):
    """Each file's output name: its relative path rel without the extension, or with the extension folded in
    (x.jpg -> x_jpg, x.png -> x_png) where two inputs differ only by it. ValueError naming both files when two
    would still share a name (DIR1/x.jpg and DIR2/x.jpg given together). Names are compared ignoring case, as a
    macOS or Windows disk does."""
    bases = [os.path.splitext(r)[0] for r in rels]
    count = collections.Counter(b.casefold() for b in bases)
    names = [b + "_" + os.path.splitext(r)[1][1:] if count[b.casefold()] > 1 else b for b, r in zip(bases, rels)]
    first = {}
    for f, name in zip(files, names):
        if name.casefold() in first:
            raise ValueError(f"{first[name.casefold()]} and {f} would both be written as {name}...: give the folder "
                             "above them (names keep the path under it), or run them with different --out")
        first[name.casefold()] = f
    return names


# ---------------------------------------------------------------------------------------------------------
# Recipe pieces shared by train.py, probe.py and finetune.py (MAE util/lr_sched.py, util/lr_decay.py)

NO_DECAY = ("cls_token", "pos_embed", "queries", "mask_token")


def skips_weight_decay(name, param):
    """Biases, norms (1-D tensors), tokens and position embeddings get no weight decay (MAE)."""
    return param.ndim <= 1 or name.split(".")[-1] in NO_DECAY


def param_groups(model, weight_decay):
    """Two AdamW groups: [decay, no decay] (see skips_weight_decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if skips_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_lr(optimizer, lr):
    """Give every parameter group lr x its "lr_scale" (finetune.py's layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step, total_steps, warmup_steps, lr, min_lr):
    """Linear warmup then half-cycle cosine, per iteration (MAE util/lr_sched.py)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------
# The pretrained encoder as a feature extractor (probe.py, finetune.py)


def load_encoder(path, img_size=None, patch_size=None, drop_path=0.0, device="cpu"):
    """The encoder of a checkpoint written by train.py (GMAE or MAE alike: both decoders sit on the same
    Encoder) or by finetune.py. Returns (encoder, cfg); cfg.img_size is the size the encoder now takes.

    img_size other than the checkpoint's: the position embedding is fixed 2-D sin-cos and never trained, so
    it is recomputed for the new patch grid (patch i still sits at grid position i, as in pretraining);
    every trained weight loads unchanged. A different patch size cannot reuse the patch embedding, so asking
    for one (patch_size) is an error that says to pretrain with that --patch.
    """
    ckpt = read_checkpoint(path, device)
    cfg = ckpt["config"]
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    if not state:
        raise ValueError(f"{path} holds no encoder weights (no 'encoder.*' entries); pass a checkpoint from train.py")
    if patch_size is not None and patch_size != cfg.patch_size:
        raise ValueError(f"{path} was pretrained with patch size {cfg.patch_size}, not {patch_size}; its patch "
                         f"embedding does not fit: pretrain with `python train.py --patch {patch_size}`")
    if img_size is not None and img_size != cfg.img_size:
        if img_size % cfg.patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the checkpoint's patch size "
                             f"{cfg.patch_size}; pick a multiple of {cfg.patch_size} or pretrain at that size")
        cfg = GMAEConfig(**{**asdict(cfg), "img_size": img_size})
    encoder = Encoder(cfg, drop_path=drop_path).to(device)
    state["pos_embed"] = encoder.pos_embed.detach().clone()  # fixed sin-cos of this grid, equal when unchanged
    encoder.load_state_dict(state)
    return encoder, cfg


def encode(encoder, imgs, pool="cls"):
    """Images [B, 3, H, W] in [0, 1] -> features [B, D] of the whole image (mask 0).

    pool="cls": the normalised cls token (MAE's linear probe); "mean": the mean of the normalised patch
    tokens (MAE's fine-tuning uses global pooling)."""
    latents = encoder(normalize(imgs))[0]  # [B, 1 + N, D]
    if pool == "cls":
        return latents[:, 0]
    if pool == "mean":
        return latents[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percent of rows of scores [V, C] whose true label [V] is among the k highest, for k = 1 and each k < C
    (top-C is always 100, so it is left out)."""
    ks = [k for k in ks if k == 1 or k < scores.shape[1]]
    hits = scores.topk(max(ks), dim=1).indices == labels[:, None]  # [V, k_max]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}
