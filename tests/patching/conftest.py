"""Every patching test starts and ends with the transformers modules unpatched."""

import pytest


@pytest.fixture(autouse=True)
def _unpatched():
    from cpt_plugin.patching.registry import unpatch

    unpatch()
    yield
    unpatch()
