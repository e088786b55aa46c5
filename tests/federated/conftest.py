"""Federated tests train many tiny models: one intra-op thread avoids oversubscribing the shared CPUs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
