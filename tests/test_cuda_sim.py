"""The CUDA rasterizer (splat_cuda.cu) run on the CPU by the GPU model in cuda_sim.h, and that model itself.

1. The simulator, on small kernels written for it (tests/sim_kernels.cpp): barriers, shuffles, votes, masks and
   atomics give what a GPU gives, under every schedule; and it catches what it is for: a missing __syncthreads
   between two warps, a warp reduction with a wrong shuffle offset, a divergent barrier, warp operations that
   would wait for an exited lane or are called from outside their mask. Both fiber implementations run: the
   x86-64 switch and the portable ucontext one (built with -U__ELF__).
2. splat_cuda.cu under it (backend "cuda-sim"), against the float64 torch reference in value and gradient, on
   the scenes that exercise each part of the kernel: two and three staging batches, partial tiles, the early
   stop, empty batches, one Gaussian over the whole image, depth ties, a background that is not white; under
   each of the four schedules. The image does not depend on the schedule at all; the gradients only through the
   summation order of the atomics. And a float64 gradcheck through splat.render.
tests/test_splat_backends.py runs its whole comparison on "cuda-sim" too, under two schedules.

Run:  pytest -q tests/test_cuda_sim.py       (watch a block:  CUDA_SIM_TRACE=0, see docs/walkthrough.md 6)
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_splat_backends import gaussians_from  # valid Gaussians from per-Gaussian lists

import splat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCHEDULES = ["in-order", "reversed", "shuffled:3", "warp-greedy:4"]
F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------
# 1. The simulator on small kernels.


@pytest.fixture(scope="module", params=["x86-64 switch", "ucontext"])
def kernels(request, tmp_path_factory):
    """tests/sim_kernels.cpp built as a shared library, with one fiber implementation or the other."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if request.param == "x86-64 switch" and not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        pytest.skip("the assembly switch is for x86-64 Linux; elsewhere cuda_sim.h uses ucontext")
    flags = ["-U__ELF__"] if request.param == "ucontext" else []
    library = tmp_path_factory.mktemp("sim") / "sim_kernels.so"
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", *flags, "-I", ROOT,
                    os.path.join(HERE, "sim_kernels.cpp"), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def launch(lib, name, blocks, threads, *args):
    """Run a kernel of sim_kernels.cpp; numpy arrays go in as pointers. A launch error is a RuntimeError."""
    error = ctypes.create_string_buffer(1000)
    c_args = [a.ctypes.data_as(ctypes.c_void_p) if isinstance(a, np.ndarray) else ctypes.c_int(a) for a in args]
    if getattr(lib, name)(blocks, threads, *c_args, error, len(error)):
        raise RuntimeError(error.value.decode())


@pytest.fixture
def schedule(request, monkeypatch):
    monkeypatch.setenv("CUDA_SIM_SCHEDULE", request.param)
    return request.param


