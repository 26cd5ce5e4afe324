"""Load any saved artifact as a ``LanguageModel`` for evaluation.

Hugging Face directories (dense models, static merges) load directly. Other artifacts carry an ``artifact.json``
naming their ``kind``; a loader for each kind is an entry point in the ``bts.artifacts`` group (pyproject.toml),
so the core never imports the package that defines it. A loader takes the directory and returns a model with
``param_counts()`` (the tokenizer is read from the same directory) or the whole ``(model, tokenizer, params)``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from bts.core.artifacts import HF_KIND, artifact_kind, artifact_loaders
from bts.core.params import ParamCounts, count_params
from bts.data.tokenizer import load_tokenizer_from


def load_for_eval(path: str | Path, allow_changed_models: bool = False, tokenizer_dir: str | Path | None = None):
    """Return ``(model, tokenizer, params_dict)`` for an artifact directory (the tokenizer is read from
    ``tokenizer_dir``, default the artifact directory itself).

    ``allow_changed_models`` is passed to loaders that verify the frozen models they build on (a BTS stitch
    checkpoint refuses models whose sha256 changed unless it is set); the loaded model then carries
    ``allow_changed_models`` / ``changed_models``, which the evaluation records (see ``changed_models_entry``).
    """
    from bts.core.language_model import HFLanguageModel
    from bts.dense.modeling import load_causal_lm

    path = Path(path)
    kind = artifact_kind(path)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else path
    if kind != HF_KIND:
        loader = artifact_loaders()[kind].load()
        if allow_changed_models and "allow_changed_models" in inspect.signature(loader).parameters:
            loaded = loader(path, allow_changed_models=True)
        else:
            loaded = loader(path)
        if isinstance(loaded, tuple):  # a loader may return (model, tokenizer, params) itself
            model, tok, params = loaded
            return model, (load_tokenizer_from(tok_dir) if tokenizer_dir is not None else tok), params
        model = loaded.eval()
        return model, load_tokenizer_from(tok_dir), _recorded_params(path) or model.param_counts().to_dict()
    model = load_causal_lm(path).eval()
    n = count_params(model)
    params = _recorded_params(path) or ParamCounts(trained=n, total=n, active=n).to_dict()
    return HFLanguageModel(model).eval(), load_tokenizer_from(tok_dir), params


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
