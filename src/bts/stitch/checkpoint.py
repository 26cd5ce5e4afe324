"""Saving and loading trained stitch layers.

A stitch checkpoint directory holds only what BTS trains, plus a manifest that pins the frozen models:

- ``stitch.safetensors``: the stitch tensors (``stitch_layers.<j>.stitch_proj`` ``[n, d, d]`` and
  ``stitch_layers.<j>.stitch_gate.weight`` ``[(n+1)·d, d]``; with ``h2e_gate_init: closed`` also each H2E layer's
  ``stitch_layers.<j>.stitch_gate_bias`` ``[(n+1)·d]``) and nothing else;
- ``bts.json``: format/version, the hub and the experts (name — the experts' names are their domains —, role,
  directory as given and resolved, ``sha256`` = ``state_dict_sha256`` of the loaded model), the ``StitchConfig``,
  the placement, the dimensions, the sha256 of ``stitch.safetensors`` and optional provenance (``derived_from``).

Loading re-hashes every frozen model and refuses (``BTSError`` naming the model) when one changed since the stitch
layers were trained; ``allow_changed_models=True`` overrides this and is recorded on the returned model
(``model.allow_changed_models`` / ``model.changed_models``) so that reports can flag it. Writes are atomic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bts.core.io import BTSError, atomic_dir, sha256_file, state_dict_sha256
from bts.stitch.layer import stitch_param_count
from bts.stitch.model import StitchConfig, StitchedLM, stitch_placement

MANIFEST = "bts.json"
WEIGHTS = "stitch.safetensors"
FORMAT = "bts-stitch"
VERSION = 1


def model_sha256(model: nn.Module) -> str:
    """Identity of a frozen model: ``state_dict_sha256`` of its state dict."""
    return state_dict_sha256(model.state_dict())


def _entry(name: str, role: str, path: str | None, sha: str) -> dict:
    entry = {"name": name, "role": role, "path": path, "resolved_path": None, "sha256": sha}
    if path is not None:
        entry["resolved_path"] = str(Path(path).resolve())
    if role == "expert":
        entry["domain"] = name
    return entry


def build_manifest(
    hub: dict,
    experts: list[dict],
    config: StitchConfig,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    weights_sha256: str,
    extra: dict | None = None,
) -> dict:
    """The ``bts.json`` content (shared by ``save_stitched`` and checkpoint-level edits such as expert removal)."""
    placement = stitch_placement(num_layers, config)
    n = len(experts)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "hub": hub,
        "experts": experts,
        "stitch_config": config.to_dict(),
        "placement": [{"after_layer": a, "kind": k} for a, k in placement],
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "n_experts": n,
        "stitch_params": sum(stitch_param_count(hidden_size, n, kind == "h2e" and config.h2e_gate_init == "closed")
                             for _, kind in placement),
        "weights": WEIGHTS,
        "weights_sha256": weights_sha256,
    }
    if extra:
        manifest.update(extra)
    return manifest


def write_stitch_files(
    out_dir: Path,
    state: dict[str, torch.Tensor],
    hub: dict,
    experts: list[dict],
    config: StitchConfig,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    extra: dict | None = None,
) -> None:
    """Write ``stitch.safetensors`` + ``bts.json`` into an existing (temporary) directory."""
    out_dir = Path(out_dir)
    bad = [k for k in state if not k.startswith("stitch_layers.") or ".stitch_" not in k]
    if bad:
        raise BTSError(f"refusing to save non-stitch tensors: {bad[:3]}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS))
    manifest = build_manifest(
        hub, experts, config, num_layers, hidden_size, vocab_size, sha256_file(out_dir / WEIGHTS), extra
    )
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    # bts.eval.loading finds the loader of this artifact by kind (entry point group bts.artifacts).
    (out_dir / "artifact.json").write_text(json.dumps({"kind": "bts"}) + "\n", encoding="utf-8")


def write_stitched(model: StitchedLM, out_dir: str | Path, extra: dict | None = None) -> None:
    """Write ``model``'s stitch checkpoint into an existing directory (e.g. the training's atomic temp dir)."""
    shas = model.frozen_sha256 or [model_sha256(m) for m in model.models]
    entries = [
        _entry(name, "hub" if i == 0 else "expert", src, sha)
        for i, (name, src, sha) in enumerate(zip(model.names, model.sources, shas))
    ]
    extra = dict(extra or {})
    if model.changed_models:
        extra["trained_with_changed_models"] = list(model.changed_models)
    if model.allow_changed_models:
        extra["allow_changed_models"] = True
    write_stitch_files(
        Path(out_dir),
        model.stitch_state_dict(),
        entries[0],
        entries[1:],
        model.config,
        model.num_layers,
        model.hidden_size,
        model.vocab_size,
        extra,
    )


def save_stitched(model: StitchedLM, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Save ``model``'s stitch checkpoint to ``out_dir`` atomically (the directory is replaced as a whole)."""
    with atomic_dir(out_dir) as tmp:
        write_stitched(model, tmp, extra)
    return Path(out_dir)