def values(n, seed=0):
    return np.random.default_rng(seed).integers(-50, 50, n).astype(np.float32)


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
def test_barrier_makes_the_next_warps_writes_visible(kernels, schedule):
    x = values(3 * 256)
    out = np.zeros_like(x)
    launch(kernels, "neighbour_warp", 3, 256, x, out, 1)
    expected = x.reshape(3, 256)[:, (np.arange(256) + 32) % 256].ravel()
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
def test_missing_barrier_between_warps_gives_a_wrong_result_every_time(kernels, schedule):
    # Whichever order the warps run in, some warp reads its neighbour's slots before the neighbour wrote them: in
    # order, every warp but the last; reversed, the last (it reads warp 0's). What it reads instead is what the
    # slots held before, as on a GPU: here the values of the block that ran before, so once in a while a block
    # that reads what an earlier run of the same block left there is right by chance. The launch never is.
    x = values(3 * 256, seed=1)
    expected = x.reshape(3, 256)[:, (np.arange(256) + 32) % 256]
    for _ in range(2):  # the second time, shared memory holds what the first left
        out = np.zeros_like(x)
        launch(kernels, "neighbour_warp", 3, 256, x, out, 0)
        wrong = out.reshape(3, 256) != expected
        assert wrong.any(axis=1).sum() >= 2 and wrong.mean() >= 1 / 24, schedule


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
def test_warp_sum_with_the_right_and_a_wrong_first_offset(kernels, schedule):
    x = values(2 * 128, seed=2)
    per_warp = x.reshape(-1, 32)
    out = np.zeros(8, dtype=np.float32)
    launch(kernels, "warp_sum", 2, 128, x, out, 16)
    np.testing.assert_array_equal(out, per_warp.sum(axis=1))
    launch(kernels, "warp_sum", 2, 128, x, out, 8)  # the bug: half the warp is left out of the sum
    np.testing.assert_array_equal(out, per_warp[:, :16].sum(axis=1))
    assert np.any(out != per_warp.sum(axis=1))


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
def test_masks_split_a_warp_into_halves_that_shuffle_and_vote_alone(kernels, schedule):
    x = np.abs(values(64, seed=3)) + 1
    x[[5, 40]] = -7  # one negative value in half-warps 0 and 2
    sums, negative = np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.int32)
    launch(kernels, "half_warp", 1, 64, x, sums, negative)
    np.testing.assert_array_equal(sums, x.reshape(4, 16).sum(axis=1))
    np.testing.assert_array_equal(negative, [1, 0, 1, 0])


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
def test_syncthreads_count_atomics_and_shared_maximum(kernels, schedule):
    x = np.random.default_rng(4).integers(0, 1000, 4 * 96).astype(np.int32)
    total, counts, maxima = np.zeros(1), np.zeros(4, dtype=np.int32), np.zeros(4, dtype=np.int32)
    launch(kernels, "block_stats", 4, 96, x, total, counts, maxima)
    assert total[0] == x.sum()
    np.testing.assert_array_equal(counts, (x.reshape(4, 96) % 2).sum(axis=1))
    np.testing.assert_array_equal(maxima, x.reshape(4, 96).max(axis=1))


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
@pytest.mark.parametrize("kind, threads, message", [
    (0, 256, r"deadlock in block 0: 128 of 256 threads have exited, 128 wait at a barrier \(a divergent barrier\)"),
    (1, 64, r"__shfl_down_sync \(line \d+\) in warp [01] waits for lane 31, which has exited"),
    (2, 64, r"thread [1-9]\d* calls __shfl_down_sync \(line \d+\) with a mask that leaves it out"),
    (3, 64, r"deadlock in block 0: 0 of 64 threads have exited, 32 wait at a barrier; thread 0 waits at "
            r"__shfl_down_sync"),
    (4, 64, r"threads wait at two barriers, lines \d+ and \d+"),
    (-1, 48, r"__shfl_down_sync \(line \d+\) in warp 1 waits for lane 16, which has exited or does not exist"),
])
def test_undefined_behaviour_is_an_error_not_a_hang(kernels, schedule, kind, threads, message):
    out = np.zeros(threads, dtype=np.float32)
    if kind == -1:  # a full-mask warp sum in a block of 48 threads: the second warp has only 16 lanes
        with pytest.raises(RuntimeError, match=message):
            launch(kernels, "warp_sum", 1, threads, out, out, 16)
        return
    with pytest.raises(RuntimeError, match=message):
        launch(kernels, "undefined", 1, threads, out, kind)


def test_bad_schedule_and_launch_size_are_errors(kernels, monkeypatch):
    out = np.zeros(64, dtype=np.float32)
    monkeypatch.setenv("CUDA_SIM_SCHEDULE", "greedy")
    with pytest.raises(RuntimeError, match="CUDA_SIM_SCHEDULE: in-order, reversed, shuffled or warp-greedy"):
        launch(kernels, "neighbour_warp", 1, 64, out, out, 1)
    monkeypatch.setenv("CUDA_SIM_SCHEDULE", "shuffled:x")
    with pytest.raises(RuntimeError, match="got shuffled:x"):
        launch(kernels, "neighbour_warp", 1, 64, out, out, 1)
    monkeypatch.delenv("CUDA_SIM_SCHEDULE")
    with pytest.raises(RuntimeError, match="cannot launch 1 x 2048"):
        launch(kernels, "neighbour_warp", 1, 2048, out, out, 1)


