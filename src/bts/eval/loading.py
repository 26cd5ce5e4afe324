"""Load any saved artifact as a ``LanguageModel`` for evaluation.

Hugging Face directories (dense models, static merges) load directly. Other artifacts carry an ``artifact.json``
naming their ``kind``; a loader for each kind is an entry point in the ``bts.artifacts`` group (pyproject.toml),
so the core never imports the package that defines it. A loader takes the directory and returns a model with
``param_counts()`` (the tokenizer is read from the same directory) or the whole ``(model, tokenizer, params)``.
"""

from __future__ import annotations

import inspect
import json
from importlib.metadata import entry_points
from pathlib import Path

from bts.io import BTSError
from bts.params import ParamCounts, count_params


def load_tokenizer_from(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_for_eval(path: str | Path, allow_changed_models: bool = False):
    """Return ``(model, tokenizer, params_dict)`` for an artifact directory.

    ``allow_changed_models`` is passed to loaders that verify the frozen models they build on (a BTS stitch
    checkpoint refuses models whose sha256 changed unless it is set); the loaded model then carries
    ``allow_changed_models`` / ``changed_models``, which the evaluation records (see ``changed_models_entry``).
    """
    from bts.eval.interface import HFLanguageModel
    from bts.modeling import load_causal_lm

    path = Path(path)
    if not path.is_dir():
        raise BTSError(f"no artifact at {path}")
    meta_file = path / "artifact.json"
    if meta_file.is_file():
        kind = json.loads(meta_file.read_text()).get("kind")
        loaders = {ep.name: ep for ep in entry_points(group="bts.artifacts")}
        if kind not in loaders:
            raise BTSError(f"{path}: unknown artifact kind '{kind}' (known: {', '.join(sorted(loaders))})")
        loader = loaders[kind].load()
        if allow_changed_models and "allow_changed_models" in inspect.signature(loader).parameters:
            loaded = loader(path, allow_changed_models=True)
        else:
            loaded = loader(path)
        if isinstance(loaded, tuple):  # a loader may return (model, tokenizer, params) itself
            return loaded
        model = loaded.eval()
        return model, load_tokenizer_from(path), _recorded_params(path) or model.param_counts().to_dict()
    if (path / "config.json").is_file():
        model = load_causal_lm(path).eval()
        n = count_params(model)
        params = _recorded_params(path) or ParamCounts(trained=n, total=n, active=n).to_dict()
        return HFLanguageModel(model).eval(), load_tokenizer_from(path), params
    raise BTSError(f"{path}: neither a Hugging Face directory nor an artifact with artifact.json")


def changed_models_entry(model) -> dict:
    """``{"changed_models": [...]}`` when ``model`` was loaded with the ``allow_changed_models`` override (or its
    frozen models differ from the checkpoint's manifest), else ``{}``: merged into a metrics entry so that results
    obtained with changed frozen models are flagged."""
    changed = list(getattr(model, "changed_models", None) or [])
    if changed or getattr(model, "allow_changed_models", False):
        return {"changed_models": changed}
    return {}


def _recorded_params(path: Path) -> dict | None:
    """Parameter counts recorded at training time (training.json), or by the merge (merge.json)."""
    for name in ("training.json", "merge.json"):
        f = path / name
        if f.is_file():
            params = json.loads(f.read_text()).get("params")
            if params:
                return params
    return None
