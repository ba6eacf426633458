"""Where a command runs: one device picker for training and evaluation, and how its process keeps host memory."""
import ctypes
import os

import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK's under torchrun), else Apple's MPS, else the CPU.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here")
    return device


def reuse_freed_host_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next use instead of handing it back to the kernel.

    A training step's largest tensors (K-way logits and their gradients: 100 MB at `bench-cpu`'s sizes) are
    above glibc's mmap threshold (32 MB at most), so each was new memory from the kernel, zeroed and faulted in
    page by page, at every step: 8-23% of a `bench-cpu` step (a linear probe's batches of wide features alike).
    With mmap and trimming off, malloc serves them again from its heap; the process keeps its peak heap until
    it exits. Linux with glibc only (elsewhere nothing changes); returns whether it applied.

    >>> reuse_freed_host_memory()  # doctest: +SKIP
    True
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
    except (AttributeError, ValueError, OSError):  # not Linux, or not glibc (musl)
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameters, malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