def test_trace_prints_one_blocks_timeline_in_schedule_order(kernels, monkeypatch, capfd):
    x = values(2 * 64)
    out = np.zeros_like(x)
    monkeypatch.setenv("CUDA_SIM_TRACE", "1")
    monkeypatch.setenv("CUDA_SIM_SCHEDULE", "in-order")
    launch(kernels, "neighbour_warp", 2, 64, x, out, 1)
    lines = capfd.readouterr().err.splitlines()
    barrier = lines[1].split(" ran to ")[1]
    assert lines == ["block 1: 64 threads, in-order",  # block 0 is not traced
                     f"  warp 0 lanes  0-31 ran to {barrier}", f"  warp 1 lanes  0-31 ran to {barrier}",
                     f"{barrier}: all in, count 64",
                     "  warp 0 lanes  0-31 ran to the end", "  warp 1 lanes  0-31 ran to the end"]
    assert barrier.startswith("barrier (line ")
    monkeypatch.setenv("CUDA_SIM_SCHEDULE", "shuffled:1")  # a thread at a time, at random
    launch(kernels, "neighbour_warp", 2, 64, x, out, 1)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) > 20 and lines[0] == "block 1: 64 threads, shuffled"


# ---------------------------------------------------------------------------------------------------------
# 2. splat_cuda.cu under the simulator.


@pytest.fixture(scope="module")
def sim():
    return splat._load_extension("cuda-sim")  # a failed build fails the tests


def batches(K, seed):
    """K faint Gaussians over one 16 x 16 tile, so every pixel composites hundreds: K = 300 takes two staging
    batches of 256, K = 600 three, in forward and backward."""
    g = splat.random_gaussians(1, K, generator=torch.Generator().manual_seed(seed), dtype=F64, scale_max=2.0)
    g[..., :2] *= 0.3
    g[..., 13] = 0.01
    return g


def scenes():
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    ties = splat.random_gaussians(2, 60, generator=gen(7), dtype=F64)
    ties[..., :3] = torch.tensor([0.1, -0.1, 0.25], dtype=F64)  # 60 Gaussians, one centre, one depth
    ties[..., 3:6] = torch.rand(2, 60, 3, generator=gen(8), dtype=F64) * 0.1
    ties[..., 13] = 0.3
    opaque = splat.random_gaussians(2, 300, generator=gen(9), dtype=F64, scale_max=3.0)
    opaque[..., 13] = 0.99  # saturates: early stop in forward, n_contrib short of the list in backward
    return {
        "K=300, two batches": (batches(300, 1), 16, 16, 1.0),
        "K=600, three batches": (batches(600, 2), 16, 16, 1.0),
        "partial tiles 37 x 23": (splat.random_gaussians(2, 90, generator=gen(3), dtype=F64), 37, 23, 1.0),
        "saturated": (opaque, 24, 20, 1.0),
        "one Gaussian over the image": (gaussians_from([[0.05, -0.1, 0.2]], [10.0], [[0.3, 0.6, 0.9]], [0.8]), 21, 18,
                                        1.0),
        "ties at one depth": (ties, 16, 16, 1.0),
        "background 0.3": (splat.random_gaussians(2, 70, generator=gen(4), dtype=F64), 19, 26, 0.3),
        "B=0": (torch.zeros(0, 5, 14, dtype=F64), 8, 8, 1.0),
        "K=0": (torch.zeros(2, 0, 14, dtype=F64), 9, 7, 0.6),
    }


SCENES = scenes()


def render_and_grad(g, H, W, background, backend, weights):
    g = g.detach().requires_grad_()
    image = splat.render(g, H, W, background=background, backend=backend)
    (image * weights.to(image.dtype)).sum().backward()
    return image.detach().to(F64), g.grad.to(F64)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
