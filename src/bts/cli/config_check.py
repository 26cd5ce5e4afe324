"""A fast first check of a Lightning command line (``bts fit|validate|test|predict``), before lightning, torch or
the model classes are imported (which takes seconds): unknown keys, a GPU config on a machine without one, and
output directories that cannot be written. Each problem is one ``BTSError`` line; anything this check cannot decide
statically is left to the full parser, which runs next.

Keys are checked against signatures read with ``ast`` from the source files, never imported:
``lightning.pytorch.Trainer.__init__`` for ``trainer.*`` and the ``__init__`` of the ``class_path`` of ``model`` /
``data`` for their ``init_args``, and the fields of a dataclass an init argument is annotated with
(``stitch: StitchConfig``) for nested keys (a class whose ``__init__`` takes ``**kwargs`` other than ``**optimizer: Unpack[OptimizerArgs]``, or that
cannot be found, is left to the full parser). Values (types, ranges) are left to the full parser. The messages are the full parser's own, so a key error reads the same whichever check caught it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

from bts.cli.fit_guard import precheck_fit
from bts.core.io import BTSError, writable_target

TOP_KEYS = {"config", "print_config", "seed_everything", "trainer", "model", "data", "ckpt_path", "weights_only",
            "verbose", "return_predictions", "optimizer", "lr_scheduler"}
GPU_ACCELERATORS = {"gpu", "cuda"}


def parse_command_line(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """``(config paths, [(dotted key, value, as written)])`` of ``argv`` (subcommand first)."""
    configs, overrides = [], []
    i = 1
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            i += 1
            continue
        key, eq, value = tok[2:].partition("=")
        shown = tok
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, shown = argv[i + 1], f"{tok} {argv[i + 1]}"
            i += 1
        if key == "config":
            configs.append(value)
        else:
            overrides.append((key, value, shown))
        i += 1
    return configs, overrides


def module_file(module: str) -> Path | None:
    """The source file of ``module`` found from its top-level package's location (nothing is imported)."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin else None
    for base in spec.submodule_search_locations or []:
        p = Path(base, *rest)
        for cand in (p.with_suffix(".py"), p / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    source = node.module or ""
    if not node.level:
        return source
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{source}" if source else package


@lru_cache(maxsize=64)
def find_class(class_path: str, depth: int = 0) -> tuple[ast.ClassDef, str, ast.Module] | None:
    """``(class node, module, module tree)`` of ``class_path``, following ``from ... import`` re-exports."""
    module, _, name = class_path.rpartition(".")
    path = module_file(module) if module else None
    if path is None or depth > 2:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node, module, tree
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            real = next(a.name for a in node.names if (a.asname or a.name) == name)
            return find_class(f"{_absolute(module, path.name == '__init__.py', node)}.{real}", depth + 1)
    return None


def _init(class_path: str) -> ast.FunctionDef | None:
    found = find_class(class_path)
    if found is None:
        return None
    return next((n for n in found[0].body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)


def init_params(class_path: str) -> frozenset[str] | None:
    """Names ``class_path``'s ``__init__`` accepts, or None when they cannot be read statically (not found, no own
    ``__init__``, ``**kwargs`` other than ``**name: Unpack[SomeTypedDict]``, whose keys count as names)."""
    init = _init(class_path)
    if init is None:
        return None
    args = init.args
    names = frozenset(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs][1:])
    if args.kwarg is None:
        return names
    ann = args.kwarg.annotation
    if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Unpack"):
        return None
    typed_dict = next((cls for _, cls in _classes_annotated(class_path, ann.slice)
                       if any(isinstance(b, ast.Name) and b.id == "TypedDict" for b in cls.bases)), None)
    return None if typed_dict is None else names | _annotated_fields(typed_dict)


def _annotated_fields(cls: ast.ClassDef) -> frozenset[str]:
    return frozenset(n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))


def _classes_annotated(class_path: str, annotation: ast.expr):
    """``(class path, ClassDef)`` of each class named in ``annotation`` (an annotation of ``class_path.__init__``),
    following the module's ``from ... import`` statements."""
    _, module, tree = find_class(class_path)
    names = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        names |= set(re.findall(r"[A-Za-z_]\w*", annotation.value))
    for node in tree.body:
        targets = []
        if isinstance(node, ast.ClassDef) and node.name in names:
            targets = [f"{module}.{node.name}"]
        elif isinstance(node, ast.ImportFrom):
            is_pkg = (module_file(module) or Path()).name == "__init__.py"
            targets = [f"{_absolute(module, is_pkg, node)}.{a.name}" for a in node.names
                       if (a.asname or a.name) in names]
        for target in targets:
            cls = find_class(target)
            if cls:
                yield target, cls[0]


