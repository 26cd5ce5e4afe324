"""Modularity of a trained BTS model (paper §4.2): remove an expert, or add one and train what is needed.

Every stitch layer holds one projection slice ``stitch_proj[i-1]`` and one block of gate rows (model ``i``'s rows of
``stitch_gate``, see ``StitchLayer.gate_rows``) per expert ``i``, and under ``h2e_gate_init: closed`` an H2E layer
also model ``i``'s entries of ``stitch_gate_bias``. Models are matched **by name** (hub first):

- **remove**: drop the expert's projection slice and gate rows from every stitch layer, keep every other tensor as is.
  Nothing is renormalised by hand: E2H's softmax over the remaining models is recomputed naturally. No retraining.
- **add**: copy the slices of the models that already exist; the new expert gets ``w_proj = I`` and zero gate rows
  (the default identity init), and a closed gate bias (``CLOSED_GATE_LOGIT``) where the layer has one. Train either everything (the old slices as init) or only the new slices
  (``StitchModule(train_only_new=True)``, which uses ``new_slice_masks``).

``bts stitch-remove --ckpt DIR --expert NAME --out DIR`` (``bts.stitch.command``) edits a saved stitch checkpoint directly: it
rewrites the safetensors and the manifest (whose model hashes carry over unchanged) without loading any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bts.core.io import BTSError, atomic_dir, copy_tokenizer_files
from bts.stitch.layer import CLOSED_GATE_LOGIT
from bts.stitch.model import StitchedLM

_PROJ = "stitch_proj"
_GATE = "stitch_gate.weight"
_BIAS = "stitch_gate_bias"  # closed H2E layers only (h2e_gate_init: closed)


def _layer_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes ``stitch_layers.<j>.`` in stitch order."""
    idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("stitch_layers.")})
    prefixes = [f"stitch_layers.{j}." for j in idx]
    for p in prefixes:
        if p + _PROJ not in state or p + _GATE not in state:
            raise BTSError(f"stitch state is missing {p}{_PROJ} or {p}{_GATE}")
    if len(state) != 2 * len(prefixes) + sum(p + _BIAS in state for p in prefixes):
        raise BTSError(f"unexpected tensors in stitch state: {sorted(state)[:5]}")
    return prefixes


