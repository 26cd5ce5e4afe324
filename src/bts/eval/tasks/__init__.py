"""The suite's downstream tasks: one family of metrics per module, behind a small registry.

Modules: ``base`` (``TaskInfo``, ``TaskFamily``, ``TaskOutput``, ``register``, the per-run ``Context``),
``scoring`` (log-likelihood multiple choice and teacher-forced span machinery shared by the families),
``perplexity`` (held-out perplexity blocks), and the families ``math``, ``translation``, ``code``, ``general``.

Adding a task touches one file: put its ``TaskInfo`` and computation in an existing family module, or write a
new module here that ends with ``register(TaskFamily(...))``. Every module of this package is imported when the
package is (in name order; families are ordered by ``TaskFamily.order``), so a new module needs no other edit.
New settings go into ``bts.eval.config.EvalConfig``.
"""

from __future__ import annotations

import importlib
import pkgutil

from bts.eval.tasks.base import (
    EXTRA_METRICS,
    FAMILIES,
    SCORINGS,
    TASK_GROUPS,
    TASKS,
    Context,
    TaskFamily,
    TaskInfo,
    TaskOutput,
    family_of,
    make_loader,
    register,
    unregister,
)

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "EXTRA_METRICS", "FAMILIES", "SCORINGS", "TASKS", "TASK_GROUPS", "Context", "TaskFamily", "TaskInfo",
    "TaskOutput", "family_of", "make_loader", "register", "unregister",
]
