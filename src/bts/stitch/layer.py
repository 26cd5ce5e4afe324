"""The BTS stitch layer (paper §2, eq. 3 and eq. 4) — and nothing else.

A stitch layer reads the hidden states of the hub ``h0`` and of the ``n`` experts ``h1..hn`` (all ``[B, T, d]``)
after the same transformer layer and returns ``n + 1`` new hidden states that feed the next layer of each model.

Parameters (all bias-free linear maps), ``(2n + 1) · d²`` in total:

- ``stitch_proj`` ``[n, d, d]``: the ``n`` expert projections ``w_proj_i`` stacked into one tensor, each stored like
  an ``nn.Linear`` weight (``[d_out, d_in]``, ``w_proj_i(x) = x @ W_i^T``), applied as one batched matmul;
- ``stitch_gate`` (``nn.Linear(d, (n + 1)·d, bias=False)``, weight ``[(n + 1)·d, d]``): ``w_gate(h0)`` reshaped to
  ``[B, T, d, n + 1]`` — one gate value per hidden dimension per model, model index last (hub = 0). Row
  ``k·(n + 1) + m`` of the weight is hidden dimension ``k`` of model ``m``; ``gate_rows(m)`` gives model ``m``'s rows.

Initialisation (not given by the paper): ``"identity"`` (default) sets every ``w_proj_i = I`` and ``w_gate = 0``,
i.e. uniform E2H gates and 0.5 H2E gates; ``"random"`` (ablation) draws both from ``N(0, 0.02²)``.

H2E gate init (``h2e_gate_init``, not given by the paper either): ``"half"`` (default) is the above — with
``w_gate = 0`` every H2E gate starts at ``sigmoid(0) = 0.5``, so at init each expert's stream is half the hub's.
``"closed"`` adds to an H2E layer one learned gate-logit bias per hidden dimension per model, ``stitch_gate_bias``
``[(n + 1)·d]`` (same row layout as ``stitch_gate``), initialised to ``CLOSED_GATE_LOGIT = -4``::

    g = sigmoid(dropout(w_gate(h0)) + b)        # eq. 4 with an affine gate; b is outside the dropout

so every H2E gate starts at ``sigmoid(-4) ≈ 0.018`` and the experts' streams start (almost) untouched; ``w_gate``
and ``w_proj_i`` keep the paper's bias-free form and init. The bias sits after the dropout so that a dropped logit
falls back to the closed prior, not to a 0.5 gate. E2H layers never have a bias. ``(n + 1)·d`` extra parameters per
H2E layer (the hub's slot is unused, as ``g0`` is).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bts.core.io import BTSError

StitchKind = Literal["e2h", "h2e"]
STITCH_KINDS = ("e2h", "h2e")
STITCH_INITS = ("identity", "random")
RANDOM_INIT_STD = 0.02
H2E_GATE_INITS = ("half", "closed")
CLOSED_GATE_LOGIT = -4.0
"""Initial H2E gate-logit bias under ``h2e_gate_init="closed"``: ``sigmoid(-4) ≈ 0.018``, below 0.05 with margin,
while ``sigmoid'(-4) ≈ 0.018`` still passes a gradient (AdamW normalises its scale) so gates can open."""