def read_manifest(ckpt_dir: str | Path) -> dict:
    """Read and check ``bts.json``."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise BTSError(f"not a BTS stitch checkpoint (no {MANIFEST}): {ckpt_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BTSError(f"cannot read {path}: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BTSError(
            f"{path}: unsupported checkpoint format {manifest.get('format')!r} v{manifest.get('version')!r} "
            f"(expected {FORMAT!r} v{VERSION})"
        )
    return manifest


def manifest_config(manifest: dict) -> StitchConfig:
    try:
        return StitchConfig(**manifest["stitch_config"])
    except TypeError as e:
        raise BTSError(f"bad stitch_config in manifest: {e}") from None


def manifest_names(manifest: dict) -> list[str]:
    """Model names, hub first."""
    return [manifest["hub"]["name"], *[e["name"] for e in manifest["experts"]]]


def load_stitch_state(
    ckpt_dir: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The stitch tensors of a checkpoint, after checking the file against the manifest's sha256."""
    manifest = read_manifest(ckpt_dir)
    path = Path(ckpt_dir) / manifest.get("weights", WEIGHTS)
    if not path.is_file():
        raise BTSError(f"stitch checkpoint {ckpt_dir} has no {path.name}")
    if sha256_file(path) != manifest.get("weights_sha256"):
        raise BTSError(f"{path} does not match the sha256 recorded in {MANIFEST} (corrupted or edited)")
    return load_file(str(path), device=str(map_location))


def _model_dir(entry: dict) -> Path:
    for key in ("path", "resolved_path"):
        if entry.get(key) and (Path(entry[key]) / "config.json").is_file():
            return Path(entry[key])
    raise BTSError(
        f"model {entry['name']!r} of the stitch checkpoint is not found at {entry.get('path')!r} "
        f"(resolved {entry.get('resolved_path')!r}); pass model_dirs= to point at it"
    )


def check_models(
    manifest: dict, models: Sequence[nn.Module], allow_changed_models: bool, ckpt_dir: str | Path = "?"
) -> list[str]:
    """Names of the models whose weights differ from the manifest; raises unless ``allow_changed_models``."""
    entries = [manifest["hub"], *manifest["experts"]]
    changed = []
    for entry, model in zip(entries, models):
        if model_sha256(model) != entry["sha256"]:
            changed.append(entry["name"])
    if changed and not allow_changed_models:
        raise BTSError(
            f"stitch checkpoint {ckpt_dir}: the weights of model(s) {', '.join(repr(c) for c in changed)} changed "
            "since the stitch layers were trained (sha256 mismatch); pass allow_changed_models=True "
            "(--allow-changed-models) to use them anyway"
        )
    return changed


def load_stitched(
    ckpt_dir: str | Path,
    *,
    allow_changed_models: bool = False,
    models: Sequence[nn.Module] | None = None,
    model_dirs: Sequence[str | Path] | None = None,
    dtype: torch.dtype = torch.float32,
) -> StitchedLM:
    """Rebuild the ``StitchedLM`` of a stitch checkpoint.

    The frozen models are loaded from the recorded directories, from ``model_dirs`` (hub first) or taken from
    ``models`` (already loaded, hub first); every one is checked against the manifest's sha256.
    """
    from bts.dense.modeling import load_causal_lm

    manifest = read_manifest(ckpt_dir)
    entries = [manifest["hub"], *manifest["experts"]]
    names = manifest_names(manifest)
    if models is not None and model_dirs is not None:
        raise BTSError("pass models= or model_dirs=, not both")
    if models is not None:
        models = list(models)
        sources = [e.get("path") for e in entries]
    else:
        dirs = [Path(d) for d in model_dirs] if model_dirs is not None else [_model_dir(e) for e in entries]
        if len(dirs) != len(entries):
            raise BTSError(f"checkpoint has {len(entries)} models but {len(dirs)} model_dirs were given")
        models = [load_causal_lm(d, dtype=dtype) for d in dirs]
        sources = [str(d) for d in dirs]
    if len(models) != len(entries):
        raise BTSError(f"checkpoint has {len(entries)} models (hub + experts) but {len(models)} were given")
    changed = check_models(manifest, models, allow_changed_models, ckpt_dir)
    config = manifest_config(manifest)
    model = StitchedLM(
        models[0], models[1:], config, hub_name=names[0], expert_names=names[1:], sources=sources
    )
    recorded = [(p["after_layer"], p["kind"]) for p in manifest["placement"]]
    if recorded != model.placement():
        raise BTSError(
            f"{ckpt_dir}: recorded placement {recorded} differs from the computed {model.placement()}"
        )
    model.load_stitch_state_dict(load_stitch_state(ckpt_dir))
    model.allow_changed_models = bool(allow_changed_models)
    model.changed_models = changed
    return model
