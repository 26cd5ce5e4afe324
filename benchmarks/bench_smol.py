"""Throughput at SmolLM2-135M shape (30 layers, d 576, FFN 1536, GQA 9/3, vocab 49,152, tied embeddings): the levers
of the training loop measured one at a time, as MFU against the measured bf16 matmul peak beside tokens/s.

Called by ``benchmarks/gpu_check.py --sizes smol`` (one CUDA device, ~2-3 min). Sections:

* ``expert``: continued pretraining of one model (every weight trains, bf16 autocast as ``bf16-mixed``):
  the old path (logits cross-entropy in fp32, foreach AdamW, batch 16) and the new one (chunked LM-head
  cross-entropy ``bts.training.losses``, fused AdamW) at batch 16 / 32 / 64, and per-layer ``torch.compile`` at the largest.
* ``bts``: the BTS step over 4 models (seed + 3 experts, K = 4): frozen models in fp32 (cast by autocast at every
  matmul) or held in bf16, batch 16 / 32 (``StitchConfig(compile=True)`` only in the CPU dry run: on a GPU the
  compile lever is measured once, in ``expert``, to keep the session short); beside it the frozen floor (each of
  the n+1 models' forward and input-gradient backward, one after another) and the ratio step ÷ floor.
* ``eval``: scoring forward passes (logits + per-token NLL, no grad): a dense model and the stitched model.
* ``lightning``: ``CausalLMModule`` under ``Trainer.fit`` against a plain loop doing the same work on the same
  batches (overhead = Lightning's time ÷ the loop's − 1).

Model FLOPs per token come from ``bts.training.flops`` (checked against ``torch.utils.flop_counter`` in tests/test_flops.py).
On a CPU (``--allow-cpu``) the shapes shrink to 4 layers and 2 × 64 tokens: a dry run of the code paths only.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time

import torch
import torch.nn.functional as F

from bts.dense.modeling import LlamaArch, build_llama
from bts.stitch.model import StitchConfig, StitchedLM
from bts.training import flops
from bts.training.losses import linear_cross_entropy
from bts.training.throughput import matmul_peak, synchronize

SMOL = LlamaArch(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                 tie_word_embeddings=True)
SEQ = 512


def _arch(device: torch.device) -> LlamaArch:
    if device.type == "cuda":
        return SMOL
    return LlamaArch(**{**SMOL.__dict__, "num_hidden_layers": 4})


def _shape(device: torch.device, batch: int) -> tuple[int, int]:
    return (batch, SEQ) if device.type == "cuda" else (2, 64)


def _ids(vocab: int, batch: int, seq: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def _time(step, warmup: int, steps: int, device) -> tuple[float, float]:
    """(seconds per step over ``steps`` after ``warmup``, seconds of the first call)."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - t0) / steps, first


def _memory(device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _reset_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _record(per_step: float, first: float, tokens: int, per_token: float, peak: float, device) -> dict:
    tps = tokens / per_step
    return {"ms_per_step": round(per_step * 1e3, 2), "first_step_s": round(first, 2), "tokens_per_s": round(tps),
            "mfu": round(tps * per_token / peak, 4), "peak_mem_gib": _memory(device)}


# --------------------------------------------------------------------------------------------------- expert
def _dense_step(model, ids, chunked: bool, fused: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if fused else {"foreach": True}))
    targets = ids[:, 1:].flatten()

    def step():
        with _autocast(ids.device):
            if chunked:
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), model.lm_head, targets)
            else:
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_expert(device, peak: float, compile_ok: bool, warmup: int, steps: int) -> dict:
    arch = _arch(device)
    variants = [("logits_foreach_b16", 16, False, False, False), ("chunked_fused_b16", 16, True, True, False),
                ("chunked_fused_b32", 32, True, True, False), ("chunked_fused_b64", 64, True, True, False)]
    if compile_ok:
        variants.append(("chunked_fused_compiled_b64", 64, True, True, True))
    out = {}
    for name, batch, chunked, fused, compiled in variants:
        _reset_memory(device)
        with torch.device(device):
            model = build_llama(arch, seed=0).train()
        if compiled:
            for layer in model.model.layers:
                layer.compile()
        b, t = _shape(device, batch)
        ids = _ids(arch.vocab_size, b, t, device)
        per_step, first = _time(_dense_step(model, ids, chunked, fused), warmup, steps, device)
        out[name] = _record(per_step, first, b * t, flops.dense_train_flops(model.config, t), peak, device)
        del model
    best = max(out.values(), key=lambda r: r["mfu"])
    out["best"] = next(k for k, v in out.items() if v is best)
    return out