class StitchLayer(nn.Module):
    """One stitch layer over a hub and ``n_experts`` experts of width ``d``.

    ``kind="e2h"`` is Experts-into-Hub (eq. 3), ``kind="h2e"`` is Hub-into-Experts (eq. 4). Gate dropout acts on the
    gate logits ``w_gate(h0)`` and is active only in training mode. With ``record_gates = True`` every forward stores
    the gate values averaged over the hidden dimensions in ``last_gates`` (``[B, T, n + 1]``, detached; for H2E the
    hub slot is the computed-but-unused ``g0``). ``h2e_gate_init="closed"`` gives an H2E layer the gate-logit bias
    ``stitch_gate_bias`` (module docstring); for E2H it changes nothing.
    """

    def __init__(
        self,
        d: int,
        n_experts: int,
        kind: StitchKind = "e2h",
        gate_dropout: float = 0.1,
        init: str = "identity",
        h2e_gate_init: str = "half",
    ):
        super().__init__()
        if kind not in STITCH_KINDS:
            raise BTSError(f"stitch kind must be one of {STITCH_KINDS}, got {kind!r}")
        if n_experts < 1:
            raise BTSError(f"a stitch layer needs at least one expert, got n_experts={n_experts}")
        if not 0.0 <= gate_dropout < 1.0:
            raise BTSError(f"gate_dropout must be in [0, 1), got {gate_dropout}")
        if h2e_gate_init not in H2E_GATE_INITS:
            raise BTSError(f"h2e_gate_init must be one of {', '.join(H2E_GATE_INITS)}, got {h2e_gate_init!r}")
        self.d = int(d)
        self.n_experts = int(n_experts)
        self.kind: StitchKind = kind
        self.stitch_proj = nn.Parameter(torch.empty(n_experts, d, d))  # [n, d_out, d_in]
        self.stitch_gate = nn.Linear(d, (n_experts + 1) * d, bias=False)  # weight [(n+1)·d, d]
        self.h2e_gate_init = h2e_gate_init
        # only a closed H2E layer has the bias: "half" keeps exactly the paper's (and the earlier) parameter set
        self.stitch_gate_bias: nn.Parameter | None = (
            nn.Parameter(torch.empty((n_experts + 1) * d)) if kind == "h2e" and h2e_gate_init == "closed" else None
        )
        self.gate_dropout = nn.Dropout(gate_dropout)
        self.record_gates = False
        self.last_gates: torch.Tensor | None = None
        self.defer_finite_check = False
        """Set by ``StitchedLM``: keep the finiteness flag in ``gates_finite`` (no host sync here) for the model to
        check every stitch layer with a single sync per forward (K syncs per step would stall a GPU)."""
        self.gates_finite: torch.Tensor | None = None
        self.label = f"{kind} stitch layer"
        """Name used in error messages (``StitchedLM`` sets ``stitch layer <j> (after layer <l>, <kind>)``)."""
        self.reset_parameters(init)

    # --- parameters ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, init: str = "identity") -> None:
        """``"identity"``: ``w_proj_i = I``, ``w_gate = 0``; ``"random"``: both ``N(0, 0.02²)``. A closed H2E layer's
        ``stitch_gate_bias`` is ``CLOSED_GATE_LOGIT`` under either."""
        if self.stitch_gate_bias is not None:
            self.stitch_gate_bias.fill_(CLOSED_GATE_LOGIT)
        if init == "identity":
            self.stitch_proj.copy_(torch.eye(self.d).expand(self.n_experts, self.d, self.d))
            self.stitch_gate.weight.zero_()
        elif init == "random":
            self.stitch_proj.normal_(0.0, RANDOM_INIT_STD)
            self.stitch_gate.weight.normal_(0.0, RANDOM_INIT_STD)
        else:
            raise BTSError(f"stitch init must be one of {STITCH_INITS}, got {init!r}")

    def gate_rows(self, model_index: int) -> torch.Tensor:
        """View of the gate weight rows that produce model ``model_index``'s gate (``[d, d_in]``; hub = 0)."""
        return self.stitch_gate.weight.view(self.d, self.n_experts + 1, self.d)[:, model_index, :]

    def extra_repr(self) -> str:
        closed = ", h2e_gate_init=closed" if self.stitch_gate_bias is not None else ""
        return f"kind={self.kind}, d={self.d}, n_experts={self.n_experts}, gate_dropout={self.gate_dropout.p}{closed}"

    # --- forward -------------------------------------------------------------------------------------------------
    def _gate_logits(self, h0: torch.Tensor) -> torch.Tensor:
        b, t, d = h0.shape
        logits = self.gate_dropout(self.stitch_gate(h0))  # [B, T, (n+1)·d]
        if self.stitch_gate_bias is not None:
            logits = logits + self.stitch_gate_bias
        return logits.view(b, t, d, self.n_experts + 1)  # [B, T, d, n+1]

    def _check_gates(self, g: torch.Tensor) -> None:
        """Gate values must be finite (one reduction; a host sync unless ``defer_finite_check``). Skipped while
        ``torch.compile`` traces (a data-dependent branch would break the graph)."""
        if torch.compiler.is_compiling():
            return
        finite = torch.isfinite(g).all()
        if self.defer_finite_check:
            self.gates_finite = finite
        elif not bool(finite):
            raise self.non_finite_error()

    def non_finite_error(self) -> BTSError:
        return BTSError(
            f"{self.label} produced non-finite gate values (nan/inf in the gate input or the gate weights); "
            "lower the learning rate or check the frozen models' hidden states"
        )

    def forward(self, hidden: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """``hidden``: ``n + 1`` tensors ``[B, T, d]``, hub first. Returns ``n + 1`` tensors ``[B, T, d]``, hub first."""
        if len(hidden) != self.n_experts + 1:
            raise ValueError(f"stitch layer expects {self.n_experts + 1} hidden states, got {len(hidden)}")
        in_dtype = hidden[0].dtype
        w_dtype = self.stitch_proj.dtype
        hs = [h.to(w_dtype) for h in hidden]
        out = self._e2h(hs) if self.kind == "e2h" else self._h2e(hs)
        return [h.to(in_dtype) for h in out]

    def _e2h(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Experts-into-Hub, eq. 3::

            g   = softmax_over_models(dropout(w_gate(h0)))      # [B, T, d, n+1]
            h~i = w_proj_i(hi)                                  # i = 1..n
            h~0 = g0 * h0 + sum_i gi * h~i

        Returns ``(h~0, h~1, ..., h~n)``: each expert continues with its projected state (paper §2.3 / App. B).
        """
        h0 = hs[0]
        b, t, d = h0.shape
        n = self.n_experts
        # softmax over the models with the model axis *not* innermost: a softmax (and its backward) over an innermost
        # axis of length n+1 is ~8x slower on CPU, and the einsum it fed ran B·T·d tiny matmuls (benchmarks/)
        g = torch.softmax(self._gate_logits(h0).transpose(-1, -2), dim=-2)  # [B, T, n+1, d] (a view of [.., d, n+1])
        self._check_gates(g)
        experts = torch.stack(hs[1:], dim=0).view(n, b * t, d)  # [n, B·T, d]
        proj = torch.bmm(experts, self.stitch_proj.transpose(1, 2)).view(n, b, t, d)  # [n, B, T, d]
        mixed = g[:, :, 0] * h0 + (g[:, :, 1:] * proj.permute(1, 2, 0, 3)).sum(dim=2)  # [B, T, d]
        if self.record_gates:
            self.last_gates = g.detach().mean(dim=3)  # [B, T, n+1]
        return [mixed, *proj.unbind(0)]

    def _h2e(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Hub-into-Experts, eq. 4::

        g   = sigmoid(dropout(w_gate(h0)) [+ b])            # [B, T, d, n+1]; g0 computed and unused; b: "closed"
        h~0 = h0
        h~i = (1 - gi) * hi + gi * w_proj_i(h0)             # i = 1..n
        """
        h0 = hs[0]
        b, t, d = h0.shape
        n = self.n_experts
        g = torch.sigmoid(self._gate_logits(h0))  # [B, T, d, n+1]
        self._check_gates(g)
        proj = F.linear(h0, self.stitch_proj.reshape(n * d, d)).view(b, t, n, d)  # [B, T, n, d]: w_proj_i(h0)
        experts = torch.stack(hs[1:], dim=2)  # [B, T, n, d]
        gi = g[..., 1:].transpose(2, 3)  # [B, T, n, d]
        mixed = (1 - gi) * experts + gi * proj  # [B, T, n, d]
        if self.record_gates:
            self.last_gates = g.detach().mean(dim=2)  # [B, T, n+1]
        return [h0, *mixed.unbind(2)]


def stitch_param_count(d: int, n_experts: int, gate_bias: bool = False) -> int:
    """Parameters of one stitch layer: ``(2n + 1) · d²``, plus ``(n + 1) · d`` for a closed H2E layer's gate bias."""
    return (2 * n_experts + 1) * d * d + ((n_experts + 1) * d if gate_bias else 0)
