"""pytest parameters over mvfast's kernel backends."""

import pytest
import torch

from mvfast import _backend

GPU = torch.cuda.is_available()


def kernel_backends() -> list:
    """pytest params ``(backend, device)`` for every kernel backend: those that cannot run here are
    skipped with mvfast's own reason, so a missing build or GPU shows in the test report. Triton runs on
    the GPU when there is one, else through its interpreter on CPU tensors."""
    params = []
    for name, dev in (("cpu", "cpu"), ("triton", "cuda" if GPU else "cpu"), ("cuda", "cuda")):
        if dev == "cuda" and not GPU:
            reason = "no CUDA GPU is visible"
        else:
            st = _backend.backends(dev)[name]
            reason = None if st["available"] else st["reason"]
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param((name, dev), id=name, marks=marks))
    return params
