"""``StitchedLM``: a hub and ``n`` frozen experts joined by trainable stitch layers (BTS, paper §2).

Every model runs its own embedding, rotary embedding, attention masks and KV cache (they may differ per config,
e.g. Qwen2 sliding-window layers); after the layers given by ``stitch_placement`` stitch layer ``j`` mixes the
hidden states of all models, and the output is the **hub's** final norm + LM head. Only stitch parameters train:
every frozen model has ``requires_grad = False`` and stays in eval mode even when the ``StitchedLM`` is in train
mode, so the only dropout that is ever active is the stitch gate dropout.

Placement (``stitch_placement``): ``K`` stitch layers over ``L`` transformer layers (``1 <= K <= L``); stitch ``j``
(0-based) sits after layer ``round_half_up((j + 1)·L / K)`` (1-based layer count), i.e. ``floor((2(j+1)L + K) /
(2K))`` in integers. The positions are strictly increasing (consecutive targets are ``L/K >= 1`` apart) and the
**last one is always after the final layer L** (``j = K - 1`` gives exactly ``L``), whether or not ``K`` divides
``L``: L=8, K=4 → after 2, 4, 6, 8; L=20, K=4 → 5, 10, 15, 20 (the paper's); L=10, K=4 → 3, 5, 8, 10; L=28, K=10 →
3, 6, 8, 11, 14, 17, 20, 22, 25, 28. The types alternate and the **last one is always E2H** (K=4: H2E, E2H, H2E,
E2H; K=1: one E2H after layer L); ``all_e2h`` makes every stitch E2H. Since the last stitch follows layer L, every
model runs all L layers and the hub's final norm reads the last E2H mixture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import DynamicCache

from bts.core import hf_compat, tree_attention
from bts.core.io import BTSError, state_dict_sha256
from bts.core.language_model import sample_next
from bts.core.params import ParamCounts, count_params
from bts.core.tree_attention import TreeRows
from bts.dense.modeling import DecoderParts, decoder_parts, load_causal_lm
from bts.stitch.gates.recorder import GateRecorder
from bts.stitch.layer import H2E_GATE_INITS, STITCH_INITS, StitchLayer


@dataclass
class StitchConfig:
    """How the stitch layers are built (paper §2; ablations of §4)."""

    num_stitch_layers: int = 4
    """K: number of stitch layers, spread evenly with the last after the final layer L (``stitch_placement``; paper:
    K=4 with L=20 → after layers 5, 10, 15, 20)."""
    all_e2h: bool = False
    """Ablation: make every stitch layer Experts-into-Hub instead of alternating H2E / E2H."""
    gate_dropout: float = 0.1
    """Dropout on the gate logits ``w_gate(h0)`` (active in training only)."""
    init: str = "identity"
    """Initialisation: ``identity`` (``w_proj_i = I``, ``w_gate = 0``) or ``random`` (small normal, ablation)."""
    h2e_gate_init: str = "half"
    """Where the H2E gates start (not given by the paper): ``half`` (``sigmoid(0) = 0.5``, the default) or ``closed``
    (a learned gate-logit bias ``stitch_gate_bias`` at -4 in each H2E layer: gates ≈ 0.018, the experts' streams
    start untouched; ``bts.stitch.layer``). Left out of ``to_dict`` at its default, so manifests of default runs are
    unchanged."""
    activation_checkpointing: bool = False
    """Memory/speed trade-off, training only: recompute each frozen decoder layer during backward instead of storing
    its activations (``torch.utils.checkpoint``, non-reentrant). Only layers whose input needs a gradient (those
    after the first stitch layer) are wrapped. Numerics are unchanged; costs one extra forward of those layers (see
    ``benchmarks/RESULTS.md``). Not part of the model's definition: ``to_dict`` leaves it out unless it is on."""
    compile: bool = False
    """Speed, opt-in: run every decoder layer and stitch layer through ``torch.compile`` (one graph per layer class,
    shared by all layers and models; compiled on the first forward — about a minute on CPU for the tiny models).
    Used for uncached forwards (training, scoring); cached generation stays eager. The modules themselves are not
    modified. Same numerics up to fp32 round-off. Runtime-only, like ``activation_checkpointing``."""

    def __post_init__(self) -> None:
        if self.init not in STITCH_INITS:
            raise BTSError(f"stitch.init must be one of {', '.join(STITCH_INITS)}, got {self.init!r}")
        if self.h2e_gate_init not in H2E_GATE_INITS:
            raise BTSError(f"stitch.h2e_gate_init must be one of {', '.join(H2E_GATE_INITS)}, got "
                           f"{self.h2e_gate_init!r}")
        if not 0.0 <= float(self.gate_dropout) < 1.0:
            raise BTSError(f"stitch.gate_dropout must be in [0, 1), got {self.gate_dropout}")

    def to_dict(self) -> dict:
        """The fields as a dict; runtime-only options (``RUNTIME_FIELDS``) and ``h2e_gate_init`` only when they differ
        from the default."""
        out = asdict(self)
        for name in (*RUNTIME_FIELDS, "h2e_gate_init"):
            if out[name] == StitchConfig.__dataclass_fields__[name].default:
                del out[name]
        return out