@pytest.mark.parametrize("name", SCENES)
def test_cuda_kernel_matches_reference(sim, name, schedule, dtype):
    g, H, W, background = SCENES[name]
    weights = torch.rand(g.shape[0], 3, H, W, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref_image, ref_grad = render_and_grad(g, H, W, background, "torch", weights)
    image, grad = render_and_grad(g.to(dtype), H, W, background, "cuda-sim", weights)
    # The cpu backend's bounds: float32 to 2e-4 absolute in the image and 1e-3 relative in the gradients.
    tol = dict(image=2e-4, grad=1e-3) if dtype == torch.float32 else dict(image=1e-12, grad=1e-10)
    torch.testing.assert_close(image, ref_image, rtol=0, atol=tol["image"])
    scale = max([1.0, *ref_grad.abs().flatten().tolist()])
    torch.testing.assert_close(grad, ref_grad, rtol=tol["grad"], atol=tol["grad"] * scale)
    assert grad.shape == g.shape


def test_scenes_reach_what_they_are_named_for(sim):
    def saved(name):
        g, H, W, background = SCENES[name]
        means2d, conic, depth, rgb, opacity, _ = splat.project(g, H, W)
        inputs = [t.contiguous() for t in (means2d, conic, rgb, opacity)]
        return sim.forward(*inputs, splat.depth_order(depth), H, W, background)

    assert 256 < saved("K=300, two batches")[2].max() <= 300  # n_contrib: entries up to the last contributor
    assert 512 < saved("K=600, three batches")[2].max() <= 600
    _, final_T, n_contrib, offsets, _ = saved("saturated")
    H, W = final_T.shape[1:]
    tiles_x, n_tiles = (W + 15) // 16, ((W + 15) // 16) * ((H + 15) // 16)
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    tile = torch.arange(2)[:, None, None] * n_tiles + (y // 16 * tiles_x + x // 16)  # [B, H, W]
    list_length = (offsets[1:] - offsets[:-1])[tile]
    saturated = final_T < 1e-3  # T would have fallen to 1e-4: the rest of the tile's list was left out
    assert saturated.float().mean() > 0.9
    assert (n_contrib[saturated] < list_length[saturated] - 10).float().mean() > 0.95
    image, *_ = saved("one Gaussian over the image")
    assert (image[0] < 0.999).all()  # every pixel is covered


def test_image_does_not_depend_on_the_schedule_and_gradients_only_on_atomic_order(sim, monkeypatch):
    g, H, W, background = SCENES["K=300, two batches"]
    weights = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0), dtype=F64)
    results = []
    for schedule in SCHEDULES:
        monkeypatch.setenv("CUDA_SIM_SCHEDULE", schedule)
        results.append(render_and_grad(g.float(), H, W, background, "cuda-sim", weights))
    for image, grad in results[1:]:
        assert torch.equal(image, results[0][0])
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["warp-greedy:5", "reversed"], indirect=True)
def test_gradcheck_through_render(sim, schedule):
    g = splat.random_gaussians(1, 12, generator=torch.Generator().manual_seed(10), dtype=F64)
    g = g.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: splat.render(x, 11, 13, background=0.4, backend="cuda-sim"), (g,),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


def test_cuda_sim_is_never_picked_by_auto_and_has_the_cuda_checks(sim):
    assert "cuda-sim" not in splat.available_backends()
    g = splat.random_gaussians(1, 4, generator=torch.Generator().manual_seed(11))
    means2d, conic, depth, rgb, opacity, _ = splat.project(g, 8, 8)
    with pytest.raises(ValueError, match="backend 'cuda-sim' needs cpu tensors, got meta"):
        splat._rasterize_kernel("cuda-sim", *(t.to("meta") for t in (means2d, conic, depth, rgb, opacity)), 8, 8)
    rgb, opacity = rgb.contiguous(), opacity.contiguous()
    with pytest.raises(RuntimeError, match="splat cuda-sim backend: inputs must be contiguous, conic is not"):
        sim.forward(means2d, conic.transpose(0, 1).contiguous().transpose(0, 1).repeat(1, 1, 2)[..., ::2], rgb,
                    opacity, splat.depth_order(depth), 8, 8, 1.0)


def test_walkthrough_names_the_lines_the_trace_prints():
    """docs/walkthrough.md quotes a trace of splat_cuda.cu: each operation and line it names is on that line."""
    with open(os.path.join(ROOT, "docs", "walkthrough.md")) as f:
        text = f.read()
    with open(os.path.join(ROOT, "splat_cuda.cu")) as f:
        source = f.read().splitlines()
    quoted = re.findall(r"(barrier|__shfl_down_sync|__any_sync|warp_add)`?,? \(?line (\d+)[):]", text)
    assert len(quoted) >= 6, quoted
    for op, line in quoted:
        code = source[int(line) - 1]
        want = {"barrier": "__syncthreads", "warp_add": "__shfl_down_sync"}.get(op, op)
        assert want in code, (op, line, code)
