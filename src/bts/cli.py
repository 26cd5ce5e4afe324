"""The `bts` console script.

`bts fit|validate|test --config configs/...yaml` is a LightningCLI over any LightningModule / LightningDataModule
named by ``class_path`` in the config. The project's own subcommands (`bts reproduce`, `bts eval`, `bts merge`,
...) are entry points in the ``bts.commands`` group (see pyproject.toml), so the core package never imports
the baselines package, and each command is a plain ``main(argv) -> int``.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

from bts.io import BTSError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _commands() -> dict:
    return {ep.name: ep for ep in entry_points(group="bts.commands")}


def _usage() -> str:
    lines = [
        "usage: bts <command> [options]",
        "",
        "Lightning commands (see `bts fit --help`):",
        "  fit | validate | test | predict   --config configs/<stage>/<profile>.yaml [--key.path value ...]",
        "",
        "Project commands (each has --help):",
    ]
    for name, ep in sorted(_commands().items()):
        lines.append(f"  {name:<16} {ep.value}")
    return "\n".join(lines)


def run_lightning(args: list[str], run: bool = True):
    """Run the LightningCLI with ``args`` (e.g. ``["fit", "--config", path]``) in this process."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # A sweep needs a fresh log dir per run: the saved config is never overwritten.
        save_config_kwargs={"overwrite": False},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd = argv[0]
    try:
        if cmd in LIGHTNING_SUBCOMMANDS:
            run_lightning(argv)
            return 0
        commands = _commands()
        if cmd not in commands:
            print(f"error: unknown command '{cmd}'\n\n{_usage()}", file=sys.stderr)
            return 2
        return int(commands[cmd].load()(argv[1:]) or 0)
    except BTSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
