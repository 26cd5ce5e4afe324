"""The project's commands (``bts reproduce``, ``bts eval``, ``bts merge``, ...): one table, one parser builder.

``COMMANDS`` is the only list of them: name → the function that runs it (a ``"module:function"`` string, resolved
only when that command runs, so ``bts`` never imports ``baselines`` and ``bts --help`` imports no command module:
its one-line help is the function's docstring's first line, read from the source with ``ast``).

The pattern, as LightningCLI does for training
----------------------------------------------
A command is a plain typed function in a module that imports nothing heavy at its top (no torch, lightning or
transformers, so that ``bts <cmd> --help`` and a usage error take a fraction of a second; where a package's modules
are heavy the function sits in the package's ``command`` module, e.g. ``bts/stitch/command.py``)::

    def stitch_remove_command(ckpt: str, expert: str, out: str, force: bool = False) -> int:
        \"\"\"remove an expert from a trained BTS checkpoint (modularity, paper §4.2)

        Args:
            ckpt: trained stitch checkpoint directory (with bts.json)
            ...
        \"\"\"

``build_parser`` makes its command line from the signature (jsonargparse checks the values):

- parameter ``seq_len`` is the option ``--seq-len`` (a trailing ``_`` is dropped: ``lambda_`` is ``--lambda``);
- no default: a required option; a positional-only parameter (before ``/``) is a positional argument;
- ``bool`` defaulting to False: a switch (``--no-progress``);
- ``list[T]``: one or more values, repeatable (``--experts A B``, ``--set a=1 --set b=2``); give it the default
  None and let the function fill in its default (``argparse`` would extend a default list);
- any other annotation (``int``, ``float | None``, ``str``) is the value's type: a bad value is a usage error;
- ``force: bool = False`` always means ``bts.core.io.FORCE_HELP`` (the check is ``bts.core.io.check_output``);
- the docstring: first line the one-line help, ``Args:`` the help of each option, the rest the description.

The function checks every output before the work starts (``bts.core.io.check_output`` / ``check_output_file``),
raises ``BTSError`` for anything the user can fix and prints no error itself (``bts.cli.main`` prints one
``error:`` line, exit 2); it returns the exit status (None is 0).

Adding a command: write the function, add one line to ``COMMANDS``.
"""

from __future__ import annotations

import ast
import inspect
import sys
import typing
from dataclasses import dataclass

from bts.cli.config_check import module_file
from bts.core.io import FORCE_HELP, BTSError


@dataclass(frozen=True)
class Command:
    target: str
    """``"module:function"``: the typed command function."""
    loads_models: bool = True
    """It loads models: Lightning's tips and the weight-loading bars are silenced first (``bts.core.quiet``)."""


COMMANDS: dict[str, Command] = {
    "reproduce": Command("bts.pipeline.command:reproduce_command"),
    "sweep": Command("bts.pipeline.sweep:sweep_command"),
    "eval": Command("bts.eval.command:eval_command"),
    "data": Command("bts.data.command:data_command", loads_models=False),
    "stitch-remove": Command("bts.stitch.command:stitch_remove_command"),
    "merge": Command("baselines.merge_command:merge_command"),
    "gates": Command("bts.stitch.gates.command:gates_command"),
    "compare": Command("bts.pipeline.compare:compare_command", loads_models=False),
    "ceiling": Command("bts.stitch.command:ceiling_command"),
    "import-gguf": Command("bts.dense.gguf_import:import_gguf_command"),
    "bundle": Command("bts.offline.bundle:bundle_command", loads_models=False),
}
"""Every project command (``bts fit|validate|test|predict`` are Lightning's, ``bts.cli.lightning``)."""


def one_line_help(command: Command) -> str:
    """The first line of the command function's docstring, read without importing."""
    module, _, name = command.target.partition(":")
    path = module_file(module)
    if path is None:
        return command.target
    text = path.read_text(encoding="utf-8")
    # parse only the docstring's surroundings: a whole module costs tens of ms, times every command
    start = text.find(f"\ndef {name}(") + 1
    snippet = text[start:text.find("\ndef ", start) if "\ndef " in text[start:] else None] if start else text
    try:
        tree = ast.parse(snippet)
    except SyntaxError:  # the slice ended inside something (a decorator of the next function)
        tree = ast.parse(text)
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    doc = ast.get_docstring(node) if node is not None else None
    if not doc:
        return command.target
    return doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")


