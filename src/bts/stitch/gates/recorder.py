"""Recording the E2H gates while a ``StitchedLM`` runs (``StitchedLM.record_gates()``; paper §4.3)."""

from __future__ import annotations

import torch


class GateRecorder:
    """Per-token gate values of every E2H stitch layer, collected while ``StitchedLM.record_gates()`` is active.

    ``gates[i]`` is ``[B, T, n + 1]`` (mean over hidden dims; model order = ``names``, hub first) for the i-th E2H
    layer, which sits after transformer layer ``after_layers[i]``. Successive forward calls (e.g. cached generation)
    are concatenated along T.
    """

    def __init__(self, names: list[str], after_layers: list[int], stitch_indices: list[int]):
        self.names = list(names)
        self.after_layers = list(after_layers)
        self.stitch_indices = list(stitch_indices)
        self._chunks: list[list[torch.Tensor]] = [[] for _ in stitch_indices]

    def _add(self, stitch_index: int, gates: torch.Tensor) -> None:
        self._chunks[self.stitch_indices.index(stitch_index)].append(gates.detach().float().cpu())

    @property
    def gates(self) -> list[torch.Tensor]:
        return [torch.cat(c, dim=1) if c else torch.empty(0) for c in self._chunks]

    def clear(self) -> None:
        self._chunks = [[] for _ in self.stitch_indices]
