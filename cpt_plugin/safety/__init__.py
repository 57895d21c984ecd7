"""Trainer-level safety: never lose a run.

- ``guard.py``: TrainingGuard (non-finite steps skipped, a diverged run stopped, NaN never saved,
  collapse warned about);
- ``run_lock.py``: one run per output directory (a lock file naming the run that holds it);
- ``resume.py``: incomplete checkpoints skipped on resume, a changed adapter refused before any step;
- ``distributed.py``: one decision shared by all processes;
- ``hooks.py``: the Trainer method wrappers that plug these in (installed by integrations/hf.py).

CPTCallback turns all of it on (``CPTConfig.guard``, ``guard_max_bad_steps``, ``guard_collapse_steps``,
``output_dir_lock``).
"""

from cpt_plugin.safety.guard import TrainingGuard, non_finite_parameter
from cpt_plugin.safety.resume import check_adapter_matches, missing_parts, resolve_resume_checkpoint
from cpt_plugin.safety.run_lock import LOCK_NAME, OutputDirInUseError, hold_output_dir

__all__ = [
    "LOCK_NAME",
    "OutputDirInUseError",
    "TrainingGuard",
    "check_adapter_matches",
    "hold_output_dir",
    "missing_parts",
    "non_finite_parameter",
    "resolve_resume_checkpoint",
]
