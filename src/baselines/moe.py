"""Shared pieces of the trainable baselines (docs/design.md §2): loading a seed/expert family, parameter averaging,
the routed FFN / attention mixtures used by BTX and BAM, the Switch load-balancing loss, causal masks for
hand-driven decoder loops, and the ``BaselineLM`` base class (LanguageModel interface + parameter counts).

Everything here is architecture-generic over the Hugging Face decoders of docs/design.md §5 (Llama, Qwen2, Mistral):
the MoE blocks wrap the source models' own ``mlp`` / ``self_attn`` modules instead of re-implementing them, so a
mixture of identical experts is the dense model (up to float rounding of weights that sum to one).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from bts.core.io import BTSError
from bts.core.language_model import greedy_or_sample_uncached
from bts.core.params import ParamCounts, count_params
from bts.dense.modeling import decoder_parts, load_causal_lm

ROUTINGS = ("topk", "soft", "gumbel")


# --- families of models ------------------------------------------------------------------------------------------
def load_family(seed: str | Path, experts: Sequence[str | Path]) -> list[PreTrainedModel]:
    """Load ``[seed, *experts]`` (fp32) and check that they share one architecture."""
    if not experts:
        raise BTSError("at least one expert directory is needed (experts: [...])")
    models = [load_causal_lm(seed)] + [load_causal_lm(e) for e in experts]
    check_family(models, names=[str(seed)] + [str(e) for e in experts])
    return models


def check_family(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """All models must have the same class and the same parameter names and shapes (branched from one seed)."""
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    ref = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    for name, m in zip(names[1:], models[1:]):
        if type(m) is not type(models[0]):
            raise BTSError(f"{name} is a {type(m).__name__}, the seed a {type(models[0]).__name__}")
        shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        if shapes != ref:
            diff = sorted(set(shapes.items()) ^ set(ref.items()))[:3]
            raise BTSError(f"{name} does not have the seed's architecture (first differences: {diff})")
    for m in models:
        decoder_parts(m)  # clear error for unsupported layouts


def mean_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uniform mean, accumulated in float64 and cast back to the first tensor's dtype."""
    return torch.stack([t.detach().double() for t in tensors]).mean(0).to(tensors[0].dtype)


