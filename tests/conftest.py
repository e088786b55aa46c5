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