# --------------------------------------------------------------------------------------------------- BTS
def _family(arch, device, dtype, n_experts: int = 3):
    with torch.device(device):
        models = [build_llama(arch, seed=s).eval() for s in range(n_experts + 1)]
    for m in models:
        m.requires_grad_(False)
        m.to(dtype)
    return models


def _stitch_step(model: StitchedLM, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                            **({"fused": True} if ids.is_cuda else {}))
    targets = ids[:, 1:].flatten()

    def step():
        with _autocast(ids.device):
            hidden = model.hidden_states(ids)
            loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), model.output_head, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _floor_step(models, ids):
    """Each frozen model's forward and the backward to its input embeddings, one after another."""
    targets = ids[:, 1:].flatten()

    def step():
        for m in models:
            with _autocast(ids.device):
                h = m.get_input_embeddings()(ids).detach().requires_grad_(True)
                hidden = m.model(inputs_embeds=h, use_cache=False).last_hidden_state
                loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), m.lm_head, targets)
            loss.backward()

    return step


def bench_bts(device, peak: float, compile_ok: bool, warmup: int, steps: int) -> dict:
    arch = _arch(device)
    variants = [("frozen_fp32_b16", torch.float32, 16, False), ("frozen_bf16_b16", torch.bfloat16, 16, False),
                ("frozen_bf16_b32", torch.bfloat16, 32, False)]
    if compile_ok and device.type != "cuda":  # on the GPU the dense section measures compile (device time is short)
        variants.append(("frozen_bf16_compiled_b32", torch.bfloat16, 32, True))
    out = {}
    for name, dtype, batch, compiled in variants:
        _reset_memory(device)
        models = _family(arch, device, dtype)
        b, t = _shape(device, batch)
        ids = _ids(arch.vocab_size, b, t, device)
        model = StitchedLM(models[0], models[1:], StitchConfig(num_stitch_layers=4, compile=compiled)).train()
        per_token = flops.stitched_train_flops(models[0].config, 3, model.placement(), t)
        per_step, first = _time(_stitch_step(model, ids), warmup, steps, device)
        rec = _record(per_step, first, b * t, per_token, peak, device)
        if not compiled:
            _reset_memory(device)
            floor, _ = _time(_floor_step(models, ids), max(1, warmup // 2), steps, device)
            rec["floor_ms"] = round(floor * 1e3, 2)
            rec["step_vs_floor"] = round(per_step / floor, 3)
        out[name] = rec
        del model, models
    best = max(out.values(), key=lambda r: r["mfu"])
    out["best"] = next(k for k, v in out.items() if v is best)
    return out


# --------------------------------------------------------------------------------------------------- eval
def _score_step(forward, ids):
    def step():
        with torch.no_grad(), _autocast(ids.device):
            logits = forward(ids)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            logp.gather(-1, ids[:, 1:, None]).sum()

    return step


def bench_eval(device, peak: float, warmup: int, steps: int) -> dict:
    arch = _arch(device)
    b, t = _shape(device, 32)
    ids = _ids(arch.vocab_size, b, t, device)
    out = {}
    _reset_memory(device)
    models = _family(arch, device, torch.float32)
    dense = models[0]
    per_step, first = _time(_score_step(lambda x: dense(input_ids=x, use_cache=False).logits, ids), warmup, steps,
                            device)
    out["dense_fp32_autocast_b32"] = _record(per_step, first, b * t, flops.dense_forward_flops(dense.config, t), peak,
                                             device)
    stitched = StitchedLM(models[0], models[1:], StitchConfig(num_stitch_layers=4)).eval()
    per_step, first = _time(_score_step(stitched, ids), warmup, steps, device)
    out["bts_fp32_autocast_b32"] = _record(per_step, first, b * t,
                                           flops.stitched_forward_flops(dense.config, 3, 4, t), peak, device)
    del stitched, models, dense
    return out


# --------------------------------------------------------------------------------------------------- Lightning
def bench_lightning(device, warmup: int, steps: int) -> dict:
    """``CausalLMModule`` under ``Trainer.fit`` (bf16-mixed, gradient clipping, the module's own checks and logging)
    against a plain loop of the same loss, clipping, fused AdamW and schedule on the same batches."""
    import lightning as L
    from torch.utils.data import DataLoader

    from bts.dense.module import CausalLMModule
    from bts.training.schedule import warmup_cosine

    arch = _arch(device)
    b, t = _shape(device, 64)
    rows = [{"input_ids": r} for r in _ids(arch.vocab_size, b * (warmup + steps), t, "cpu")]

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == warmup:
                synchronize(device)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, module):
            synchronize(device)
            self.seconds = time.perf_counter() - self.t0

    _reset_memory(device)
    module = CausalLMModule(arch=arch, lr=1e-5, warmup_steps=2)
    plain = copy.deepcopy(module.model).to(device).train()
    clock = Clock()
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed", gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
                        log_every_n_steps=10)
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=b))
    lightning_s = clock.seconds
    del trainer, module

    params = list(plain.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 2, warmup + steps, 0.01))
    batches = [torch.stack([r["input_ids"] for r in rows[i:i + b]]) for i in range(0, len(rows), b)]
    t0 = None
    for i, x in enumerate(batches):
        if i == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        x = x.to(device, non_blocking=True)
        with _autocast(device):
            hidden = plain.model(input_ids=x, use_cache=False).last_hidden_state
            loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), plain.lm_head, x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    plain_s = time.perf_counter() - t0
    return {"steps": steps, "batch": [b, t], "lightning_s": round(lightning_s, 3), "plain_s": round(plain_s, 3),
            "overhead": round(lightning_s / plain_s - 1, 4)}