def load(command: Command):
    import importlib

    module, _, name = command.target.partition(":")
    return getattr(importlib.import_module(module), name)


def option_name(param: str) -> str:
    return "--" + param.rstrip("_").replace("_", "-")


def _list_item(annotation) -> type | None:
    """``T`` of ``list[T]`` / ``list[T] | None``, else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return args[0] if args else str
    if len(args) == 1 and typing.get_origin(args[0]) is list:
        return _list_item(args[0])
    return None


def build_parser(name: str, fn):
    """The command line of ``bts <name>``, made from ``fn``'s signature and docstring (see the module docstring)."""
    import argparse

    import docstring_parser
    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's (types and defaults shown), the description as written (examples keep their lines)."""

    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    helps = {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}
    description = "\n\n".join(d for d in (doc.short_description, doc.long_description) if d)
    parser = ArgumentParser(prog=f"bts {name}", description=description, exit_on_error=False,
                            formatter_class=Formatter)
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        hint = hints.get(param.name, str)
        # a switch named force is always the one meaning of --force; a list (reproduce's stages) is its own
        help_text = FORCE_HELP if param.name == "force" and hint is bool else helps.get(param.name, "")
        required = param.default is inspect.Parameter.empty
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            parser.add_argument(param.name, type=hint, help=help_text, metavar=param.name.upper(),
                                **({} if required else {"nargs": "?", "default": param.default}))
            continue
        flag = option_name(param.name)
        metavar = flag[2:].upper().replace("-", "_")
        if hint is bool:
            if param.default is not False:
                raise TypeError(f"{fn.__name__}({param.name}): a switch defaults to False (name it no_...)")
            parser.add_argument(flag, dest=param.name, action="store_true", help=help_text)
        elif (item := _list_item(hint)) is not None:
            if param.default not in (None, inspect.Parameter.empty):
                raise TypeError(f"{fn.__name__}({param.name}): a list option defaults to None")
            parser.add_argument(flag, dest=param.name, type=item, nargs="+", action="extend", metavar=metavar,
                                help=help_text, required=required, default=None)
        else:
            parser.add_argument(flag, dest=param.name, type=hint, metavar=metavar, help=help_text,
                                **({"required": True} if required else {"default": param.default}))
    return parser


_PARSER_NOISE = ("Subtypes:", "Errors:", "Given value", "Does not validate against any of the Union subtypes",
                 "- Expected a <class 'NoneType'>")


def parser_error_line(message: str) -> str:
    """jsonargparse's multi-line validation message as one line that still names the offending key."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    kept = [ln.removeprefix("- ") for ln in lines if not ln.startswith(_PARSER_NOISE)]
    return " ".join(kept or lines)


def _usage_error(parser, message: str) -> BTSError:
    """One line naming the command and its options as typed (``--seq-len``, not jsonargparse's ``seq_len``)."""
    line = parser_error_line(message)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            line = line.replace(f'Parser key "{action.dest}"', action.option_strings[0])
    if "arguments are required:" in line:
        head, _, names = line.partition("required:")
        flags = {a.dest: (a.option_strings or [a.metavar or a.dest])[0] for a in parser._actions}
        line = head + "required: " + ", ".join(flags.get(n.strip(), n.strip()) for n in names.split(","))
    return BTSError(f"{parser.prog}: {line}")


def run(name: str, argv: list[str]) -> int:
    """Parse ``argv`` for ``bts <name>`` and run the command; ``--help`` prints the help (nothing else runs)."""
    import argparse

    command = COMMANDS[name]
    fn = load(command)
    parser = build_parser(name, fn)
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help(sys.stdout)
        return 0
    try:
        ns = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise _usage_error(parser, getattr(e, "message", str(e))) from None
    hints = typing.get_type_hints(fn)
    # an absent list option is None here (see build_parser): the function's own default applies
    kwargs = {k: v for k, v in ns.as_dict().items() if v is not None or _list_item(hints.get(k)) is None}
    positional = [kwargs.pop(p.name) for p in inspect.signature(fn).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.name in kwargs]
    return int(fn(*positional, **kwargs) or 0)
