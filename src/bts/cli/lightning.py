"""The Lightning commands (`bts fit|validate|test|predict`): a LightningCLI over any LightningModule /
LightningDataModule named by ``class_path`` in the config.

Safety defaults of the Lightning commands (``BTSLightningCLI``): ``--ckpt_path`` is checked before use
(missing, truncated, or holding pickled objects other than tensors → one-line error; see
``bts.core.io.check_lightning_checkpoint``) and loaded with ``weights_only=True`` unless ``--weights_only false`` is
given. The config is saved to the log directory as ``config.yaml`` and never overwritten: a run that resumes
(``--ckpt_path``) into a log directory that already has one saves ``config.resumed-<n>.yaml`` beside it (``bts
reproduce`` re-running a stage: ``config.rerun-<n>.yaml``); any other run into such a directory is refused (use a
fresh ``trainer.default_root_dir`` or a versioned logger). The file is written once every ``setup`` hook passed.

``bts fit`` also never loses a run (docs/reliability.md): SIGTERM/SIGINT save a resumable checkpoint at the next
step boundary and exit 143/130 with the command that resumes (``bts.training.interrupt``); a finished output is
refused without ``--force``, an interrupted run of the same config is resumed, and trainer values Lightning
rejects are one error line (``bts.cli.fit_guard``).
"""

from __future__ import annotations

from pathlib import Path

from bts.core.io import SPECIAL_CKPT_PATHS, BTSError, check_lightning_checkpoint


def _cli_classes():
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class BTSSaveConfigCallback(SaveConfigCallback):
        """Never overwrites ``config.yaml`` (a resumed run saves ``config.resumed-<n>.yaml`` beside it), and writes
        it only once every ``setup`` hook passed, so a run refused during setup leaves no file behind."""

        # label of the extra config file when config.yaml exists; None: "resumed" iff the subcommand got
        # --ckpt_path, else the run is refused (see mark_resuming)
        continues: str | None = None

        def setup(self, trainer, pl_module, stage: str) -> None:
            if self.already_saved or not self.save_to_log_dir:
                return
            log_dir = Path(trainer.log_dir)
            exists = trainer.strategy.broadcast((log_dir / self.config_filename).is_file() if trainer.is_global_zero
                                                else False)
            if exists:
                label = self.continues or ("resumed" if self.config.get("ckpt_path") else None)
                if label is None:
                    raise BTSError(
                        f"{log_dir / self.config_filename} exists: the log directory holds an earlier run; use a fresh "
                        "trainer.default_root_dir (or a versioned logger), or resume that run with --ckpt_path"
                    )
                n = 1
                while (log_dir / f"config.{label}-{n}.yaml").exists():
                    n += 1
                self.config_filename = trainer.strategy.broadcast(f"config.{label}-{n}.yaml")

        def _save(self, trainer, pl_module, stage: str) -> None:
            SaveConfigCallback.setup(self, trainer, pl_module, stage)  # returns at once once saved

        def on_fit_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module, "fit")

        def on_validation_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module, "validate")

        def on_test_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module, "test")

        def on_predict_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module, "predict")

    class BTSLightningCLI(LightningCLI):
        """LightningCLI with the safety defaults described in the module docstring."""

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads the hyperparameters of --ckpt_path right after parsing (torch.load, weights_only):
            # check the file first, so that a missing/truncated/unsafe checkpoint is one clear error line
            sub = self.config.get("subcommand")
            ckpt = self.config[sub].get("ckpt_path") if sub else None
            if ckpt and not (str(ckpt) in SPECIAL_CKPT_PATHS or str(ckpt).startswith("registry:")
                             or "://" in str(ckpt)):
                check_lightning_checkpoint(ckpt)
            super()._parse_ckpt_path()

        def _before_run(self) -> None:
            cfg = self.config_init[self.subcommand]
            if "weights_only" in cfg and cfg["weights_only"] is None:
                cfg["weights_only"] = True

        def instantiate_trainer(self, **kwargs):
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            from bts.cli.fit_guard import trainer_error

            try:
                return super().instantiate_trainer(**kwargs)
            except (MisconfigurationException, ValueError) as e:  # a trainer value Lightning refuses: one line
                raise trainer_error(e) from None

        def before_fit(self) -> None:
            from bts.cli.config_check import check_run_outputs
            from bts.cli.fit_guard import decide_fit

            check_run_outputs(self.trainer, self.model)  # before fit writes anything: never lose a trained run
            self._before_run()
            # an output or checkpoint already there: refuse, resume (same config) or, with --force, start over
            cfg = self.config_init[self.subcommand]
            resume, label = decide_fit(self.trainer, self.model, self.config[self.subcommand].as_dict(),
                                       cfg.get("ckpt_path"))
            if resume:
                cfg["ckpt_path"] = resume
            if label:
                mark_resuming(self.trainer, label)

        def _one_table(self) -> None:
            # Lightning prints metrics logged at epoch end once per dataloader (one per domain): print them once
            cfg = self.config_init[self.subcommand]
            self._print_table = cfg.get("verbose", True) is not False
            cfg["verbose"] = False

        def _print_results(self, stage: str) -> None:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                       if k.startswith(f"{stage}/") and v.numel() == 1}
            if getattr(self, "_print_table", False) and metrics and self.trainer.is_global_zero:
                width = max(len(k) for k in metrics)
                print("\n".join([f"{'metric':<{width}}  value", *(f"{k:<{width}}  {v:.6g}"
                                                                  for k, v in sorted(metrics.items()))]))

        def before_validate(self) -> None:
            self._before_run()
            self._one_table()

        def after_validate(self) -> None:
            self._print_results("val")

        def before_test(self) -> None:
            self._before_run()
            self._one_table()

        def after_test(self) -> None:
            self._print_results("test")

        def before_predict(self) -> None:
            self._before_run()

    return BTSLightningCLI, BTSSaveConfigCallback