def bench_smol(device, compile_ok: bool = True) -> dict:
    """Every section above; ``mfu`` = the best BTS step's, ``expert_mfu`` = the best dense training step's."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    warmup, steps = (3, 8) if cuda else (1, 1)
    peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32)
    out: dict = {"shape": {**{k: v for k, v in _arch(device).__dict__.items()}, "seq_len": _shape(device, 1)[1]},
                 "matmul_peak_tflops": peak["tflops"], "peak": peak}
    sections = {"expert": lambda: bench_expert(device, peak["flops"], compile_ok, warmup, steps),
                "bts": lambda: bench_bts(device, peak["flops"], compile_ok, warmup, steps),
                "eval": lambda: bench_eval(device, peak["flops"], warmup, steps),
                "lightning": lambda: bench_lightning(device, warmup, 12 if cuda else 2)}
    for name, fn in sections.items():
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 - one section's failure must not hide the others
            out[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
        out[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    with contextlib.suppress(KeyError, TypeError):
        out["expert_mfu"] = out["expert"][out["expert"]["best"]]["mfu"]
    with contextlib.suppress(KeyError, TypeError):
        out["mfu"] = out["bts"][out["bts"]["best"]]["mfu"]
    with contextlib.suppress(KeyError, TypeError):
        out["eval_mfu"] = max(v["mfu"] for v in out["eval"].values())
    return out
