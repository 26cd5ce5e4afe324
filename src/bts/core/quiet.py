"""Quiet by default: the console carries the run's own lines, progress bars (unless switched off) and errors.

Silenced here, each by its own filter (never all warnings or all logging of a library):

- Lightning's advertising tips (``💡 Tip: ... litlogger / litmodels``), logged at INFO by its rank-zero logger;
- Lightning's ``isinstance(treespec, LeafSpec)`` deprecation warning (Lightning's own use of a torch API; nothing a
  user of this project can change);
- the Hugging Face bars of loading and writing weights (``Loading weights``, ``Writing model shards``): one bar per
  model per stage, even for a model of a few kilobytes (the project reads local files only, so the hub client's
  download bars go with them);
- with ``progress=False`` (``--no-progress``, ``--trainer.enable_progress_bar false``) also the bars of ``datasets``
  and of the hub client.

"Found N module(s) in eval mode at the start of training" is not silenced here: ``bts.training.module.LMTrainingModule`` puts
the trained model in train mode at fit start and silences it only when every module left in eval mode is frozen on
purpose (no trainable parameter).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

TIP_PREFIX = "💡 Tip:"
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def install(progress: bool = True) -> None:
    """Install the filters (idempotent). Nothing heavy is imported: a library not imported yet is configured through
    the environment variable it reads at import (so an error found before the models load stays fast)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:  # transformers takes its bar setting from the hub client's at import
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not progress:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:
            import datasets

            datasets.disable_progress_bars()
        if "huggingface_hub" in sys.modules:
            import huggingface_hub.utils

            huggingface_hub.utils.disable_progress_bars()


def progress_wanted(argv: list[str]) -> bool:
    """False when a Lightning command line switches the progress bar off (``--trainer.enable_progress_bar false``)."""
    for i, tok in enumerate(argv):
        if tok.startswith("--trainer.enable_progress_bar"):
            value = tok.split("=", 1)[1] if "=" in tok else (argv[i + 1] if i + 1 < len(argv) else "true")
            return value.strip().lower() not in ("false", "0", "no")
    return True
