"""One intra-op thread for these tests: the CPU machine is shared, and with 2 threads under load tiny
matmuls spin for tens of milliseconds each (measured ~100x slower)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
