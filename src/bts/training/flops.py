"""Model FLOPs per token, for throughput reported as MFU (model FLOPs utilisation) beside tokens/s.

Conventions (PaLM's, as nanoGPT / LitGPT use them): a matmul of a token with a ``[d_in, d_out]`` weight is
``2·d_in·d_out`` FLOPs; attention adds ``4·T·d_attn`` per token and layer for ``QK^T`` and ``AV`` over the full
context ``T`` (no discount for the causal mask); embedding lookups, norms, activations and the softmax are not
counted. Training a dense model is ``3×`` its forward: the backward of a weight matmul is two (input and weight
gradients), that of attention two as well (``dP`` and ``dV``, then ``dQ`` and ``dK``); these are the FLOPs that
``torch.utils.flop_counter`` counts for the same step (tests/test_flops.py). Only what a method *needs* is counted, so recomputation (activation checkpointing) lowers MFU.

The BTS step (paper §2) counts the forward of all ``n + 1`` frozen models (the experts' LM heads are never run) and
the ``K`` stitch layers, plus the backward that the stitch gradients need: input gradients through every layer and
stitch matmul whose input depends on a stitch parameter (``stitched_train_flops``), through the hub's head, and
the stitch layers' weight gradients. No frozen weight gets a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence


def _dims(config) -> dict[str, int]:
    d = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return {"d": d, "heads": heads, "head_dim": head_dim, "kv": kv, "ff": int(config.intermediate_size),
            "vocab": int(config.vocab_size), "layers": int(config.num_hidden_layers)}


def _layer_parts(config, seq_len: int, ffn_experts: float = 1.0) -> tuple[float, float]:
    """(weight matmul FLOPs, attention FLOPs) per token of one Llama-family decoder layer's forward (SwiGLU FFN;
    ``ffn_experts`` FFNs per token)."""
    m = _dims(config)
    q, kv = m["heads"] * m["head_dim"], m["kv"] * m["head_dim"]
    projections = 2 * (m["d"] * q + 2 * m["d"] * kv + q * m["d"])
    ffn = 2 * 3 * m["d"] * m["ff"] * ffn_experts
    return float(projections + ffn), float(4 * seq_len * q)


def layer_forward_flops(config, seq_len: int, ffn_experts: float = 1.0) -> float:
    """Forward FLOPs per token of one decoder layer."""
    return sum(_layer_parts(config, seq_len, ffn_experts))


def layer_input_backward_flops(config, seq_len: int) -> float:
    """FLOPs per token of one layer's gradient with respect to its input alone (frozen weights): one forward of
    every weight matmul, two of attention (the gradients of Q, K and V need ``dP`` and ``dV``)."""
    weights, attention = _layer_parts(config, seq_len)
    return weights + 2 * attention


def head_forward_flops(config) -> float:
    """Forward FLOPs per token of the LM head."""
    m = _dims(config)
    return float(2 * m["d"] * m["vocab"])


def dense_forward_flops(config, seq_len: int, ffn_experts: float = 1.0) -> float:
    """Forward FLOPs per token of a whole decoder (every layer and the head)."""
    return _dims(config)["layers"] * layer_forward_flops(config, seq_len, ffn_experts) + head_forward_flops(config)


def dense_train_flops(config, seq_len: int, ffn_experts: float = 1.0) -> float:
    """Training FLOPs per token of a dense model whose weights all train: forward + input and weight gradients."""
    return 3 * dense_forward_flops(config, seq_len, ffn_experts)


def _stitch_parts(config, n_experts: int) -> tuple[float, float]:
    """(gate, projections) forward FLOPs per token of one stitch layer: ``w_gate: d -> (n+1)·d`` and ``n`` maps
    ``d -> d``."""
    d = _dims(config)["d"]
    return float(2 * d * (n_experts + 1) * d), float(2 * n_experts * d * d)


def stitch_layer_flops(config, n_experts: int) -> float:
    """Forward FLOPs per token of one stitch layer: ``(2n+1)·d²`` multiply-adds."""
    return sum(_stitch_parts(config, n_experts))


def stitched_forward_flops(config, n_experts: int, num_stitch_layers: int, seq_len: int) -> float:
    """Forward FLOPs per token of a ``StitchedLM``: ``n + 1`` decoders (one head) and ``K`` stitch layers."""
    m = _dims(config)
    layers = (n_experts + 1) * m["layers"] * layer_forward_flops(config, seq_len)
    return layers + head_forward_flops(config) + num_stitch_layers * stitch_layer_flops(config, n_experts)


def stitched_train_flops(config, n_experts: int, placement: Sequence[tuple[int, str]], seq_len: int) -> float:
    """Training FLOPs per token of the BTS step (module docstring): the forward, then input gradients wherever a
    stream depends on a stitch parameter, and the stitch weights' gradients.

    A stream depends on the stitch parameters after the first stitch layer that writes it: the experts' streams
    after the first stitch of either kind, the hub's only after the first E2H (an H2E layer returns ``h0``
    unchanged, eq. 4). A layer of a dependent stream needs its input gradient; a stitch matmul needs one when its
    input stream is dependent (E2H: the gate reads ``h0``, the projections the experts; H2E: both read ``h0``)."""
    m = _dims(config)
    gate, proj = _stitch_parts(config, n_experts)
    per_layer = layer_input_backward_flops(config, seq_len)
    after = {a: kind for a, kind in placement}
    hub_dep = experts_dep = False
    backward = 0.0
    for layer in range(1, m["layers"] + 1):
        backward += per_layer * (hub_dep + n_experts * experts_dep)
        kind = after.get(layer)
        if kind is None:
            continue
        backward += gate + proj  # weight gradients
        if kind == "e2h":
            backward += gate * hub_dep + proj * experts_dep
            hub_dep = experts_dep = True
        else:
            backward += (gate + proj) * hub_dep
            experts_dep = True
    backward += head_forward_flops(config) * hub_dep  # the hub head's input gradient
    return stitched_forward_flops(config, n_experts, len(placement), seq_len) + backward