RUNTIME_FIELDS = ("activation_checkpointing", "compile")
"""``StitchConfig`` fields that change how the stitched model runs, not what it computes."""


def stitch_placement(num_layers: int, config: StitchConfig) -> list[tuple[int, str]]:
    """``[(after_layer, kind), ...]`` for ``L = num_layers`` transformer layers and ``K = num_stitch_layers``.

    Rule: stitch ``j = 0..K-1`` sits after layer ``round_half_up((j + 1)·L / K)`` (1-based), computed exactly in
    integers as ``(2(j+1)L + K) // (2K)``. For ``1 <= K <= L`` the positions are strictly increasing, the first is
    ``>= 1`` and the last is exactly ``L`` (the final transformer layer); when ``K`` divides ``L`` this is ``(j+1)·L/K``
    (L=20, K=4 → 5, 10, 15, 20). Kinds alternate from the end: the last is always ``"e2h"``, the one before ``"h2e"``,
    and so on; with ``all_e2h`` every kind is ``"e2h"``. ``K <= 0`` or ``K > L`` is refused (``BTSError``).
    """
    k = int(config.num_stitch_layers)
    if k <= 0:
        raise BTSError(f"stitch.num_stitch_layers must be >= 1, got {k}")
    if k > num_layers:
        raise BTSError(f"stitch.num_stitch_layers={k} exceeds the models' {num_layers} layers")
    out = []
    for j in range(k):
        after = (2 * (j + 1) * num_layers + k) // (2 * k)  # round half up of (j+1)·L/K, exact in integers
        kind = "e2h" if config.all_e2h or (k - 1 - j) % 2 == 0 else "h2e"
        out.append((after, kind))
    return out


def default_expert_names(dirs: Sequence[str | Path]) -> list[str]:
    """The experts' names when none are given: their directory names without a leading ``expert_``
    (``runs/tiny/expert_code`` → ``code``; ``/models/Qwen2.5-Math-1.5B`` → ``Qwen2.5-Math-1.5B``)."""
    return [Path(d).name.removeprefix("expert_") or Path(d).name for d in dirs]


