"""Test set-up. TRITON_INTERPRET must be set before anything imports triton (ENVIRONMENT.md trap 1).

On a CPU machine the Triton kernels run through the interpreter; on a GPU machine they run for real
(`import torch` does not import triton, so checking CUDA first is safe).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Tiny matmuls on a shared 2-core machine run far faster on one thread than on two.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu_check.sh on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_isolate():
    """Fresh seed per test; kernels patched into model classes by one test never leak into the next."""
    torch.manual_seed(0)
    yield
    from cpt_plugin.patching.registry import unpatch

    unpatch()
