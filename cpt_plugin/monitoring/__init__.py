"""See what a run did: sample completions before and after training, and where the memory went.

Each is a ``TrainerCallback`` that ``CPTCallback`` adds to its trainer (``monitoring_callbacks``), switched
by CPTConfig keys: ``sample_prompts`` / ``sample_max_new_tokens`` (``samples.py``) and ``memory_report``
(``memory_report.py``).
"""

from __future__ import annotations

from transformers import TrainerCallback

from cpt_plugin.config import CPTConfig
from cpt_plugin.monitoring.memory_report import MemoryReportCallback
from cpt_plugin.monitoring.samples import SampleCallback

__all__ = ["MemoryReportCallback", "SampleCallback", "monitoring_callbacks"]


def monitoring_callbacks(config: CPTConfig) -> list[TrainerCallback]:
    """The monitoring callbacks ``config`` switches on, in the order they should run."""
    callbacks: list[TrainerCallback] = []
    if config.sample_prompts:
        callbacks.append(SampleCallback(config.sample_prompts, config.sample_max_new_tokens))
    if config.memory_report:
        callbacks.append(MemoryReportCallback())
    return callbacks
