"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def float64_default():
    """References are float64; restore the global default afterwards (other tests rely on it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available: the cuda variant runs on a GPU host"))])
def device(request):
    """Parametrise a test over devices: always CPU, CUDA when present (skipped cleanly without)."""
    return torch.device(request.param)
