"""Recording the gates of a trained BTS model: the per-token weight of every model in each Experts-into-Hub (E2H)
stitch layer (paper §4.3, eq. 3), averaged over the hidden dimensions by ``StitchedLM.record_gates()``."""

from __future__ import annotations

import numpy as np
import torch

from bts.core.io import BTSError


def gate_trace(model, input_ids) -> dict:
    """Per-token gate weights of every E2H layer of ``model`` (a ``StitchedLM``) for one sequence.

    ``input_ids``: ``[1, T]`` (or ``[T]``) tensor / list of token ids. Runs in eval mode (no gate dropout) without
    grad and restores the model's train/eval mode. Returns ``{"names": [hub, experts...], "after_layers": [...]
    (1-based layer after which each E2H layer sits), "layers": [np.ndarray [T, n+1] per E2H layer], "last":
    layers[-1]}``; the weights of one token sum to 1 over the models (E2H softmax, averaged over hidden dims).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"gate_trace takes one sequence [1, T], got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise BTSError("gate_trace needs at least one token")
    if not any(kind == "e2h" for _, kind in model.placement()):
        raise BTSError("the model has no Experts-into-Hub stitch layer: there are no gates to trace")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.record_gates() as rec:
            model(ids.to(device))
            gates = rec.gates
            names, after = list(rec.names), list(rec.after_layers)
    finally:
        model.train(was_training)
    layers = [g[0].numpy().astype(np.float64) for g in gates]  # [T, n+1] each
    return {"names": names, "after_layers": after, "layers": layers, "last": layers[-1]}
