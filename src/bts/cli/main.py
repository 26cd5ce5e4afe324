"""The `bts` console script.

`bts fit|validate|test --config configs/...yaml` is a LightningCLI over any LightningModule / LightningDataModule
named by ``class_path`` in the config. The project's own subcommands (`bts reproduce`, `bts eval`, `bts merge`,
...) are typed functions listed in ``bts.cli.commands.COMMANDS``, whose command lines are made from their
signatures the way LightningCLI makes the training one (the pattern: that module's docstring).

Before any of that is imported, ``bts.cli.run_dir`` applies ``--run_dir DIR`` (every path under the config's run root
moved under DIR) and ``bts.cli.config_check`` checks keys, output directories and the accelerator, and points
``validate``/``test`` at the trained model; ``bts --help`` lists the commands from ``COMMANDS`` without importing
them.

Errors the user can fix are printed as ONE line ``error: ...`` on stderr with exit status 2, never a traceback:
``BTSError`` (also when Lightning or jsonargparse raised it from inside a hook or a constructor and it arrives as
the cause/context of another exception), parser errors (unknown config key, bad value: the parser runs with
``exit_on_error=False`` and its multi-line message is condensed, naming the key), and a project command's missing
or unreadable input file. This is the only place that prints them: commands raise.
"""

from __future__ import annotations

import argparse
import os
import sys

from bts.cli.commands import COMMANDS, one_line_help, parser_error_line
from bts.core.io import BTSError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _usage() -> str:
    lines = [
        "usage: bts <command> [options]",
        "",
        "Lightning commands (see `bts fit --help`):",
        "  fit | validate | test | predict   --config configs/<stage>/<profile>.yaml [--run_dir DIR] [--key.path value ...]",
        "",
        "Project commands (each has --help):",
    ]
    for name, command in sorted(COMMANDS.items()):
        lines.append(f"  {name:<15} {one_line_help(command)}")
    return "\n".join(lines)


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


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
            from bts.offline.node import activate

            activate(os.environ["BTS_BUNDLE"])
        if cmd in LIGHTNING_SUBCOMMANDS:
            from bts.cli.config_check import precheck
            from bts.cli.run_dir import apply_run_dir

            argv = apply_run_dir(argv)  # --run_dir DIR: run the path-resolved copy of the config
            argv = precheck(argv)  # before lightning, torch and the model classes are imported
            from bts.cli.lightning import run_lightning

            run_lightning(argv)
            return 0
        if cmd not in COMMANDS:
            print(f"error: unknown command '{cmd}'\n\n{_usage()}", file=sys.stderr)
            return 2
        if COMMANDS[cmd].loads_models:  # they load models anyway: no Lightning tips, no weight-loading bars
            from bts.core.quiet import install

            install(progress="--no-progress" not in argv)
        from bts.cli.commands import run

        return run(cmd, argv[1:])
    except BTSError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except argparse.ArgumentError as e:  # jsonargparse (exit_on_error=False): unknown key, bad value, ...
        print(f"error: {parser_error_line(e.message if hasattr(e, 'message') else e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if cmd in LIGHTNING_SUBCOMMANDS:
            raise
        # a project command's input path that is missing or unreadable: the user's to fix
        print(f"error: {e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else f"error: {e}",
              file=sys.stderr)
        return 2
    except Exception as e:  # a BTSError that Lightning or jsonargparse wrapped in another exception
        cause = find_bts_error(e)
        if cause is None:
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