def mark_resuming(trainer, label: str = "resumed") -> None:
    """For ``run_lightning(..., run=False)`` followed by ``trainer.fit(...)`` of a run that continues (``"resumed"``)
    or redoes (e.g. ``"rerun"``) the one whose log directory it shares: its config is saved as
    ``config.<label>-<n>.yaml`` beside the existing ``config.yaml`` instead of being refused."""
    for cb in trainer.callbacks:
        if hasattr(cb, "continues") and hasattr(cb, "config_filename"):
            cb.continues = label


def run_lightning(args: list[str], run: bool = True):
    """Run the LightningCLI with ``args`` (e.g. ``["fit", "--config", path]``) in this process."""
    import warnings

    from bts.core.quiet import install, progress_wanted

    install(progress=progress_wanted(args))
    # `bts fit ...` passes its own argv as args=: Lightning's warning about args + sys.argv does not apply
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from bts.training.interrupt import InterruptCheckpoint
    from bts.training.progress import ProgressLog

    cli_class, save_config = _cli_classes()
    try:
        cli = _run_cli(cli_class, save_config, args, run, [ProgressLog(), InterruptCheckpoint()])
    except SIGTERMException as e:
        _report_interrupt(e, args)
    if not run and cli.subcommand is None:  # run=False: the caller fits; check what the fit will write first
        from bts.cli.config_check import check_run_outputs

        check_run_outputs(cli.trainer, cli.model)
    return cli


def _report_interrupt(exc, args: list[str]):
    """An interrupted ``bts fit``: one line on stderr (where the checkpoint is and the command that resumes it),
    then exit 128 + signal (143 SIGTERM, 130 SIGINT) so that a job script or ``bts fit && bts eval`` stops here."""
    import sys

    from bts.cli.fit_guard import resume_command
    from bts.training.interrupt import FitInterrupted

    if isinstance(exc, FitInterrupted):
        print(f"error: bts fit {exc}; resume with: {resume_command(args, exc.checkpoint)}", file=sys.stderr)
        raise SystemExit(exc.code) from None
    # Lightning's own SIGTERM exit (before training started, or during its final validation): not status 0
    print("error: bts interrupted by SIGTERM before a checkpoint could be saved; run the same command again",
          file=sys.stderr)
    raise SystemExit(143) from None


def _run_cli(cli_class, save_config, args, run, callbacks):
    import lightning as L

    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # A sweep needs a fresh log dir per run: the saved config is never overwritten.
        save_config_callback=save_config,
        save_config_kwargs={"overwrite": False},
        auto_configure_optimizers=False,
        # step / loss / tokens/s / ETA lines wherever no progress bar shows them (logs, reproduce stages, jobs)
        # InterruptCheckpoint: SIGTERM/SIGINT save a resumable checkpoint at the next step boundary (nothing lost)
        trainer_defaults={"callbacks": callbacks},
        # parser errors raise (and main prints them as one line) instead of printing the usage and exiting
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=run,
    )
