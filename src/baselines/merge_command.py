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

User errors are a ``BTSError`` (``bts`` prints one line ``error: ...``, exit 2); the output directory is only ever
created complete, and replaces an existing one only when that is an earlier merge output or with ``--force``. The
options: ``merge_command``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bts.core.io import BTSError, check_output

OPTIONS = ("method", "seed", "experts", "out", "lambda", "density", "weights", "val_tokens", "batch_size", "device")
DEFAULT_BATCH_SIZE = 8


def _method_names() -> list[str]:
    from baselines.merge import merge_method_names

    return merge_method_names() + ["btm"]


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


def resolve_options(cli: dict[str, Any]) -> dict[str, Any]:
    """The options of ``--config`` overridden by those given on the command line (``cli``: None = not given)."""
    opts: dict[str, Any] = dict.fromkeys(OPTIONS)
    if cli.get("config"):
        opts.update(load_config(cli["config"]))
    opts.update({k: v for k, v in cli.items() if k in OPTIONS and v is not None})
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


def run(opts: dict[str, Any], force: bool = False) -> str:
    """Do the merge described by resolved options; returns a one-line summary. ``force``: see ``merge_command``."""
    method = opts["method"]
    names = _method_names()
    if method not in names:
        raise BTSError(f"unknown merge method {method!r} (known: {', '.join(names)})")
    if method == "btm":
        for key in ("lambda", "density", "val_tokens"):
            if opts[key] is not None:
                raise BTSError(f"method btm does not take option {key}")
        from baselines.btm import write_btm_dir

        write_btm_dir(opts["seed"], opts["experts"], opts["out"], prior=opts["weights"], force=force)
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
        force=force,
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


def is_merge_output(path: Path) -> bool:
    """What ``bts merge`` wrote (a merged model or a BTM directory), which a rerun may replace."""
    return (path / "merge.json").is_file() or (path / "btm.json").is_file()


def merge_command(method: str | None = None, seed: str | None = None, experts: list[str] | None = None,
                  out: str | None = None, lambda_: list[float] | None = None, density: float | None = None,
                  weights: list[float] | None = None, val_tokens: str | None = None, batch_size: int | None = None,
                  device: str | None = None, config: str | None = None, force: bool = False) -> int:
    """build a merging baseline (soup, task arithmetic, TIES, BTM) from seed and expert directories

    Merges a seed and its experts into one Hugging Face model directory, or writes a BTM ensemble directory
    (--method btm). Every option can come from --config (a YAML with the option names as keys); the command line
    overrides it.

    Args:
        method: merge method: soup, task_arithmetic, ties (baselines.merge) or btm
        seed: seed model (Hugging Face directory)
        experts: expert model directories
        out: output directory (written atomically)
        lambda_: task vector scale (task_arithmetic, ties); several values = a grid chosen on --val-tokens
        density: fraction of each task vector kept by magnitude (ties)
        weights: per-model weights: soup and btm (prior): seed first then experts; task_arithmetic/ties: one per
            expert
        val_tokens: .pt/.npy token ids [N, T] for choosing lambda
        batch_size: rows per forward when scoring lambda (default 8)
        device: torch device that scores the lambda grid: cpu (default), cuda, or auto
        config: YAML with the same option names as keys
    """
    opts = resolve_options({"method": method, "seed": seed, "experts": experts, "out": out, "lambda": lambda_,
                            "density": density, "weights": weights, "val_tokens": val_tokens,
                            "batch_size": batch_size, "device": device, "config": config})
    # before any model loads (merge_models and write_btm_dir check again, with the method's own marker)
    check_output(opts["out"], "--out", force=force, earlier=is_merge_output, inputs=[opts["seed"], *opts["experts"]])
    print(_quietly(run, opts, force))
    return 0
