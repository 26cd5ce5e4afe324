"""Lightning callback that runs the downstream tasks of the suite on the trained LightningModule at the end of fit.

Per-domain held-out perplexity is already logged by the training module (``val/<domain>/ppl``); this callback
adds the downstream metrics as ``test/<task>`` (and the secondary ones, e.g. ``test/translation_s_bleu``,
plus ``test/avg``; with "switch" among the tasks, the domain-switching perplexity as ``test/switch_ppl/<A>B>``)
through every logger of the trainer, and optionally writes the full ``evaluate`` result to a JSON file
(atomically).

The LightningModule itself is the evaluated ``LanguageModel`` (``forward(input_ids) -> logits`` and
``generate``). The suite runs on global rank 0 only, except under sharded strategies (FSDP, DeepSpeed) where a
forward pass needs every rank: there all ranks run it (same items, same result) and only rank 0 logs and writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L

from bts.core.io import BTSError, atomic_write_json
from bts.eval.suite import DEFAULT_TASKS, EvalConfig, evaluate


class DownstreamEvalCallback(L.Callback):
    def __init__(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        cfg: EvalConfig | None = None,
        tokenizer=None,
        json_path: str | None = None,
        cache_dir: str | None = None,
        seq_len: int = 128,
        progress: bool = False,
        data: dict | None = None,
        all_ranks: bool | None = None,
    ):
        """
        Args:
            tasks: downstream task groups or metric names of ``bts.eval.suite.TASKS`` ("ppl" is ignored: the
                training module logs ``val/<domain>/ppl``); default: the suite's ``DEFAULT_TASKS``, i.e. the
                likelihood and teacher-forced metrics (pass group names such as "math" to add the generation
                metrics of ``GENERATIVE_TASKS``).
            cfg: item counts and settings of the suite.
            tokenizer: a tokenizer object or a directory; default: ``trainer.datamodule.tokenizer``.
            json_path: where to write the ``evaluate`` result (optional).
            cache_dir: data cache directory (``bts.data.load_split``).
            seq_len: training context length (prompt truncation).
            progress: show tqdm bars.
            data: ``{domain: test records}`` instead of the data layer (tests).
            all_ranks: run the suite on every rank; default: only under sharded strategies (FSDP/DeepSpeed).
        """
        super().__init__()
        self.tasks = [t for t in ([tasks] if isinstance(tasks, str) else tasks) if t != "ppl"]
        self.cfg = cfg or EvalConfig()
        self.tokenizer = tokenizer
        self.json_path = json_path
        self.cache_dir = cache_dir
        self.seq_len = seq_len
        self.progress = progress
        self.data = data
        self.all_ranks = all_ranks
        self.result: dict | None = None

    def _tokenizer(self, trainer):
        tok = self.tokenizer
        if tok is None:
            tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tok is None:
            raise BTSError("DownstreamEvalCallback needs a tokenizer (argument or trainer.datamodule.tokenizer)")
        if isinstance(tok, (str, Path)):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
        return tok

    def _sharded(self, trainer) -> bool:
        name = type(trainer.strategy).__name__.lower()
        return "fsdp" in name or "deepspeed" in name

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.tasks:
            return
        run_here = trainer.is_global_zero or (self.all_ranks if self.all_ranks is not None else self._sharded(trainer))
        if not run_here:
            return
        result = evaluate(
            pl_module, self._tokenizer(trainer), tasks=self.tasks, cfg=self.cfg, cache_dir=self.cache_dir,
            seq_len=self.seq_len, progress=self.progress, data=self.data,
        )
        self.result = result
        if not trainer.is_global_zero:
            return
        metrics = {f"test/{k}": float(v) for k, v in result["tasks"].items()}
        metrics.update({f"test/{k}": float(v) for k, v in result["extra"].items()})
        metrics.update({f"test/switch_ppl/{k}": float(v) for k, v in result["switch_ppl"].items()})
        if result["avg"] is not None:
            metrics["test/avg"] = float(result["avg"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        if self.json_path is not None:
            atomic_write_json(self.json_path, result)
