"""TIES-merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708) as a configuration of task arithmetic.

No logic lives here: ``ties`` is :class:`baselines.task_arithmetic.TaskArithmetic` with sign election and
the disjoint (normalised) mean switched on and a default trim density of 0.5 — mergekit 0.1.5's ``ties``
(``consensus_method="sum"``, ``sparsification_method="magnitude"``, ``normalize=True``, ``rescale=False``).
See :mod:`baselines.task_arithmetic` for the conventions and the flag mapping.
"""

from __future__ import annotations

from baselines.merge import register
from baselines.task_arithmetic import TaskArithmetic, elect_sign_mask, trim_magnitude

TIES_DEFAULTS = {"density": 0.5, "sign_election": True, "normalize": True}

register("ties", **TIES_DEFAULTS)(TaskArithmetic)

__all__ = ["TIES_DEFAULTS", "TaskArithmetic", "elect_sign_mask", "trim_magnitude"]
