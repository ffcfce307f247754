"""Shared test setup.

Without a GPU the Triton kernels are tested through Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when a kernel is defined, so it is set here, before any test module imports mvfast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mvfast  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = mvfast.get_backend()
    yield
    mvfast.set_backend(previous)
