"""``bts merge``: build a merging baseline from a seed and expert Hugging Face directories.

    bts merge --method ties --seed runs/tiny/seed --experts runs/tiny/expert_code runs/tiny/expert_math \
        --out runs/tiny/ties --density 0.5 --lambda 0.3 0.5 0.7 1.0 --val-tokens runs/tiny/val_tokens.pt
    bts merge --config configs/baselines/ties.yaml [--out other/dir ...]

``--config`` is an omegaconf YAML whose keys are the option names (``method``, ``seed``, ``experts``, ``out``,
``lambda``, ``density``, ``weights``, ``val_tokens``, ``batch_size``); options given on the command line
override it; relative paths are relative to the current directory. ``--method btm`` writes a BTM ensemble
directory (``btm.json``; ``--weights`` is then its prior) instead of merged weights.

``--lambda`` with several values is a grid: each λ is scored by the mean next-token loss on
``--val-tokens`` (a ``.pt`` or ``.npy`` integer array ``[N, T]`` of the validation mix) and the best is kept;
the scores go into ``merge.json``.

User errors print one line ``error: ...`` on stderr and exit 2; the output directory is only ever created
complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bts.core.io import BTSError, CommandParser

OPTIONS = ("method", "seed", "experts", "out", "lambda", "density", "weights", "val_tokens", "batch_size", "device")
DEFAULT_BATCH_SIZE = 8


def _method_names() -> list[str]:
    from baselines.merge import merge_method_names

    return merge_method_names() + ["btm"]


def build_parser() -> argparse.ArgumentParser:
    names = _method_names()
    p = CommandParser(
        prog="bts merge",
        description="Merge a seed and its experts (soup, task arithmetic, TIES) into one Hugging Face model "
        "directory, or write a BTM ensemble directory.",
    )
    p.add_argument("--method", metavar="{" + ",".join(names) + "}", help="merge method")
    p.add_argument("--seed", metavar="DIR", help="seed model (Hugging Face directory)")
    p.add_argument("--experts", metavar="DIR", nargs="+", help="expert model directories")
    p.add_argument("--out", metavar="DIR", help="output directory (written atomically)")
    p.add_argument(
        "--lambda",
        dest="lambda_",
        metavar="L",
        type=float,
        nargs="+",
        help="task vector scale (task_arithmetic, ties); several values = a grid chosen on --val-tokens",
    )
    p.add_argument("--density", type=float, help="fraction of each task vector kept by magnitude (ties)")
    p.add_argument(
        "--weights",
        type=float,
        nargs="+",
        help="per-model weights: soup and btm (prior): seed first then experts; task_arithmetic/ties: one per expert",
    )
    p.add_argument("--val-tokens", metavar="FILE", help=".pt/.npy token ids [N, T] for choosing lambda")
    p.add_argument(
        "--batch-size", type=int, help=f"rows per forward when scoring lambda (default {DEFAULT_BATCH_SIZE})"
    )
    p.add_argument("--device", help="torch device that scores the lambda grid: cpu (default), cuda, or auto")
    p.add_argument("--config", metavar="YAML", help="YAML with the same option names as keys")
    return p


def load_config(path: str | Path) -> dict[str, Any]:
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise BTSError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:  # report the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTSError(f"cannot read config {path}: {first}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise BTSError(f"config {path} must be a mapping of options")
    out = {}
    for key, value in cfg.items():
        k = str(key).replace("-", "_")
        if k not in OPTIONS:
            raise BTSError(f"unknown key {key!r} in config {path} (known: {', '.join(OPTIONS)})")
        out[k] = value
    return out


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = dict.fromkeys(OPTIONS)
    if args.config:
        opts.update(load_config(args.config))
    cli = {
        "method": args.method,
        "seed": args.seed,
        "experts": args.experts,
        "out": args.out,
        "lambda": args.lambda_,
        "density": args.density,
        "weights": args.weights,
        "val_tokens": args.val_tokens,
        "batch_size": args.batch_size,
        "device": args.device,
    }
    opts.update({k: v for k, v in cli.items() if v is not None})
    return _typed(opts)


def _floats(key: str, value, scalar_ok: bool) -> list[float] | None:
    if value is None:
        return None
    if scalar_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise BTSError(
            f"option {key} must be a {'number or ' if scalar_ok else ''}list of numbers, got {value!r}"
        )
    if not value:
        raise BTSError(f"option {key} is empty")
    return [float(v) for v in value]


def _typed(opts: dict[str, Any]) -> dict[str, Any]:
    for key in ("method", "seed", "out", "val_tokens", "device"):
        if opts[key] is not None and not isinstance(opts[key], str):
            raise BTSError(f"option {key} must be a string, got {opts[key]!r}")
    for key in ("method", "seed", "experts", "out"):
        if opts[key] is None or opts[key] == []:
            raise BTSError(f"missing option --{key}")
    if isinstance(opts["experts"], str):
        opts["experts"] = [opts["experts"]]
    if not isinstance(opts["experts"], (list, tuple)) or not all(isinstance(e, str) for e in opts["experts"]):
        raise BTSError(f"option experts must be a list of directories, got {opts['experts']!r}")
    opts["lambda"] = _floats("lambda", opts["lambda"], scalar_ok=True)
    opts["weights"] = _floats("weights", opts["weights"], scalar_ok=False)
    if opts["density"] is not None:
        opts["density"] = _floats("density", opts["density"], scalar_ok=True)
        if len(opts["density"]) != 1:
            raise BTSError("option density takes one number")
        opts["density"] = opts["density"][0]
    bs = opts["batch_size"]
    if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
        raise BTSError(f"option batch_size must be a positive integer, got {bs!r}")
    return opts


def load_val_tokens(path: str | Path):
    import pickle

    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise BTSError(f"validation token file not found: {path}")
    if path.suffix not in (".npy", ".pt"):
        raise BTSError(f"validation tokens must be a .pt or .npy file, got {path}")
    try:
        if path.suffix == ".npy":
            tokens = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            tokens = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, TypeError, pickle.UnpicklingError) as e:
        raise BTSError(f"cannot read validation tokens {path}: {type(e).__name__}: {e}") from None
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.dim() != 2
        or tokens.is_floating_point()
        or tokens.shape[1] < 2
    ):
        raise BTSError(f"validation tokens in {path} must be an integer array [N, T>=2]")
    return tokens.long()


def run(opts: dict[str, Any]) -> str:
    """Do the merge described by resolved options; returns a one-line summary."""
    method = opts["method"]
    names = _method_names()
    if method not in names:
        raise BTSError(f"unknown merge method {method!r} (known: {', '.join(names)})")
    if method == "btm":
        for key in ("lambda", "density", "val_tokens"):
            if opts[key] is not None:
                raise BTSError(f"method btm does not take option {key}")
        from baselines.btm import write_btm_dir

        write_btm_dir(opts["seed"], opts["experts"], opts["out"], prior=opts["weights"])
        return f"wrote BTM ensemble of {1 + len(opts['experts'])} models to {opts['out']}"

    from baselines.merge import ScaledMerge, get_merge_method, merge_models, validation_loss

    kwargs = {}
    if opts["density"] is not None:
        kwargs["density"] = opts["density"]
    grid = opts["lambda"]
    if grid is not None and len(grid) == 1:
        kwargs["lambda"] = grid[0]
        grid = None
    m = get_merge_method(method, **kwargs)
    if grid is not None and not isinstance(m, ScaledMerge):
        raise BTSError(f"merge method {method!r} does not take option 'lambda'")
    evaluate = None
    if grid is not None:
        if opts["val_tokens"] is None:
            raise BTSError("a lambda grid needs --val-tokens to choose from")
        from bts.dense.modeling import resolve_device

        device = resolve_device(opts["device"] or "cpu")
        tokens = load_val_tokens(opts["val_tokens"])
        bs = opts["batch_size"] or DEFAULT_BATCH_SIZE

        def evaluate(lm):
            return validation_loss(lm.to(device), tokens, batch_size=bs)

    elif opts["val_tokens"] is not None:
        raise BTSError("--val-tokens is only used with a lambda grid (several --lambda values)")
    record = merge_models(
        m,
        opts["seed"],
        opts["experts"],
        opts["out"],
        weights=opts["weights"],
        lambda_grid=grid,
        evaluate=evaluate,
    )
    lam = record["hyperparameters"].get("lambda")
    extra = f" (lambda={lam:g})" if lam is not None else ""
    return f"wrote {method} merge of {1 + len(opts['experts'])} models to {opts['out']}{extra}"


def _quietly(fn, *args):
    """Run ``fn`` with transformers' per-file progress bars off (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or an argparse usage error (2, already printed)
            return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
        summary = _quietly(run, resolve_options(args))
    except BTSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