def router_weight(num_models: int, hidden_size: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Initial ``[num_models, hidden]`` router matrix: zeros when ``std == 0``, else ``N(0, std^2)`` drawn from
    ``generator`` (seeded by the caller, so router inits are reproducible and independent of the global RNG)."""
    if std < 0:
        raise BTSError(f"router_init_std must be >= 0, got {std}")
    if std == 0:
        return torch.zeros(num_models, hidden_size)
    return torch.randn(num_models, hidden_size, generator=generator) * std


# --- routed FFN ----------------------------------------------------------------------------------------------------
class MoEFFN(nn.Module):
    """A mixture of FFN experts replacing a decoder layer's ``mlp`` (BTX, BAM).

    ``router`` is a bias-free linear map ``d -> E`` of the FFN input (the post-attention-normed hidden state).
    Routings (math identical to transformers' ``MixtralSparseMoeBlock`` where comparable, so exports match):

    - ``topk``: ``p = softmax(logits)`` (float32), keep the ``top_k`` largest, renormalise them to sum to 1,
      output ``sum_k w_k FFN_{e_k}(x)``.
    - ``soft``: every expert, weights ``p / sum(p)`` (= Mixtral with ``top_k = E``).
    - ``gumbel``: top-1. Training: ``y = softmax((logits + g) / temperature)`` with Gumbel noise ``g``, expert
      ``argmax y``, weight ``1 + y_e - stopgrad(y_e)`` (straight-through: value exactly 1, gradient of ``y_e``).
      Only the selected expert is evaluated, so this is the sparse straight-through estimator: the dense one's
      gradient terms through the unselected experts' ``y_j`` (which would need their outputs) are dropped.
      Eval: ``argmax(logits)`` with weight 1 (= Mixtral with ``top_k = 1``). The temperature only shapes the
      gradient.

    Every expert is called on every forward (on an empty batch when no token picked it), so all parameters stay
    in the autograd graph (DDP without ``find_unused_parameters``).
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        hidden_size: int,
        routing: str = "topk",
        top_k: int = 2,
        temperature: float = 1.0,
    ):
        super().__init__()
        if routing not in ROUTINGS:
            raise BTSError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False)
        self.routing = routing
        self.top_k = {"soft": self.num_experts, "gumbel": 1}.get(routing, min(top_k, self.num_experts))
        self.temperature = temperature
        self.last_router_logits: torch.Tensor | None = None
        self.last_top_k_index: torch.Tensor | None = None

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weights [N, k] float32, expert index [N, k])``; for ``soft`` ``(weights [N, E], None)``."""
        probs = torch.softmax(logits.float(), dim=-1)
        if self.routing == "soft":
            return probs / probs.sum(dim=-1, keepdim=True), None
        if self.routing == "gumbel" and self.training:
            gumbel = -torch.empty_like(probs).exponential_().log()
            y = torch.softmax((logits.float() + gumbel) / self.temperature, dim=-1)
            index = y.argmax(dim=-1, keepdim=True)
            y_sel = y.gather(-1, index)
            return y_sel - y_sel.detach() + 1.0, index
        top_v, index = torch.topk(probs, self.top_k, dim=-1)
        return top_v / top_v.sum(dim=-1, keepdim=True), index

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router(x)
        weights, index = self.route(logits)
        self.last_router_logits, self.last_top_k_index = logits, index
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if index is None:
            for e, expert in enumerate(self.experts):
                out = out + expert(x).float() * weights[:, e, None]
        else:
            for e, expert in enumerate(self.experts):
                tok, pos = torch.where(index == e)
                y = expert(x[tok]).float() * weights[tok, pos, None]
                out = out.index_add(0, tok, y)
        return out.to(hidden_states.dtype).reshape(shape)


def switch_load_balancing_loss(
    router_logits: Sequence[torch.Tensor], top_k_index: Sequence[torch.Tensor], num_experts: int
) -> torch.Tensor:
    """Switch-Transformer load balancing (Fedus et al. 2022, eq. 4), averaged over MoE layers:
    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of the ``N * k`` token-to-expert assignments that went to
    expert ``e`` (no gradient) and ``P_e`` the mean router probability of ``e`` over the ``N`` tokens. A perfectly
    balanced router scores 1. (transformers' Mixtral loss instead pools counts over layers before the product and
    uses ``f_e = count / N``, i.e. ``k`` times ours.)"""
    losses = []
    for logits, index in zip(router_logits, top_k_index):
        probs = torch.softmax(logits.float(), dim=-1)
        frac = F.one_hot(index.reshape(-1), num_experts).float().mean(0)
        losses.append(num_experts * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


# --- routed attention ----------------------------------------------------------------------------------------------
class AttentionMixture(nn.Module):
    """Soft mixture of attention experts replacing a decoder layer's ``self_attn`` (BAM, Zhang et al. 2024).

    ``out = sum_m softmax(router(x))_m * attn_m(x)`` where ``x`` is the (input-normed) hidden state the layer hands
    to its attention and ``router`` a bias-free linear map ``d -> M``. Called with the decoder layer's keyword
    arguments; no KV cache (generation re-runs the sequence)."""

    def __init__(self, experts: Sequence[nn.Module], hidden_size: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False)
        self.last_router_logits: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise BTSError(
                "AttentionMixture does not support a KV cache; call the model with use_cache=False"
            )
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None), kwargs.pop("use_cache", None)
        logits = self.router(hidden_states)
        self.last_router_logits = logits
        weights = torch.softmax(logits.float(), dim=-1)
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for m, attn in enumerate(self.experts):
            out = out + attn(hidden_states=hidden_states, **kwargs)[0].float() * weights[..., m, None]
        return out.to(hidden_states.dtype), None


# --- inference models ----------------------------------------------------------------------------------------------
class BaselineLM(nn.Module):
    """Base of the baselines' inference models: ``forward(input_ids) -> logits [B, T, V]``, uncached ``generate``
    (the ``LanguageModel`` interface of ``bts.core.language_model``) and ``param_counts`` (paper Table 2)."""

    def param_counts(self) -> ParamCounts:
        n = count_params(self)
        return ParamCounts(trained=count_params(self, trainable_only=True), total=n, active=n)

    def aux_loss(self) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def generate(
        self, input_ids, max_new_tokens, eos_token_id=None, do_sample=False, temperature=1.0, generator=None
    ):
        return greedy_or_sample_uncached(
            self, input_ids, max_new_tokens, eos_token_id, do_sample, temperature, generator
        )


def clone_module(module: nn.Module) -> nn.Module:
    """An independent copy (fresh parameters) of a submodule."""
    return copy.deepcopy(module)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BTSError(f"cannot read {path}: {e}") from None
