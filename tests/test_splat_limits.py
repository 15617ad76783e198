"""splat.py's guards around the machine: a dense torch-reference render that would not fit is refused in one line
before it allocates anything, and the cuda kernel's build is named by the GPU architectures it is compiled for.

    dense_bytes = B H W K x bytes per element x DENSE_TENSORS (10; 16 when autograd records the render)
    dense_limit = the GPU's free memory + torch's cached but unused memory (CUDA tensors), else DENSE_LIMIT_CPU

No GPU is needed: the CUDA queries are monkeypatched.

Run:  pytest -q tests/test_splat_limits.py
"""
import pytest
import torch
import torch.utils.cpp_extension

import splat

GiB = 2**30


def test_dense_bytes_counts_pairs_bytes_and_the_tensors_kept():
    assert splat.dense_bytes(2, 10, 20, 30, torch.float32, autograd=False) == 2 * 10 * 20 * 30 * 4 * 10
    assert splat.dense_bytes(2, 10, 20, 30, torch.float64, autograd=True) == 2 * 10 * 20 * 30 * 8 * 16


def test_a_dense_render_past_the_limit_is_refused_before_allocating():
    g = splat.random_gaussians(1, 512, torch.Generator().manual_seed(0))
    with pytest.raises(splat.DenseRenderTooLarge) as err:  # 6 M pixels x 512 Gaussians: 114 GiB, never allocated
        splat.render(g, 2000, 3000, backend="torch")
    assert isinstance(err.value, MemoryError)
    assert str(err.value) == (
        "splat: the dense torch reference (backend='torch') would need about 114.4 GiB for 1 image(s) of 2000 x 3000 "
        "px and 512 Gaussians, more than the 8.0 GiB of splat.DENSE_LIMIT_CPU; use the cpu kernel (--splat cpu), "
        "or render fewer pixels or images at once (zeroshot.py --max-size, a smaller --batch-size)")


def test_the_limit_is_exact_and_a_small_explicit_torch_render_is_unaffected(monkeypatch):
    g = splat.random_gaussians(2, 8, torch.Generator().manual_seed(0))
    need = splat.dense_bytes(2, 16, 12, 8, torch.float32, autograd=False)
    monkeypatch.setattr(splat, "DENSE_LIMIT_CPU", need)
    image = splat.render(g, 16, 12, backend="torch")
    assert image.shape == (2, 3, 16, 12)
    monkeypatch.setattr(splat, "DENSE_LIMIT_CPU", need - 1)
    with pytest.raises(splat.DenseRenderTooLarge):
        splat.render(g, 16, 12, backend="torch")
    g.requires_grad_(True)  # autograd keeps more: 16 tensors, not 10
    monkeypatch.setattr(splat, "DENSE_LIMIT_CPU", splat.dense_bytes(2, 16, 12, 8, torch.float32, autograd=True) - 1)
    with pytest.raises(splat.DenseRenderTooLarge):
        splat.render(g, 16, 12, backend="torch")


def test_auto_falling_back_says_why_and_how_to_get_the_kernel(monkeypatch):
    monkeypatch.setattr(splat, "_extensions", {"cpu": RuntimeError("g++: command not found")})
    monkeypatch.setattr(splat, "_warned_fallback", True)  # the one warning was given already
    monkeypatch.setattr(splat, "DENSE_LIMIT_CPU", 1000)
    g = splat.random_gaussians(1, 8, torch.Generator().manual_seed(0))
    with pytest.raises(splat.DenseRenderTooLarge) as err:
        splat.render(g, 16, 16, backend="auto")
    message = str(err.value)
    assert message.startswith("splat: the dense torch reference (backend='auto' fell back to it: g++: command not "
                              "found) would need about 0.0 GiB for 1 image(s) of 16 x 16 px and 8 Gaussians")
    assert "install a C++ compiler with OpenMP (g++) so the cpu kernel builds" in message


def test_on_a_gpu_the_limit_is_its_free_memory_and_the_fix_is_the_cuda_toolkit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: GiB + GiB // 2)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    cuda = torch.device("cuda", 0)
    assert splat.dense_limit(cuda) == 3.5 * GiB
    # the paper's size: 32 images of 224 x 224 px, 512 Gaussians, with autograd: 3 GiB per [B, HW, K] tensor
    with pytest.raises(splat.DenseRenderTooLarge) as err:
        splat.check_dense_render(32, 224, 224, 512, torch.float32, cuda, True, "nvcc not found")
    assert str(err.value) == (
        "splat: the dense torch reference (backend='auto' fell back to it: nvcc not found) would need about 49.0 GiB "
        "for 32 image(s) of 224 x 224 px and 512 Gaussians, more than the 3.5 GiB free on cuda:0; install the CUDA "
        "toolkit 12.4 (torch's CUDA version; nvcc on PATH or CUDA_HOME set) so the cuda kernel builds, or render "
        "fewer pixels or images at once (zeroshot.py --max-size, a smaller --batch-size)")
    splat.check_dense_render(1, 64, 64, 512, torch.float32, cuda, False, None)  # 80 MiB: fits, no error


def test_cuda_build_is_named_by_the_compute_capability(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    assert splat._cuda_arch() == "_sm90"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: [(9, 0), (8, 0), (8, 0)][i])
    assert splat._cuda_arch() == "_sm80_sm90"  # torch builds for every visible GPU
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert splat._cuda_arch() == "_arch_8_0_9_0_ptx"  # ... or for this list when it is set

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: calls.append(kw) or "module")
    monkeypatch.setattr(splat, "_extensions", {})
    assert splat._load_extension("cuda") == "module"
    assert calls[0]["name"] == "splat_cuda_sm86_ext"
