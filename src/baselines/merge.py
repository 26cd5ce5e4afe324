"""Static expert merges: one interface, a registry keyed by config name, and the model-directory driver.

A static merge maps the seed's parameters and the experts' parameters, tensor by tensor, to the parameters
of ONE dense model of the same architecture (docs/design.md §2). Methods implement :class:`MergeMethod`
(``merge_tensor`` on float32 tensors); :func:`merge_models` loads Hugging Face directories, checks that all
models have identical parameter names and shapes, merges in float32 and writes a Hugging Face model
directory atomically with a ``merge.json`` provenance record::

    {"method": "ties", "hyperparameters": {"lambda": ..., "density": ..., ...}, "weights": [...],
     "dtype": "float32",
     "seed": {"path": ..., "state_dict_sha256": ...}, "experts": [{"path": ..., "state_dict_sha256": ...}, ...],
     "output_state_dict_sha256": ..., "params": {"trained": 0, "total": N, "active": N},
     "lambda_selection": null | {"grid": [...], "val_loss": [...], "best_lambda": ..., "criterion": ...}}

The sha256 values are :func:`bts.core.io.state_dict_sha256` of the state dicts as loaded in float32. ``params`` holds
the parameter counts (the key that ``bts.eval.loading`` reads, as in ``training.json``); the merge's own
settings are under ``hyperparameters``.

Registry: ``@register("soup")`` on a class (optionally with default keyword arguments, so one class can be
registered under several configurations, as ``task_arithmetic`` and ``ties`` are);
``get_merge_method(name, **kwargs)`` builds one. The option ``lambda`` (a Python keyword) is accepted as an
alias of the constructor argument ``lam``.

Parameter accounting (paper Table 2): a merge trains nothing and yields one dense model, so
``trained = 0`` and ``total = active =`` the dense model's parameter count (:func:`dense_param_counts`,
:meth:`MergedModel.param_counts`).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from bts.core.io import (
    BTSError,
    atomic_dir,
    atomic_write_json,
    check_output,
    copy_tokenizer_files,
    state_dict_sha256,
)
from bts.core.language_model import HFLanguageModel
from bts.core.params import ParamCounts, count_params
from bts.dense.modeling import load_causal_lm

StateDict = Mapping[str, Tensor]

"""Files copied from the seed directory into a merge output when present."""


# ----------------------------------------------------------------------------------------------------------
# Interface


class MergeMethod(ABC):
    """A static merge of a base (seed) model and fine-tuned models (experts), one tensor at a time."""

    name: str = "merge"
    """Registry name; set by :func:`get_merge_method`."""
    weights_include_base: bool = False
    """True: ``weights`` has one entry per model *including* the base, base first (soup). False: one entry
    per non-base model (task arithmetic, TIES)."""

    def hyperparameters(self) -> dict:
        """Hyperparameters recorded in ``merge.json`` (JSON-serialisable)."""
        return {}

    @abstractmethod
    def merge_tensor(self, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
        """Merge one float32 tensor. ``tensors`` are the non-base models' tensors (same shape as ``base``);
        ``weights`` has already been validated by :meth:`check_weights`."""

    # -- shared machinery ------------------------------------------------------------------------------

    def check_weights(self, weights: Sequence[float] | None, n_models: int) -> list[float]:
        """Validate ``weights`` for ``n_models`` non-base models (default: all 1.0)."""
        n = n_models + 1 if self.weights_include_base else n_models
        if weights is None:
            return [1.0] * n
        try:
            weights = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise BTSError(f"{self.name}: weights must be numbers, got {list(weights)!r}") from None
        if len(weights) != n:
            what = "seed + experts, seed first" if self.weights_include_base else "one per expert"
            raise BTSError(f"{self.name}: expected {n} weights ({what}), got {len(weights)}")
        if not all(math.isfinite(w) for w in weights):
            raise BTSError(f"{self.name}: weights must be finite, got {weights}")
        return weights

    def merge(
        self, base: StateDict, models: Sequence[StateDict], weights: Sequence[float] | None = None
    ) -> dict[str, Tensor]:
        """Merge whole state dicts (identical names and shapes required); floating tensors are merged in
        float32, non-floating tensors (integer buffers) must be equal in all models and are copied."""
        weights = self.check_weights(weights, len(models))
        check_compatible(base, models)
        out: dict[str, Tensor] = {}
        for name, b in base.items():
            ts = [m[name] for m in models]
            if not b.is_floating_point():
                for i, t in enumerate(ts):
                    if not torch.equal(b, t):
                        raise BTSError(f"non-floating tensor {name} differs between seed and model {i + 1}")
                out[name] = b.detach().clone()
                continue
            out[name] = self.merge_tensor(b.detach().float(), [t.detach().float() for t in ts], weights)
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}<{self.name}>({args})"


class ScaledMerge(MergeMethod):
    """A merge of the form ``θ = θ_base + λ · Δ(θ_base, θ_1..θ_n, w)``: Δ is computed once and λ can be
    chosen on validation data (:func:`select_lambda`) without re-merging."""

    lam: float = 1.0

    @abstractmethod
    def delta_tensor(self, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
        """The unscaled merged task vector Δ for one float32 tensor."""

    def merge_tensor(self, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
        return self.apply_tensor(base, self.delta_tensor(base, tensors, weights), self.lam)

    @staticmethod
    def apply_tensor(base: Tensor, delta: Tensor, lam: float) -> Tensor:
        # Same operation order as mergekit (mixed_delta *= lambda; base + mixed_delta).
        return base + delta * lam if lam != 1 else base + delta

    def merge_delta(
        self, base: StateDict, models: Sequence[StateDict], weights: Sequence[float] | None = None
    ) -> dict[str, Tensor]:
        """Δ for every floating tensor (non-floating tensors are absent)."""
        weights = self.check_weights(weights, len(models))
        check_compatible(base, models)
        return {
            name: self.delta_tensor(b.detach().float(), [m[name].detach().float() for m in models], weights)
            for name, b in base.items()
            if b.is_floating_point()
        }

    def apply_delta(self, base: StateDict, delta: Mapping[str, Tensor], lam: float) -> dict[str, Tensor]:
        """``θ_base + λ Δ`` for every tensor (tensors without a Δ are copied from the base)."""
        return {
            name: self.apply_tensor(b.detach().float(), delta[name], lam)
            if name in delta
            else b.detach().clone()
            for name, b in base.items()
        }


# ----------------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, tuple[type[MergeMethod], dict]] = {}
_BUILTIN_MODULES = ("baselines.soup", "baselines.task_arithmetic", "baselines.ties")


def register(name: str, **defaults) -> Callable[[type[MergeMethod]], type[MergeMethod]]:
    """Class decorator: register ``cls`` under ``name``, built with ``defaults`` unless overridden."""

    def deco(cls: type[MergeMethod]) -> type[MergeMethod]:
        if name in _REGISTRY and _REGISTRY[name] != (cls, defaults):
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = (cls, dict(defaults))
        return cls

    return deco


def _load_builtins() -> None:
    import importlib

    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def merge_method_names() -> list[str]:
    """Names of all registered static merge methods."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_merge_method(name: str, **kwargs) -> MergeMethod:
    """Build the merge method registered as ``name``; unknown names and options raise :class:`BTSError`."""
    _load_builtins()
    if name not in _REGISTRY:
        raise BTSError(f"unknown merge method {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    cls, defaults = _REGISTRY[name]
    if "lambda" in kwargs:
        kwargs["lam"] = kwargs.pop("lambda")
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    for key in kwargs:
        if key not in accepted:
            shown = ", ".join("lambda" if p == "lam" else p for p in accepted) or "none"
            raise BTSError(f"merge method {name!r} does not take option {_public(key)!r} (options: {shown})")
    method = cls(**{**defaults, **kwargs})
    method.name = name
    return method


def _public(key: str) -> str:
    return "lambda" if key == "lam" else key


# ----------------------------------------------------------------------------------------------------------
# Checks, λ selection, evaluation helper


def check_compatible(
    base: StateDict, models: Sequence[StateDict], labels: Sequence[str] | None = None
) -> None:
    """Raise :class:`BTSError` naming the first parameter whose name or shape differs from the base's."""
    labels = list(labels) if labels is not None else [f"model {i + 1}" for i in range(len(models))]
    base_keys = sorted(base)
    for label, m in zip(labels, models):
        keys = sorted(m)
        if keys != base_keys:
            missing = sorted(set(base_keys) - set(keys))
            extra = sorted(set(keys) - set(base_keys))
            if missing:
                raise BTSError(f"{label} lacks parameter {missing[0]} that the seed has")
            raise BTSError(f"{label} has parameter {extra[0]} that the seed lacks")
        for k in base_keys:
            if tuple(m[k].shape) != tuple(base[k].shape):
                raise BTSError(
                    f"shape mismatch for {k}: seed {tuple(base[k].shape)} vs {label} {tuple(m[k].shape)}"
                )


def select_lambda(
    grid: Iterable[float], evaluate_fn: Callable[[float], float]
) -> tuple[float, dict[float, float]]:
    """Evaluate every λ of ``grid`` with ``evaluate_fn(λ) -> validation loss`` and return
    ``(best_lambda, {λ: loss})``. Lowest loss wins; equal losses go to the earlier λ in the grid;
    non-finite losses never win (all non-finite → :class:`BTSError`)."""
    grid = [float(x) for x in grid]
    if not grid:
        raise BTSError("lambda grid is empty")
    if len(set(grid)) != len(grid):
        raise BTSError(f"lambda grid has duplicates: {grid}")
    scores: dict[float, float] = {}
    for lam in grid:
        scores[lam] = float(evaluate_fn(lam))
    finite = [lam for lam in grid if math.isfinite(scores[lam])]
    if not finite:
        raise BTSError(f"every lambda in {grid} gave a non-finite validation loss")
    best = min(finite, key=lambda lam: scores[lam])
    return best, scores


@torch.no_grad()
def validation_loss(model: Callable[[Tensor], Tensor], tokens: Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of a ``LanguageModel`` on equal-length rows ``tokens [N, T]``."""
    if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.shape[0] == 0:
        raise BTSError(
            f"validation tokens must be a non-empty [N, T>=2] tensor, got shape {tuple(tokens.shape)}"
        )
    device = _module_device(model)
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        x = tokens[i : i + batch_size].to(device=device, dtype=torch.long)
        logp = torch.log_softmax(model(x).float(), dim=-1)
        nll = -logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
        total += float(nll.double().sum())
        count += nll.numel()
    return total / count


def _module_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# Model directories


def dense_param_counts(model: nn.Module) -> ParamCounts:
    """Merges: nothing trains; the result is one dense model used in full for every token."""
    n = count_params(model)
    return ParamCounts(trained=0, total=n, active=n)


class MergedModel(HFLanguageModel):
    """A merged dense model behind the ``LanguageModel`` interface, with its ``merge.json`` record."""

    def __init__(self, model: nn.Module, info: dict | None = None):
        super().__init__(model)
        self.info = info or {}

    def param_counts(self) -> ParamCounts:
        return dense_param_counts(self.model)


def load_merged(path: str | Path) -> MergedModel:
    """Load a directory written by :func:`merge_models`."""
    import json

    path = Path(path)
    info_path = path / "merge.json"
    if not info_path.is_file():
        raise BTSError(f"not a merge output (no merge.json): {path}")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    return MergedModel(load_causal_lm(path).eval(), info)


def check_model_dirs(dirs: Sequence[Path]) -> None:
    for d in dirs:
        if not Path(d).is_dir():
            raise BTSError(f"model directory not found: {d}")


def check_output_dir(out_dir: Path, inputs: Sequence[Path], marker: str, force: bool = False) -> None:
    """Refuse to write onto an input model, or over a directory that is not a previous output (``marker``) unless
    ``force``: the rule of every command's output (``bts.core.io.check_output``)."""
    check_output(out_dir, "output directory", force=force, earlier=lambda p: (p / marker).is_file(), inputs=inputs)


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    # Clone: the seed model object is reused to hold merged weights, which must not alias the base.
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merge_models(
    method: str | MergeMethod,
    seed_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    weights: Sequence[float] | None = None,
    lambda_grid: Sequence[float] | None = None,
    evaluate: Callable[[HFLanguageModel], float] | None = None,
    force: bool = False,
    **method_kwargs,
) -> dict:
    """Merge the seed and expert HF directories with ``method`` and write a HF directory to ``out_dir``.

    ``method``: a :class:`MergeMethod` or a registry name (then ``method_kwargs`` build it).
    ``lambda_grid`` + ``evaluate`` (``LanguageModel -> validation loss``): pick λ with :func:`select_lambda`
    (only for :class:`ScaledMerge` methods); the chosen λ and all scores go into ``merge.json``.
    Everything is checked before anything is written; the output directory appears atomically, and replaces an
    existing one only when it is an earlier merge output or ``force`` (``check_output_dir``).
    Returns the ``merge.json`` record.
    """
    if isinstance(method, str):
        method = get_merge_method(method, **method_kwargs)
    elif method_kwargs:
        raise TypeError(f"method options {sorted(method_kwargs)} given with a MergeMethod instance")
    seed_dir, out_dir = Path(seed_dir), Path(out_dir)
    expert_dirs = [Path(d) for d in expert_dirs]
    if not expert_dirs:
        raise BTSError("at least one expert directory is required")
    check_model_dirs([seed_dir, *expert_dirs])
    check_output_dir(out_dir, [seed_dir, *expert_dirs], "merge.json", force)
    weights = method.check_weights(weights, len(expert_dirs))
    if lambda_grid is not None:
        if not isinstance(method, ScaledMerge):
            raise BTSError(f"merge method {method.name!r} has no lambda to select")
        if evaluate is None:
            raise BTSError("a lambda grid needs validation data to choose from")

    seed = load_causal_lm(seed_dir).eval()
    base = _state_dict(seed)
    experts = []
    for d in expert_dirs:
        m = load_causal_lm(d)
        experts.append(_state_dict(m))
        del m
    check_compatible(base, experts, labels=[f"expert {d}" for d in expert_dirs])

    selection = None
    if lambda_grid is not None:
        delta = method.merge_delta(base, experts, weights)

        def eval_lambda(lam: float) -> float:
            seed.load_state_dict(method.apply_delta(base, delta, lam), strict=True)
            return evaluate(MergedModel(seed))

        best, scores = select_lambda(lambda_grid, eval_lambda)
        method.lam = best
        merged = method.apply_delta(base, delta, best)
        grid = [float(x) for x in lambda_grid]
        selection = {
            "grid": grid,
            "val_loss": [scores[g] if math.isfinite(scores[g]) else None for g in grid],
            "best_lambda": best,
            "criterion": "lowest validation loss (nats/token); ties go to the earlier lambda",
        }
        del delta
    else:
        merged = method.merge(base, experts, weights)
    seed.load_state_dict(merged, strict=True)

    record = {
        "method": method.name,
        "hyperparameters": method.hyperparameters(),
        "weights": weights,
        "dtype": "float32",
        "seed": {"path": str(seed_dir.resolve()), "state_dict_sha256": state_dict_sha256(base)},
        "experts": [
            {"path": str(d.resolve()), "state_dict_sha256": state_dict_sha256(sd)}
            for d, sd in zip(expert_dirs, experts)
        ],
        "output_state_dict_sha256": state_dict_sha256(merged),
        "params": dense_param_counts(seed).to_dict(),
        "lambda_selection": selection,
    }
    with atomic_dir(out_dir) as tmp:
        seed.save_pretrained(tmp)
        record["tokenizer_files"] = copy_tokenizer_files(seed_dir, tmp)
        atomic_write_json(tmp / "merge.json", record)
    return record