def dataclass_param(class_path: str, param: str) -> tuple[str, frozenset[str]] | None:
    """``(class path, fields)`` of the dataclass that ``param`` of ``class_path.__init__`` is annotated with
    (e.g. ``stitch: StitchConfig | None``), or None."""
    init = _init(class_path)
    arg = next((a for a in (init.args.args + init.args.kwonlyargs) if a.arg == param), None) if init else None
    if arg is None or arg.annotation is None:
        return None
    for target, cls in _classes_annotated(class_path, arg.annotation):
        if any("dataclass" in ast.dump(d) for d in cls.decorator_list):
            return target, _annotated_fields(cls)
    return None


def _load_configs(paths: list[str]) -> dict:
    import yaml

    merged: dict = {}
    for p in paths:
        if not Path(p).is_file():
            return {}  # the full parser names the missing file
        try:
            cfg = yaml.safe_load(Path(p).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            return {}
        if not isinstance(cfg, dict):
            return {}
        for k, v in cfg.items():
            merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _unknown(subcommand: str, key: str) -> BTSError:
    return BTSError(f"Subcommand '{subcommand}' does not accept option '{key}'")


def _class_problem(section: str, class_path: str, key: str) -> BTSError:
    return BTSError(f'Parser key "{section}": Problem with given class_path \'{class_path}\': Option \'{key}\' '
                    "is not accepted")


def check_keys(subcommand: str, cfg: dict, overrides: list[tuple[str, str, str]]) -> None:
    trainer_keys = init_params("lightning.pytorch.trainer.trainer.Trainer")
    for key in cfg:
        if key not in TOP_KEYS and not key.startswith("__"):
            raise _unknown(subcommand, key)
    if trainer_keys and isinstance(cfg.get("trainer"), dict):
        for key in cfg["trainer"]:
            if key not in trainer_keys:
                raise _unknown(subcommand, f"trainer.{key}")
    cli_class = {k.split(".")[0] for k, _, _ in overrides if k in ("model", "data", "model.class_path",
                                                                  "data.class_path")}
    for section in ("model", "data"):
        node = cfg.get(section)
        if section in cli_class or not isinstance(node, dict) or not isinstance(node.get("class_path"), str):
            continue
        params = init_params(node["class_path"])
        if params is None:
            continue
        init_args = node.get("init_args") or {}
        for key in init_args:
            if key not in params:
                raise _class_problem(section, node["class_path"], key)
        nested = [(k, list(v)) for k, v in init_args.items() if isinstance(v, dict)]
        for key, _, _ in overrides:
            parts = key.split(".")
            if len(parts) >= 3 and parts[0] == section and parts[1] == "init_args" and parts[2] not in params:
                raise _class_problem(section, node["class_path"], parts[2])
            if len(parts) == 4 and parts[0] == section and parts[1] == "init_args":
                nested.append((parts[2], [parts[3]]))
        for param, keys in nested:
            found = dataclass_param(node["class_path"], param)
            bad = [k for k in keys if found and k not in found[1]]
            if bad:
                raise BTSError(f'Parser key "{section}": Problem with given class_path \'{node["class_path"]}\': Parser '
                               f'key "{param}": Problem with given class_path \'{found[0]}\': Option \'{bad[0]}\' is '
                               "not accepted")
    for key, _, shown in overrides:
        parts = key.split(".")
        if parts[0] not in TOP_KEYS:
            raise BTSError(f"unrecognized arguments: {shown}")
        if parts[0] == "trainer" and len(parts) == 2 and trainer_keys and parts[1] not in trainer_keys:
            raise BTSError(f"unrecognized arguments: {shown}")


def _value(cfg: dict, overrides: list[tuple[str, str, str]], dotted: str):
    for key, value, _ in reversed(overrides):
        if key == dotted:
            return value
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def check_accelerator(accelerator, setting: str, instead: str) -> None:
    """The one check of a GPU accelerator on a machine without CUDA, before anything runs (a Lightning config here,
    a reproduction profile in ``bts.pipeline.command``): ``setting`` names where the accelerator
    was asked for, ``instead`` what to run instead. torch is imported only when a GPU is asked for."""
    accel = str(accelerator or "").lower()
    if accel not in GPU_ACCELERATORS:
        return
    import torch

    if not torch.cuda.is_available():
        raise BTSError(f"{setting} is '{accel}' but this machine has no CUDA device; {instead}")


def output_paths(cfg: dict, overrides: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """``[(what, path)]``: the directories a run writes (log, logger, checkpoint and artifact directories)."""
    out = []
    for dotted in ("trainer.default_root_dir", "trainer.logger.init_args.save_dir", "model.init_args.output_dir"):
        v = _value(cfg, overrides, dotted)
        if isinstance(v, str) and v and "://" not in v:
            out.append((dotted, v))
    callbacks = (cfg.get("trainer") or {}).get("callbacks") if isinstance(cfg.get("trainer"), dict) else None
    for cb in callbacks if isinstance(callbacks, list) else []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            d = (cb.get("init_args") or {}).get("dirpath")
            if isinstance(d, str) and d:
                out.append(("ModelCheckpoint dirpath", d))
    return out


def check_run_outputs(trainer, model=None) -> None:
    """The same writability check on an instantiated run (``bts reproduce`` and ``bts sweep`` build their runs in
    process): log, logger, checkpoint and artifact directories, before ``fit`` creates or writes any of them."""
    targets = [("trainer.default_root_dir", trainer.default_root_dir)]
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            targets.append(("logger save_dir", save_dir))
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None):
            targets.append(("ModelCheckpoint dirpath", cb.dirpath))
    if getattr(model, "output_dir", None):
        targets.append(("model.init_args.output_dir", model.output_dir))
    for what, path in targets:
        if isinstance(path, (str, os.PathLike)) and "://" not in str(path):
            writable_target(path, what)


EVALUATE_FROM = {"bts.dense.module.CausalLMModule": ("init_from", "config.json"),
                 "bts.stitch.module.StitchModule": ("init_stitch_from", "bts.json")}
"""Module class → (init argument that loads a trained artifact, file that marks one)."""


def trained_target(argv: list[str], cfg: dict, overrides: list[tuple[str, str, str]]) -> list[str]:
    """``bts validate|test`` of a stage config evaluates what the stage trained: without ``--ckpt_path`` or an explicit
    ``init_from`` / ``init_stitch_from``, the trained artifact in ``output_dir`` is loaded (a note says so on stderr);
    when it does not exist yet the run is refused, with what to pass. (Otherwise an expert config would evaluate its
    starting point, the seed, and a seed or BTS config an untrained model.)"""
    if argv[0] not in ("validate", "test") or _value(cfg, overrides, "ckpt_path"):
        return argv
    class_path = _value(cfg, overrides, "model.class_path")
    if class_path not in EVALUATE_FROM:
        return argv
    key, marker = EVALUATE_FROM[class_path]
    if any(k == f"model.init_args.{key}" for k, _, _ in overrides):
        return argv
    out = _value(cfg, overrides, "model.init_args.output_dir")
    if isinstance(out, str) and (Path(out) / marker).is_file():
        import sys

        print(f"bts {argv[0]}: evaluating the trained model {out} (model.init_args.output_dir)", file=sys.stderr)
        return [*argv, f"--model.init_args.{key}={out}"]
    start = _value(cfg, overrides, "model.init_args.init_from")
    what = (f"its starting point {start} (model.init_args.init_from)" if key == "init_from" and start
            else "an untrained model")
    raise BTSError(f"bts {argv[0]} of this config would evaluate {what}, and the trained model "
                   f"{out or '(no model.init_args.output_dir)'} does not exist; train it first, or pass --ckpt_path "
                   f"<Lightning checkpoint> or --model.init_args.{key} <trained model directory>")


def precheck(argv: list[str]) -> list[str]:
    """Check a Lightning command line (``argv[0]`` is the subcommand) before anything heavy is imported; returns it,
    for ``validate``/``test``, pointed at the trained model (``trained_target``)."""
    if any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
        return argv
    configs, overrides = parse_command_line(argv)
    cfg = _load_configs(configs)
    # --force (bts fit), a finished model in output_dir, trainer values Lightning rejects: bts.cli.fit_guard
    argv = precheck_fit(argv, lambda dotted: _value(cfg, overrides, dotted))
    overrides = [o for o in overrides if o[0] != "force"]
    check_keys(argv[0], cfg, overrides)
    if argv[0] == "fit":
        for what, path in output_paths(cfg, overrides):
            writable_target(path, what)
    check_accelerator(_value(cfg, overrides, "trainer.accelerator"), "trainer.accelerator",
                      "to run this config on the CPU pass --trainer.accelerator cpu --trainer.devices 1 (and "
                      "--trainer.precision 32-true if it sets a mixed precision)")
    return trained_target(argv, cfg, overrides)