def remap_stitch_state(
    state: dict[str, torch.Tensor], src_names: Sequence[str], dst_names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Stitch tensors for the models ``dst_names`` (hub first) from tensors trained for ``src_names``.

    Models present in both keep their projection slice and gate rows; models only in ``dst_names`` get identity
    projections and zero gate rows. Returns ``(state, new_names)``. The hub (first name) must be the same.
    """
    src_names, dst_names = list(src_names), list(dst_names)
    if src_names[0] != dst_names[0]:
        raise BTSError(
            f"the hub differs: stitch weights were trained with hub {src_names[0]!r}, not {dst_names[0]!r}"
        )
    if len(set(dst_names)) != len(dst_names):
        raise BTSError(f"model names must be unique, got {dst_names}")
    n_src, n_dst = len(src_names) - 1, len(dst_names) - 1
    out: dict[str, torch.Tensor] = {}
    for prefix in _layer_keys(state):
        proj, gate = state[prefix + _PROJ], state[prefix + _GATE]
        d = proj.shape[-1]
        if proj.shape != (n_src, d, d) or gate.shape != ((n_src + 1) * d, d):
            raise BTSError(
                f"{prefix}: tensor shapes {tuple(proj.shape)}, {tuple(gate.shape)} do not fit {n_src} experts"
            )
        gate_src = gate.view(d, n_src + 1, d)  # [d_out, model, d_in]
        new_proj = torch.eye(d, dtype=proj.dtype, device=proj.device).repeat(n_dst, 1, 1)  # [n_dst, d, d]
        new_gate = torch.zeros(d, n_dst + 1, d, dtype=gate.dtype, device=gate.device)
        new_gate[:, 0] = gate_src[:, 0]
        for i, name in enumerate(dst_names[1:], start=1):
            if name in src_names[1:]:
                s = src_names.index(name)
                new_proj[i - 1] = proj[s - 1]
                new_gate[:, i] = gate_src[:, s]
        out[prefix + _PROJ] = new_proj
        out[prefix + _GATE] = new_gate.reshape((n_dst + 1) * d, d)
        if prefix + _BIAS in state:
            bias_src = state[prefix + _BIAS].view(d, n_src + 1)  # [d, model], the gate rows' layout
            new_bias = torch.full((d, n_dst + 1), CLOSED_GATE_LOGIT, dtype=bias_src.dtype, device=bias_src.device)
            new_bias[:, 0] = bias_src[:, 0]
            for i, name in enumerate(dst_names[1:], start=1):
                if name in src_names[1:]:
                    new_bias[:, i] = bias_src[:, src_names.index(name)]
            out[prefix + _BIAS] = new_bias.reshape((n_dst + 1) * d)
    return out, [n for n in dst_names[1:] if n not in src_names[1:]]


def remove_expert(model: StitchedLM, name: str) -> StitchedLM:
    """A working ``StitchedLM`` without expert ``name`` (sharing the frozen models), no retraining."""
    if name == model.names[0]:
        raise BTSError(f"{name!r} is the hub; only experts can be removed")
    if name not in model.expert_names:
        raise BTSError(f"no expert named {name!r}; experts are {', '.join(model.expert_names)}")
    if model.n_experts == 1:
        raise BTSError(f"cannot remove {name!r}: it is the only expert")
    keep = [i for i, n in enumerate(model.names) if n != name]
    out = StitchedLM(
        model.models[0],
        [model.models[i] for i in keep[1:]],
        model.config,
        hub_name=model.names[0],
        expert_names=[model.names[i] for i in keep[1:]],
        sources=[model.sources[i] for i in keep],
    )
    state, _ = remap_stitch_state(model.stitch_state_dict(), model.names, out.names)
    out.load_stitch_state_dict(state)
    out.changed_models = [c for c in model.changed_models if c != name]
    out.allow_changed_models = model.allow_changed_models
    return out.train(model.training)


def add_expert(
    model: StitchedLM, expert: nn.Module, name: str, source: str | Path | None = None
) -> StitchedLM:
    """A ``StitchedLM`` with one more expert: old slices copied, the new one at identity / zero gates."""
    if name in model.names:
        raise BTSError(f"a model named {name!r} is already stitched")
    out = StitchedLM(
        model.models[0],
        [*model.experts, expert],
        model.config,
        hub_name=model.names[0],
        expert_names=[*model.expert_names, name],
        sources=[*model.sources, None if source is None else str(source)],
    )
    state, _ = remap_stitch_state(model.stitch_state_dict(), model.names, out.names)
    out.load_stitch_state_dict(state)
    return out.train(model.training)


def new_slice_masks(model: StitchedLM, new_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Boolean masks (True = trainable) over every stitch parameter of ``model`` (keys as in ``named_parameters``,
    e.g. ``stitch_layers.0.stitch_proj``) that select only the slices of the experts ``new_names``."""
    unknown = [n for n in new_names if n not in model.expert_names]
    if unknown:
        raise BTSError(f"unknown expert(s) {unknown}; experts are {model.expert_names}")
    idx = [model.names.index(n) for n in new_names]
    masks = {}
    for j, layer in enumerate(model.stitch_layers):
        d, n = layer.d, layer.n_experts
        proj = torch.zeros(n, d, d, dtype=torch.bool, device=layer.stitch_proj.device)
        gate = torch.zeros(d, n + 1, d, dtype=torch.bool, device=layer.stitch_proj.device)
        for i in idx:
            proj[i - 1] = True
            gate[:, i] = True
        masks[f"stitch_layers.{j}.{_PROJ}"] = proj
        masks[f"stitch_layers.{j}.{_GATE}"] = gate.reshape((n + 1) * d, d)
        if layer.stitch_gate_bias is not None:
            masks[f"stitch_layers.{j}.{_BIAS}"] = gate[:, :, 0].reshape((n + 1) * d)
    return masks


def remove_expert_checkpoint(ckpt_dir: str | Path, name: str, out_dir: str | Path) -> Path:
    """Write a copy of the stitch checkpoint ``ckpt_dir`` without expert ``name`` to ``out_dir`` (atomically)."""
    from bts.stitch.checkpoint import (
        load_stitch_state,
        manifest_config,
        manifest_names,
        read_manifest,
        write_stitch_files,
    )

    manifest = read_manifest(ckpt_dir)
    names = manifest_names(manifest)
    if name == names[0]:
        raise BTSError(f"{name!r} is the hub of {ckpt_dir}; only experts can be removed")
    if name not in names[1:]:
        raise BTSError(f"{ckpt_dir} has no expert named {name!r}; experts are {', '.join(names[1:])}")
    if len(names) == 2:
        raise BTSError(f"cannot remove {name!r}: it is the only expert of {ckpt_dir}")
    state = load_stitch_state(ckpt_dir)
    kept = [n for n in names if n != name]
    new_state, _ = remap_stitch_state(state, names, kept)
    experts = [e for e in manifest["experts"] if e["name"] != name]
    extra = {
        "derived_from": {
            "ckpt": str(ckpt_dir),
            "weights_sha256": manifest["weights_sha256"],
            "removed": name,
        },
    }
    for key in ("trained_with_changed_models",):
        if key in manifest:
            extra[key] = manifest[key]
    with atomic_dir(out_dir) as tmp:
        write_stitch_files(
            tmp,
            new_state,
            manifest["hub"],
            experts,
            manifest_config(manifest),
            manifest["num_layers"],
            manifest["hidden_size"],
            manifest["vocab_size"],
            extra,
        )
        copy_tokenizer_files(ckpt_dir, tmp)
    return Path(out_dir)