class StitchedLM(nn.Module):
    """Hub + ``n`` experts + ``K`` stitch layers, behind the ``LanguageModel`` interface.

    Args:
        hub: the hub causal LM (any model can be the hub: the seed by default, or an expert).
        experts: the ``n >= 1`` spoke models (for the two-model ablation: a single spoke).
        config: stitch configuration (default ``StitchConfig()``).
        hub_name: name of the hub (e.g. ``seed``); default ``hub``.
        expert_names: names of the experts (their domains, e.g. ``code``); default ``expert1..n``.
        sources: optional directory of every model (hub first), recorded in saved checkpoints.
    """

    def __init__(
        self,
        hub: nn.Module,
        experts: Sequence[nn.Module],
        config: StitchConfig | None = None,
        *,
        hub_name: str | None = None,
        expert_names: Sequence[str] | None = None,
        sources: Sequence[str | Path | None] | None = None,
    ):
        super().__init__()
        experts = list(experts)
        if not experts:
            raise BTSError("BTS needs at least one expert besides the hub (got none)")
        models = [hub, *experts]
        names = [hub_name or "hub", *(expert_names or [f"expert{i}" for i in range(1, len(experts) + 1)])]
        if len(names) != len(models):
            raise BTSError(f"got {len(experts)} experts but {len(names) - 1} expert_names; give one name per expert, "
                           "or leave expert_names out")
        if len(set(names)) != len(names):
            raise BTSError(f"model names must be unique, got {names}")
        for i, m in enumerate(models):
            for j in range(i):
                if models[j] is m:
                    raise BTSError(f"the same model object is passed twice ({names[j]!r} and {names[i]!r})")
        self.config = config or StitchConfig()
        self.names: list[str] = names
        self.sources: list[str | None] = (
            [None if s is None else str(s) for s in sources] if sources is not None else [None] * len(models)
        )
        if len(self.sources) != len(models):
            raise BTSError(f"got {len(self.sources)} sources for {len(models)} models")

        parts = [decoder_parts(m) for m in models]
        dims = [self._dims(p) for p in parts]
        for key in ("num_layers", "hidden_size", "vocab_size"):
            for name, dim in zip(names[1:], dims[1:]):
                if dim[key] != dims[0][key]:
                    raise BTSError(
                        f"model {name!r} has {key}={dim[key]} but the hub {names[0]!r} has {key}={dims[0][key]}; "
                        "all stitched models must share num_layers, hidden_size and vocab_size"
                    )
        self.num_layers: int = dims[0]["num_layers"]
        self.hidden_size: int = dims[0]["hidden_size"]
        self.vocab_size: int = dims[0]["vocab_size"]
        self._placement = stitch_placement(self.num_layers, self.config)

        self.models = nn.ModuleList(models)
        for m in self.models:
            m.requires_grad_(False)
            m.eval()
        self._parts: list[DecoderParts] = parts
        self._layer_types = [hf_compat.layer_types(p.config, self.num_layers) for p in parts]
        device = next(hub.parameters()).device
        # meta-device models (shape-only instantiation, e.g. counting parameters at paper scale): build the stitch
        # layers on meta directly rather than allocating (2n+1)·K·d² floats on the CPU first
        with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
            self.stitch_layers = nn.ModuleList(
                StitchLayer(self.hidden_size, len(experts), kind, self.config.gate_dropout, self.config.init,
                            self.config.h2e_gate_init)
                for _, kind in self._placement
            ).to(device)
        for j, (after, kind) in enumerate(self._placement):
            self.stitch_layers[j].label = f"stitch layer {j} (after layer {after}, {kind})"
        self._stitch_after = {after: j for j, (after, _) in enumerate(self._placement)}
        self._recorder: GateRecorder | None = None
        self._compiled: tuple[list[list], list] | None = None  # (layers per model, stitch layers); plain lists
        self.allow_changed_models = False
        """True when this model was loaded with the ``allow_changed_models`` override (see ``changed_models``)."""
        self.changed_models: list[str] = []
        """Names of frozen models whose weights differ from the checkpoint manifest (override in effect)."""
        self.frozen_sha256: list[str] | None = None
        """The frozen models' identities as loaded, when they are held in another dtype (``hold_frozen_in``)."""

    @staticmethod
    def _dims(parts: DecoderParts) -> dict[str, int]:
        return {
            "num_layers": len(parts.layers),
            "hidden_size": int(parts.config.hidden_size),
            "vocab_size": int(parts.lm_head.weight.shape[0]),
        }

    @classmethod
    def from_pretrained_dirs(
        cls,
        hub_dir: str | Path,
        expert_dirs: Sequence[str | Path],
        *,
        config: StitchConfig | None = None,
        hub_name: str | None = None,
        expert_names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        **stitch_cfg,
    ) -> StitchedLM:
        """Load the hub and experts from Hugging Face directories; ``stitch_cfg`` are ``StitchConfig`` fields.

        Names default to the directory names, without a leading ``expert_`` for the experts
        (``default_expert_names``: ``runs/tiny/expert_code`` → ``code``, the domain).
        """
        if config is not None and stitch_cfg:
            raise BTSError("pass either config= or StitchConfig fields, not both")
        config = config or StitchConfig(**stitch_cfg)
        dirs = [Path(hub_dir), *[Path(d) for d in expert_dirs]]
        if len(dirs) < 2:
            raise BTSError("BTS needs at least one expert directory besides the hub")
        if expert_names and len(expert_names) != len(dirs) - 1:
            raise BTSError(f"expert_names has {len(expert_names)} names ({', '.join(expert_names)}) but experts has "
                           f"{len(dirs) - 1} directories; give one name per expert, or leave expert_names out to name "
                           "the experts after their directories")
        resolved = [d.resolve() for d in dirs]
        for i, r in enumerate(resolved):
            if r in resolved[:i]:
                raise BTSError(f"the same model directory is passed twice: {dirs[i]} (each model of a stitch is "
                               "named after its directory; to stitch the same weights twice, copy it under another "
                               f"name: cp -r {dirs[i]} {dirs[i]}_copy)")
        models = [load_causal_lm(d, dtype=dtype) for d in dirs]
        return cls(
            models[0],
            models[1:],
            config,
            hub_name=hub_name or dirs[0].name,
            expert_names=list(expert_names) if expert_names else default_expert_names(dirs[1:]),
            sources=[str(d) for d in dirs],
        )

    # --- structure -------------------------------------------------------------------------------------------------
    @property
    def hub(self) -> nn.Module:
        return self.models[0]

    @property
    def experts(self) -> list[nn.Module]:
        return list(self.models[1:])

    @property
    def n_experts(self) -> int:
        return len(self.models) - 1

    @property
    def expert_names(self) -> list[str]:
        return self.names[1:]

    def placement(self) -> list[tuple[int, str]]:
        """``[(after_layer, kind), ...]``, one entry per stitch layer (after_layer is 1-based)."""
        return list(self._placement)

    def stitch_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the stitch tensors (keys ``stitch_layers.<j>.stitch_proj`` / ``stitch_layers.<j>.stitch_gate.weight``,
        and ``stitch_layers.<j>.stitch_gate_bias`` for a closed H2E layer)."""
        return {f"stitch_layers.{k}": v for k, v in self.stitch_layers.state_dict().items()}

    def load_stitch_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "stitch_layers."
        if any(not k.startswith(prefix) for k in state):
            raise BTSError("stitch state keys must start with 'stitch_layers.'")
        try:
            self.stitch_layers.load_state_dict({k[len(prefix) :]: v for k, v in state.items()}, strict=True)
        except RuntimeError as e:
            raise BTSError(f"stitch weights do not fit this model: {str(e).splitlines()[0]}") from None

    def hold_frozen_in(self, dtype: torch.dtype) -> None:
        """Hold every frozen model in ``dtype`` (bfloat16 under bf16 training: the weights are not re-cast at every
        step, and the residual streams are bfloat16 as in the models' own bf16 inference). The stitch layers keep
        their dtype. The models' identities (``frozen_sha256``, pinned by stitch checkpoints) are those of the
        weights as loaded, taken before the first cast."""
        if self.frozen_sha256 is None:
            self.frozen_sha256 = [state_dict_sha256(m.state_dict()) for m in self.models]
        for m in self.models:
            m.to(dtype)

    def train(self, mode: bool = True) -> StitchedLM:
        """Stitch layers follow ``mode``; the frozen models always stay in eval mode."""
        super().train(mode)
        for m in self.models:
            m.eval()
        return self

    def param_counts(self) -> ParamCounts:
        """trained = stitch parameters; total = active = stitch + every frozen model."""
        total = count_params(self)
        return ParamCounts(trained=count_params(self.stitch_layers), total=total, active=total)

    def new_caches(self) -> list[DynamicCache]:
        """One empty KV cache per model (hub first), each built from that model's own config."""
        return [DynamicCache(config=m.config) for m in self.models]

    # --- gates -----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def record_gates(self) -> Iterator[GateRecorder]:
        """Collect the per-token gates of every E2H layer during the ``with`` block (see ``GateRecorder``)."""
        idx = [j for j, (_, kind) in enumerate(self._placement) if kind == "e2h"]
        rec = GateRecorder(self.names, [self._placement[j][0] for j in idx], idx)
        for j in idx:
            self.stitch_layers[j].record_gates = True
        self._recorder = rec
        try:
            yield rec
        finally:
            self._recorder = None
            for j in idx:
                self.stitch_layers[j].record_gates = False
                self.stitch_layers[j].last_gates = None

    # --- forward ---------------------------------------------------------------------------------------------------
    def _runners(self, compiled: bool) -> tuple[list, list]:
        """Callables for the decoder layers (``[model][layer]``) and stitch layers: the modules, or (``compiled``)
        ``torch.compile`` wrappers of them, built once (``StitchConfig.compile``)."""
        if not compiled:
            return [p.layers for p in self._parts], list(self.stitch_layers)
        if self._compiled is None:
            self._compiled = (
                [[torch.compile(block) for block in p.layers] for p in self._parts],
                [torch.compile(stitch) for stitch in self.stitch_layers],
            )
        return self._compiled

    def forward(
        self,
        input_ids: torch.LongTensor,
        caches: Sequence[DynamicCache] | None = None,
        past_length: int | None = None,
    ) -> torch.Tensor:
        """``input_ids [B, T]`` → hub logits ``[B, T, V]``.

        With ``caches`` (one per model, hub first; see ``new_caches``) the keys/values of these tokens are appended
        to each model's own cache and positions start at ``past_length`` (default: the caches' current length).
        """
        return self.output_head(self.hidden_states(input_ids, caches, past_length))

    def forward_tree(self, input_ids: torch.LongTensor, tree: TreeRows) -> torch.Tensor:
        """Hub logits ``[B, T, V]`` of packed rows (``bts.core.tree_attention``): every model runs them."""
        return self.output_head(self.hidden_states(input_ids, tree=tree))

    def supports_tree_attention(self) -> bool:
        return all(tree_attention.supports(p.config) for p in self._parts)

    @property
    def output_head(self) -> nn.Module:
        """The hub's LM head: the model's output layer (its input is ``hidden_states``)."""
        return self._parts[0].lm_head

    def hidden_states(
        self,
        input_ids: torch.LongTensor,
        caches: Sequence[DynamicCache] | None = None,
        past_length: int | None = None,
        tree: TreeRows | None = None,
    ) -> torch.Tensor:
        """The hub's final-normed hidden states ``[B, T, d]`` after the last E2H mixture (``forward`` without the
        head; the training loss applies the head chunk by chunk, ``bts.training.losses``); ``tree``: packed rows,
        with their positions and 4D mask instead of the causal ones (no cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        n_models = len(self.models)
        use_cache = caches is not None
        if use_cache and (len(caches) != n_models or tree is not None):
            raise ValueError(f"need {n_models} caches (one per model) and no tree, got {len(caches)}")
        if past_length is None:
            past_length = caches[0].get_seq_length() if use_cache else 0
        t = input_ids.shape[1]
        position_ids = (tree.position_ids if tree is not None
                        else torch.arange(past_length, past_length + t, device=input_ids.device)[None])  # [1|B, T]

        states, masks, rotary = [], [], []
        for i, parts in enumerate(self._parts):
            h = parts.embed_tokens(input_ids)  # [B, T, d]
            cache = caches[i] if use_cache else None
            masks.append([tree.attention_mask(parts.config, h.dtype)] * self.num_layers if tree is not None else
                         hf_compat.causal_masks(parts.config, h, position_ids, cache, self._layer_types[i]))
            rotary.append(parts.rotary_emb(h, position_ids))
            states.append(h)

        last_stitch = self._placement[-1][0]
        checkpointing = (
            self.config.activation_checkpointing and self.training and torch.is_grad_enabled() and not use_cache
        )
        blocks, stitches = self._runners(compiled=self.config.compile and not use_cache)
        for stitch in self.stitch_layers:
            stitch.defer_finite_check, stitch.gates_finite = True, None
        for layer in range(self.num_layers):
            active = (
                n_models if layer < last_stitch else 1
            )  # experts cannot affect the output after the last stitch
            for i in range(active):
                block = blocks[i][layer]
                kw = hf_compat.layer_kwargs(
                    self._parts[i].layers[layer], attention_mask=masks[i][layer], position_embeddings=rotary[i],
                    position_ids=position_ids, cache=caches[i] if use_cache else None, use_cache=use_cache,
                )
                if checkpointing and states[i].requires_grad:
                    states[i] = torch.utils.checkpoint.checkpoint(block, states[i], use_reentrant=False, **kw)
                else:
                    states[i] = block(states[i], **kw)
            j = self._stitch_after.get(layer + 1)
            if j is not None:
                stitch = self.stitch_layers[j]
                states = stitches[j](states)
                if self._recorder is not None and stitch.kind == "e2h":
                    self._recorder._add(j, stitch.last_gates)
        self._check_gates_finite()
        return self._parts[0].norm(states[0])  # [B, T, d]

    def _check_gates_finite(self) -> None:
        """One host sync for all K stitch layers' gate checks; the error names the first bad layer."""
        flagged = [s for s in self.stitch_layers if s.gates_finite is not None]
        if flagged and not bool(torch.stack([s.gates_finite for s in flagged]).all()):
            raise next(s for s in flagged if not bool(s.gates_finite)).non_finite_error()

    # --- generation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Greedy or sampled decoding with one KV cache per model (in eval mode; the mode is restored after).

        Same semantics as ``bts.core.language_model.greedy_or_sample_uncached``: rows that emitted ``eos_token_id`` keep
        emitting it, and decoding stops early once every row is done.
        """
        out = input_ids
        if max_new_tokens <= 0:
            return out
        was_training = self.training
        if was_training:  # (toggling the mode walks every submodule: skip it when already in eval mode)
            self.eval()
        try:
            caches = self.new_caches()
            logits = self(input_ids, caches=caches)
            done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
            for step in range(max_new_tokens):
                nxt = sample_next(logits[:, -1, :].float(), do_sample, temperature, generator)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                out = torch.cat([out, nxt[:, None]], dim=1)
                if eos_token_id is not None and bool(done.all()):
                    break
                if step + 1 < max_new_tokens:
                    logits = self(nxt[:, None], caches=caches)
        finally:
            if was_training:
                self.train()
        return out
