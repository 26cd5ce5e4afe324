#!/usr/bin/env python
"""BTS performance benchmark: one process, one run, writes ``benchmarks/RESULTS.md`` (+ ``benchmarks/results.json``).

    .venv/bin/python benchmarks/bench_bts.py                # tiny + d512, ~5-10 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_bts.py --sizes tiny   # tiny only
    .venv/bin/python benchmarks/bench_bts.py --quick        # fewer rounds (smoke run; numbers are noisy)

Not part of the test suite. Random-init models (timing does not depend on the weights). Every measurement:

* **Training step ratio** = stitch-training step ÷ frozen models' fwd+bwd step, same batch ``[B, T]`` of random ids.
  - *stitch-training step*: ``StitchedLM(hub, experts)`` in train mode (gate dropout on) → hub logits → next-token
    cross-entropy (as ``LMTrainingModule.lm_loss``) → ``backward`` → ``clip_grad_norm_(1.0)`` (as
    ``configs/bts/tiny.yaml``) → ``AdamW.step`` over the stitch parameters → ``zero_grad(set_to_none=True)``. Raw
    PyTorch loop (no Lightning overhead; Lightning's per-step hooks/logging are the same for any module).
  - *frozen fwd+bwd alone*: the ``n + 1`` frozen HF models (``requires_grad=False``, eval mode) run **one after
    another**; for each, ``h = embed_tokens(ids).requires_grad_()``, ``logits = model(inputs_embeds=h)``, that
    model's own next-token cross-entropy, ``backward`` — so backward flows through every layer's activations down
    to the embeddings' output but no weight gradient is computed. Each model runs its own LM head.
  - Structural differences that favour BTS (they are part of what BTS costs, so they are kept): BTS runs only the
    hub's LM head, the layers before the first stitch layer need no backward (nothing trainable below them), and
    the experts' layers after the last stitch layer are skipped (none at L=8, K=4).
  - Timing: the two steps alternate (interleaved, order rotated each round) after warmup; the ratio is the
    median over rounds of the per-round ratio, so slow drifts in machine load cancel.
* **Generation ratio** = BTS cached greedy decoding tokens/s (``StitchedLM.generate``: one KV cache per model)
  ÷ tokens/s of the ``n + 1`` models decoded **one after another**, each greedy with its own ``DynamicCache``
  (hand loop: prefill, then one token per call; the same prompt and number of new tokens). tokens/s = new tokens ÷
  wall time (prefill included); for the baseline the wall time is the sum over the models.
* **Peak memory** (CPU): one subprocess per measurement; after the models and optimizer are built the kernel's
  peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``), two training steps run, and ``VmHWM`` (peak RSS)
  minus the RSS before the steps is the training-time extra memory (activations, gradients, optimizer state);
  ``VmHWM`` itself is the whole-process peak. Compared: stitch training, stitch training with activation
  checkpointing, the frozen fwd+bwd step, and a dense fine-tune of **one** model (all weights trainable, AdamW).
  On GPU (``benchmarks/gpu_check.py``) the same is ``torch.cuda.max_memory_allocated``.
* **Frozen state check**: ``StitchModule`` is fit 2 steps with a Lightning ``Trainer`` (tiny random family saved
  with ``save_pretrained``): every frozen parameter has ``.grad is None`` and the optimizer state holds exactly the
  stitch tensors.
* **Data pipeline**: ``DomainMixDataModule`` (BTS mixture, the size's ``seq_len``/``batch_size``) over the
  embedded corpus in ``./.cache/bts`` with ``runs/tiny/tokenizer`` (else a tokenizer trained into a temp dir):
  tokens/s of iterating the train loader (setup time reported separately) ÷ the stitch step's consumption
  ``B·T / step time``.
* **MFU** = analytic model FLOPs per step ÷ step time ÷ measured fp32 matmul peak (best of ``torch.mm`` on
  ``2048²`` fp32 matrices with the same threads). FLOPs count matmuls only (linear layers: 2·N·params forward,
  2·N·params for the activation gradient, 2·N·params more for a weight gradient; attention scores and values
  ``4·B·T²·d`` forward, twice that backward, full square — not halved for causality); elementwise ops, norms and
  the optimizer are not counted.
* **Optimisations**: each variant's stitch step is timed interleaved with the reference and reported as
  variant ÷ reference (and variant ÷ frozen baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bts.dense.modeling import LlamaArch, build_llama
from bts.stitch.model import StitchConfig, StitchedLM


# --------------------------------------------------------------------------------------------------- sizes
@dataclass
class Size:
    name: str
    arch: LlamaArch
    n_experts: int = 3
    k: int = 4
    batch: int = 16
    seq: int = 128
    rounds: int = 8  # timed training rounds (each: one reference step + one baseline step + variants)
    warmup: int = 2
    gen_batch: int = 1
    gen_prompt: int = 16
    gen_new: int = 64
    gen_rounds: int = 5
    variants: list[str] = field(default_factory=lambda: ["e2h_before", "ckpt", "compile", "bf16_autocast"])


SIZES = {
    "tiny": Size("tiny", LlamaArch()),  # d=64, L=8, 4 heads, 1 KV head, FFN 192, vocab 2048
    "d512": Size(
        "d512",
        LlamaArch(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=1),
        batch=4,  # a d=512 step is ~30x a tiny one: 4 sequences keep one round of the benchmark under a minute
        rounds=3,
        warmup=1,
        gen_new=32,
        gen_rounds=3,
        variants=["e2h_before", "ckpt"],
    ),
}


def quick(size: Size) -> Size:
    return replace(size, rounds=2, warmup=1, gen_new=8, gen_rounds=2)


# --------------------------------------------------------------------------------------------------- helpers
def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_family(size: Size) -> list[torch.nn.Module]:
    models = [build_llama(size.arch, seed=s) for s in range(size.n_experts + 1)]
    for m in models:
        m.requires_grad_(False)
        m.eval()
        m.config.use_cache = False
    return models


def random_ids(size: Size, batch: int | None = None, seq: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size.arch.vocab_size, (batch or size.batch, seq or size.seq), generator=g)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def autocast_ctx(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` (what Lightning's ``precision: bf16-mixed`` does) or a no-op for ``dtype=None``."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def frozen_step_fn(models, ids, autocast: torch.dtype | None = None):
    """The n+1 frozen models one after another: grads flow through activations only (see module docstring)."""

    def step():
        for m in models:
            with autocast_ctx(ids.device.type, autocast):
                h = m.get_input_embeddings()(ids).requires_grad_(True)
                logits = m(inputs_embeds=h, use_cache=False).logits
            lm_loss(logits, ids).backward()

    return step


def make_stitched(models, size: Size, **cfg) -> StitchedLM:
    cfg.setdefault("num_stitch_layers", size.k)
    model = StitchedLM(models[0], models[1:], StitchConfig(**cfg))
    model.train()
    return model


def stitch_step_fn(model: StitchedLM, ids, forward=None, autocast: torch.dtype | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    fwd = forward or model

    def step():
        with autocast_ctx(ids.device.type, autocast):
            logits = fwd(ids)
        lm_loss(logits, ids).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt
    step.params = params
    return step


def dense_step_fn(model, ids, autocast: torch.dtype | None = None):
    model.requires_grad_(True)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        with autocast_ctx(ids.device.type, autocast):
            logits = model(input_ids=ids, use_cache=False).logits
        lm_loss(logits, ids).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(fns: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run every fn once per round (order rotated each round) after ``warmup`` untimed rounds (CUDA-synchronised)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            _sync()
            t0 = time.perf_counter()
            fns[n]()
            _sync()
            times[n].append(time.perf_counter() - t0)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def e2h_before(layer, hs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The E2H stitch math as it was before this benchmark (softmax over an innermost model axis + einsum)."""
    h0 = hs[0]
    b, t, d = h0.shape
    n = layer.n_experts
    g = torch.softmax(layer._gate_logits(h0), dim=-1)  # [B, T, d, n+1]
    experts = torch.stack(hs[1:], dim=0).view(n, b * t, d)
    proj = torch.bmm(experts, layer.stitch_proj.transpose(1, 2)).view(n, b, t, d)
    mixed = g[..., 0] * h0 + torch.einsum("btdn,nbtd->btd", g[..., 1:], proj)
    if layer.record_gates:
        layer.last_gates = g.detach().mean(dim=2)
    return [mixed, *proj.unbind(0)]


def use_e2h_before(model: StitchedLM) -> StitchedLM:
    import types

    for layer in model.stitch_layers:
        layer._e2h = types.MethodType(e2h_before, layer)
    return model


# --------------------------------------------------------------------------------------------------- FLOPs / peak
def matmul_peak(n: int = 2048, reps: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def _layer_linear_params(a: LlamaArch) -> int:
    d, head = a.hidden_size, a.hidden_size // a.num_attention_heads
    kv = a.num_key_value_heads * head
    return d * d + 2 * d * kv + d * d + 3 * d * a.intermediate_size


def flops_frozen_step(size: Size) -> float:
    a, n_tok = size.arch, size.batch * size.seq
    attn = 4 * size.batch * size.seq**2 * a.hidden_size
    layer = (2 + 2) * n_tok * _layer_linear_params(a) + attn + 2 * attn
    head = (2 + 2) * n_tok * a.hidden_size * a.vocab_size
    return (size.n_experts + 1) * (a.num_hidden_layers * (layer) + head)


def flops_stitch_step(size: Size) -> float:
    a, n_tok, n = size.arch, size.batch * size.seq, size.n_experts
    d, L = a.hidden_size, a.num_hidden_layers
    attn = 4 * size.batch * size.seq**2 * d
    fwd_layer = 2 * n_tok * _layer_linear_params(a) + attn
    bwd_layer = 2 * n_tok * _layer_linear_params(a) + 2 * attn  # activation gradients only
    step = L // size.k
    first, last = step, size.k * step
    total = 0.0
    for layer in range(1, L + 1):
        models = n + 1 if layer <= last else 1
        total += models * (fwd_layer + (bwd_layer if layer > first else 0))
    stitch_fwd = 2 * n_tok * ((n + 1) * d * d + n * d * d)
    total += stitch_fwd * (1 + 1)  # first stitch layer: weight gradients only
    total += (size.k - 1) * stitch_fwd * (1 + 2)  # weight + input gradients
    total += (2 + 2) * n_tok * d * a.vocab_size  # hub LM head
    return total


# --------------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def hf_greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    out = prompt
    for step in range(new):
        nxt = logits[:, -1, :].float().argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if step + 1 < new:
            logits = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits
    return out


def bench_generation(models, size: Size, autocast: torch.dtype | None = None) -> dict:
    stitched = make_stitched(models, size)
    stitched.eval()
    device = next(models[0].parameters()).device
    prompt = random_ids(size, batch=size.gen_batch, seq=size.gen_prompt, seed=1).to(device)

    def bts():
        with autocast_ctx(device.type, autocast):
            stitched.generate(prompt, size.gen_new)

    def sequential():
        with autocast_ctx(device.type, autocast):
            for m in models:
                hf_greedy(m, prompt, size.gen_new)

    t = interleaved({"bts": bts, "sequential": sequential}, size.gen_rounds, warmup=1)
    return {
        "batch": size.gen_batch,
        "prompt": size.gen_prompt,
        "new_tokens": size.gen_new,
        "bts_tok_s": size.gen_new * size.gen_batch / med(t["bts"]),
        "sequential_tok_s": size.gen_new * size.gen_batch / med(t["sequential"]),
        "ratio": paired_ratio(t["sequential"], t["bts"]),  # tok/s ratio = time ratio inverted
        "target": ">= 0.8",
    }


# --------------------------------------------------------------------------------------------------- memory (child)
def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def mem_child(kind: str, size_name: str, quick_run: bool) -> dict:
    size = SIZES[size_name]
    torch.manual_seed(0)
    models = build_family(size)
    ids = random_ids(size)
    check = {}
    if kind == "frozen":
        step = frozen_step_fn(models, ids)
    elif kind in ("stitch", "stitch_ckpt"):
        model = make_stitched(models, size, activation_checkpointing=kind == "stitch_ckpt")
        step = stitch_step_fn(model, ids)
    elif kind == "dense":
        del models[1:]
        step = dense_step_fn(models[0], ids)
    else:
        raise SystemExit(f"unknown memory kind {kind}")
    rss0 = _proc_status_kb("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    for _ in range(2):
        step()
    peak = _proc_status_kb("VmHWM")
    if kind.startswith("stitch"):
        stitch_ids = {id(p) for p in model.stitch_layers.parameters()}
        frozen = [p for m in model.models for p in m.parameters()]
        check = {
            "frozen_params_with_grad": sum(p.grad is not None for p in frozen),
            "frozen_params_requiring_grad": sum(p.requires_grad for p in frozen),
            "optimizer_state_tensors": len(step.optimizer.state),
            "optimizer_state_non_stitch": sum(id(p) not in stitch_ids for p in step.optimizer.state),
            "stitch_tensors": len(stitch_ids),
        }
    return {
        "kind": kind,
        "size": size_name,
        "rss_before_steps_mib": rss0 / 1024,
        "peak_rss_mib": peak / 1024,
        "delta_mib": (peak - rss0) / 1024,
        "peak_reset": reset,
        **check,
    }


def measure_memory(kind: str, size_name: str, quick_run: bool) -> dict:
    cmd = [sys.executable, __file__, "--mem-child", kind, "--sizes", size_name, "--threads", str(torch.get_num_threads())]
    cmd += ["--quick"] if quick_run else []
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if res.returncode != 0:
        return {"kind": kind, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- checks
def lightning_frozen_check() -> dict:
    """Fit ``StitchModule`` 2 steps under Lightning and inspect grads and optimizer state."""
    import lightning as L
    from torch.utils.data import DataLoader

    from bts.stitch.module import StitchModule

    size = replace(SIZES["tiny"], arch=LlamaArch(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=4))
    models = build_family(size)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for i, m in enumerate(models):
            d = Path(tmp) / f"m{i}"
            m.save_pretrained(d)
            dirs.append(str(d))
        module = StitchModule(hub=dirs[0], experts=dirs[1:], stitch=StitchConfig(num_stitch_layers=2),
                              warmup_steps=1)
        g = torch.Generator().manual_seed(0)
        rows = [{"input_ids": torch.randint(0, 97, (16,), generator=g)} for _ in range(8)]
        trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=2))
        opt = trainer.optimizers[0]
        stitch = {id(p) for p in module.model.stitch_layers.parameters()}
        frozen = [p for m in module.model.models for p in m.parameters()]
        return {
            "frozen_params": len(frozen),
            "frozen_params_with_grad": sum(p.grad is not None for p in frozen),
            "stitch_tensors": len(stitch),
            "optimizer_params": sum(len(gr["params"]) for gr in opt.param_groups),
            "optimizer_state_tensors": len(opt.state),
            "optimizer_state_non_stitch": sum(id(p) not in stitch for p in opt.state),
            "ok": all(p.grad is None for p in frozen) and set(map(id, opt.state)) == stitch,
        }


def data_pipeline(size: Size) -> dict:
    from bts.data import DomainMixDataModule, load_tokenizer, train_tokenizer

    tok_dir = ROOT / "runs" / "tiny" / "tokenizer"
    tmp = None
    source = str(tok_dir.relative_to(ROOT))
    try:
        load_tokenizer(tok_dir)
    except Exception:  # noqa: BLE001 - any failure: train a fresh one
        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        train_tokenizer(Path(tmp.name) / "tok", vocab_size=2048)
        tok_dir = Path(tmp.name) / "tok"
        source = f"trained into a temp dir ({time.perf_counter() - t0:.1f} s)"
    try:
        dm = DomainMixDataModule(tokenizer_dir=str(tok_dir), mixture="bts", seq_len=size.seq,
                                 batch_size=size.batch, num_train_samples=2400, val_blocks_per_domain=32, seed=0)
        t0 = time.perf_counter()
        dm.prepare_data()
        dm.setup("fit")
        setup_s = time.perf_counter() - t0
        tokens, t0 = 0, time.perf_counter()
        batches = 0
        for batch in dm.train_dataloader():
            tokens += batch["input_ids"].numel()
            batches += 1
        loop_s = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"tokenizer": source, "setup_s": setup_s, "batches": batches, "tokens": tokens,
            "tokens_per_s": tokens / loop_s}


# --------------------------------------------------------------------------------------------------- training
def bench_training(models, size: Size, autocast: torch.dtype | None = None) -> dict:
    """Reference stitch step vs the frozen baseline, plus the optimisation variants, all interleaved.

    ``autocast``: run every step (baseline included) under ``torch.autocast(dtype)`` (GPU check: bf16-mixed).
    """
    device = next(models[0].parameters()).device
    ids = random_ids(size).to(device)
    ref = make_stitched(models, size)
    fns = {
        "frozen": frozen_step_fn(models, ids, autocast),
        "stitch": stitch_step_fn(ref, ids, autocast=autocast),
    }
    compile_s = None
    for v in size.variants:
        if v == "ckpt":
            m = make_stitched(models, size, activation_checkpointing=True)
            fns["ckpt"] = stitch_step_fn(m, ids, autocast=autocast)
        elif v == "compile":
            step = stitch_step_fn(make_stitched(models, size, compile=True), ids, autocast=autocast)
            _sync()
            t0 = time.perf_counter()
            step()
            step()  # the first calls compile (forward + backward graphs of each layer class)
            _sync()
            compile_s = time.perf_counter() - t0
            fns["compile"] = step
        elif v == "e2h_before":
            fns["e2h_before"] = stitch_step_fn(use_e2h_before(make_stitched(models, size)), ids, autocast=autocast)
        elif v == "bf16_autocast":
            fns["bf16_autocast"] = stitch_step_fn(make_stitched(models, size), ids, autocast=torch.bfloat16)
    t = interleaved(fns, size.rounds, size.warmup)
    out = {
        "frozen_s": med(t["frozen"]),
        "stitch_s": med(t["stitch"]),
        "ratio": paired_ratio(t["stitch"], t["frozen"]),
        "target": "<= 1.10",
        "rounds": size.rounds,
        "variants": {},
    }
    for v in size.variants:
        out["variants"][v] = {
            "step_s": med(t[v]),
            "vs_reference": paired_ratio(t[v], t["stitch"]),
            "vs_frozen": paired_ratio(t[v], t["frozen"]),
        }
    if compile_s is not None:
        out["variants"]["compile"]["compile_s"] = compile_s
    # the stitch layers alone (forward + backward of all K layers on random hidden states)
    d = size.arch.hidden_size
    hs = [torch.randn(size.batch, size.seq, d, device=device, requires_grad=True) for _ in range(size.n_experts + 1)]

    def stitch_only():
        outs = hs
        for layer in ref.stitch_layers:
            outs = layer(outs)
        sum(o.sum() for o in outs).backward()

    before = use_e2h_before(make_stitched(models, size))

    def stitch_only_before():
        outs = hs
        for layer in before.stitch_layers:
            outs = layer(outs)
        sum(o.sum() for o in outs).backward()

    st = interleaved({"after": stitch_only, "before": stitch_only_before}, max(size.rounds, 5), 1)
    out["stitch_layers_only_s"] = med(st["after"])
    out["stitch_layers_only_before_s"] = med(st["before"])
    out["stitch_layers_after_vs_before"] = paired_ratio(st["after"], st["before"])
    out["stitch_layers_share"] = med(st["after"]) / out["stitch_s"]
    out["tokens_per_step"] = size.batch * size.seq
    return out


# --------------------------------------------------------------------------------------------------- report
def fmt(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def write_report(res: dict, path: Path) -> None:
    m = res["machine"]
    lines = [
        "# BTS benchmarks",
        "",
        f"Written by `.venv/bin/python benchmarks/bench_bts.py{res['argv']}` — one process, one run, "
        f"{res['date']}; wall time {res['wall_s']:.0f} s. Definitions: the docstring of `benchmarks/bench_bts.py`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']} — {m['cores']} cores visible, torch threads {m['torch_threads']} "
        f"({m.get('threads_reason', '')}); RAM {m['ram_gib']:.0f} GiB",
        f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, lightning {m['lightning']}",
        f"- load average (1/5/15 min) at start: {m['load_start']}; at end: {m['load_end']} "
        "(the machine is shared: other jobs ran at the same time, so absolute times are noisy; the ratios are "
        "medians of interleaved per-round ratios)",
        f"- measured fp32 matmul peak (`torch.mm` 2048², best of 5): {res['peak_gflops']:.1f} GFLOP/s",
        "",
        "## Summary",
        "",
        "| size | stitch step ÷ frozen fwd+bwd (target ≤ 1.10) | BTS gen tok/s ÷ sequential (target ≥ 0.8) | "
        "stitch-train peak-RSS delta ÷ dense fine-tune of one model | data tok/s ÷ training consumption | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res["sizes"].items():
        tr, gen = r["training"], r["generation"]
        mem = r.get("memory", {})
        mem_ratio = None
        if "stitch" in mem and "dense" in mem and "delta_mib" in mem["stitch"] and "delta_mib" in mem["dense"]:
            mem_ratio = mem["stitch"]["delta_mib"] / mem["dense"]["delta_mib"]
        data = r.get("data_vs_consumption")
        ok1 = "✅" if tr["ratio"] <= 1.10 else "❌"
        ok2 = "✅" if gen["ratio"] >= 0.8 else "❌"
        lines.append(
            f"| {name} | {tr['ratio']:.3f} {ok1} | {gen['ratio']:.3f} {ok2} | {fmt(mem_ratio, 2)} | "
            f"{fmt(data, 1)} | {100 * r['mfu']['stitch']:.1f} % |"
        )
    for name, r in res["sizes"].items():
        s = r["size"]
        a = s["arch"]
        tr, gen = r["training"], r["generation"]
        lines += [
            "",
            f"## {name}: d={a['hidden_size']}, L={a['num_hidden_layers']}, heads={a['num_attention_heads']} "
            f"(KV {a['num_key_value_heads']}), FFN={a['intermediate_size']}, vocab={a['vocab_size']}; "
            f"n={s['n_experts']} experts, K={s['k']}, batch {s['batch']} × seq {s['seq']}",
            "",
            "### Training step",
            "",
            f"- frozen n+1 models fwd+bwd alone: {tr['frozen_s'] * 1e3:.1f} ms/step (median of {tr['rounds']})",
            f"- BTS stitch-training step: {tr['stitch_s'] * 1e3:.1f} ms/step "
            f"({tr['tokens_per_step'] / tr['stitch_s']:.0f} tokens/s)",
            f"- **ratio {tr['ratio']:.3f}** (target ≤ 1.10: {'holds' if tr['ratio'] <= 1.10 else 'missed'})",
            f"- the K stitch layers alone (fwd+bwd on random states): {tr['stitch_layers_only_s'] * 1e3:.1f} ms "
            f"= {100 * tr['stitch_layers_share']:.1f} % of the step; with the pre-issue E2H math "
            f"{tr['stitch_layers_only_before_s'] * 1e3:.1f} ms (after ÷ before = {tr['stitch_layers_after_vs_before']:.2f})",
            f"- MFU: BTS {100 * r['mfu']['stitch']:.2f} % ({r['mfu']['stitch_gflop']:.1f} GFLOP/step, "
            f"{r['mfu']['stitch_gflops']:.1f} GFLOP/s); frozen baseline {100 * r['mfu']['frozen']:.2f} % "
            f"({r['mfu']['frozen_gflop']:.1f} GFLOP/step) — against {res['peak_gflops']:.1f} GFLOP/s",
            "",
            "### Generation",
            "",
            f"- batch {gen['batch']}, prompt {gen['prompt']}, {gen['new_tokens']} new tokens, greedy: BTS "
            f"{gen['bts_tok_s']:.1f} tok/s; n+1 models one after another {gen['sequential_tok_s']:.1f} tok/s",
            f"- **ratio {gen['ratio']:.3f}** (target ≥ 0.8: {'holds' if gen['ratio'] >= 0.8 else 'missed'})",
        ]
        mem = r.get("memory")
        if mem:
            lines += [
                "",
                "### Peak memory (CPU RSS, one subprocess each; delta = peak during 2 steps − RSS before them)",
                "",
                "| run | RSS before steps (MiB) | peak RSS (MiB) | delta (MiB) |",
                "|---|---|---|---|",
            ]
            for k, v in mem.items():
                if "error" in v:
                    lines.append(f"| {k} | error: {v['error']} | | |")
                else:
                    lines.append(f"| {k} | {v['rss_before_steps_mib']:.0f} | {v['peak_rss_mib']:.0f} | "
                                 f"{v['delta_mib']:.0f} |")
            st = mem.get("stitch", {})
            if "frozen_params_with_grad" in st:
                lines.append("")
                lines.append(
                    f"Stitch run: frozen params with `.grad`: {st['frozen_params_with_grad']}, requiring grad: "
                    f"{st['frozen_params_requiring_grad']}; optimizer state tensors: {st['optimizer_state_tensors']} "
                    f"(= stitch tensors {st['stitch_tensors']}, non-stitch {st['optimizer_state_non_stitch']})."
                )
        if "data" in r:
            dp = r["data"]
            lines += [
                "",
                "### Data pipeline",
                "",
                f"- `DomainMixDataModule` (mixture `bts`, tokenizer {dp['tokenizer']}): setup {dp['setup_s']:.2f} s, "
                f"then {dp['batches']} batches = {dp['tokens']} tokens at {dp['tokens_per_s']:.0f} tokens/s",
                f"- training consumes {tr['tokens_per_step'] / tr['stitch_s']:.0f} tokens/s → the loader is "
                f"**{r['data_vs_consumption']:.0f}×** faster than the step",
            ]
        if tr["variants"]:
            lines += [
                "",
                "### Optimisations (stitch step variants, interleaved with the reference)",
                "",
                "| variant | step (ms) | ÷ reference | ÷ frozen baseline | note |",
                "|---|---|---|---|---|",
            ]
            for v, d in tr["variants"].items():
                note = NOTES.get(v, "")
                if "compile_s" in d:
                    note += f" compile + first 2 steps: {d['compile_s']:.0f} s."
                if v == "ckpt" and mem and "stitch_ckpt" in mem and "delta_mib" in mem.get("stitch_ckpt", {}):
                    note += (f" Memory delta {mem['stitch_ckpt']['delta_mib']:.0f} MiB vs "
                             f"{mem['stitch']['delta_mib']:.0f} MiB without.")
                lines.append(f"| {v} | {d['step_s'] * 1e3:.1f} | {d['vs_reference']:.3f} | {d['vs_frozen']:.3f} | "
                             f"{note} |")
    if "lightning_check" in res:
        c = res["lightning_check"]
        lines += [
            "",
            "## Frozen parameters under Lightning",
            "",
            f"`StitchModule` fit 2 steps (tiny random family): frozen params {c['frozen_params']}, with `.grad`: "
            f"{c['frozen_params_with_grad']}; optimizer params {c['optimizer_params']}, state tensors "
            f"{c['optimizer_state_tensors']} (stitch tensors {c['stitch_tensors']}, non-stitch "
            f"{c['optimizer_state_non_stitch']}) → **{'OK' if c['ok'] else 'FAILED'}**.",
        ]
    lines += gpu_section(path.parent)
    lines += ["", "## Decisions", "", *decisions(res), ""]
    path.write_text("\n".join(lines))


NOTES = {
    "e2h_before": "**before** the E2H layout change: the pre-issue E2H math (softmax over the innermost model axis "
                  "+ einsum); the reference row is *after*.",
    "ckpt": "`StitchConfig(activation_checkpointing=True)`: frozen layers after the first stitch recomputed in "
            "backward.",
    "compile": "`StitchConfig(compile=True)`: every decoder layer and stitch layer through `torch.compile` (inductor).",
    "bf16_autocast": "`torch.autocast(bfloat16)` around the stitched forward only (on GPU: `precision: bf16-mixed`).",
}

def gpu_section(folder: Path) -> list[str]:
    """Results of ``benchmarks/gpu_check.py`` saved beside the report as ``gpu_check_<card>.json`` (run separately)."""
    lines = []
    for f in sorted(folder.glob("gpu_check_*.json")):
        try:
            g = json.loads(f.read_text())
        except ValueError:
            continue
        lines += [
            "",
            f"## GPU: {g.get('device')} (`{f.name}`, from `benchmarks/gpu_check.py`, a separate run)",
            "",
            f"torch {g.get('torch')}, CUDA {g.get('cuda')}, {g.get('precision')}; batch 16 × seq 128 at both sizes. "
            "Peak memory = `torch.cuda.max_memory_allocated` of 2 steps above the memory held before them.",
            "",
            "| size | stitch ÷ frozen step | gen tok/s ratio | step before ÷ after E2H layout | stitch layers before → after "
            "(ms) | ckpt time | peak MiB frozen / stitch / stitch+ckpt / dense one model |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in g.get("sizes", {}).items():
            if not isinstance(r, dict) or "step_ratio" not in r:
                continue
            v, m = r["variants_vs_reference"], r["peak_mem_mib"]
            lines.append(
                f"| {name} | {r['step_ratio']:.3f} | {r['gen_ratio']:.3f} | {v.get('e2h_before', float('nan')):.3f} | "
                f"{r['stitch_layers_before_ms']:.1f} → {r['stitch_layers_ms']:.1f} | ×{v.get('ckpt', float('nan')):.2f} "
                f"| {m['frozen']:.0f} / {m['stitch']:.0f} / {m['stitch_ckpt']:.0f} / {m['dense']:.0f} |"
            )
        lb, fb, fe = g.get("lightning_bf16", {}), g.get("fsdp_bts", {}), g.get("fsdp_expert", {})
        if "steps" in lb:
            lines.append(
                f"\n- Lightning `bf16-mixed` `StitchModule` fit: {lb['steps']} steps, loss finite {lb['loss_finite']}, "
                f"frozen bit-identical {lb['frozen_bit_identical']}, stitch trained {lb['stitch_trained']} "
                f"(dtypes {', '.join(lb['stitch_dtypes'])}), optimizer state tensors {lb['optimizer_state_tensors']}"
            )
        if "steps" in fb:
            lines.append(
                f"- `configs/bts/fsdp_gpu.yaml` on 1 GPU: {fb['fsdp_units']} FSDP units ({', '.join(fb['unit_types'])}); "
                f"units holding trainable parameters: {', '.join(fb['units_with_trainable_params'])}; {fb['steps']} "
                f"steps, frozen bit-identical {fb.get('frozen_bit_identical')}, stitch trained {fb.get('stitch_trained')}"
            )
        if "steps" in fe:
            lines.append(
                f"- `configs/experts/fsdp_gpu.yaml` on 1 GPU: {fe['fsdp_units']} FSDP units, {fe['steps']} steps, "
                f"weights changed {fe.get('weights_changed')}/{fe.get('weights_total')}"
            )
    return lines


def decisions(res: dict) -> list[str]:
    """The keep / opt-in / drop verdict of every optimisation, with the numbers it rests on."""

    def variant(v):
        return [(n, r["training"]["variants"][v]) for n, r in res["sizes"].items() if v in r["training"]["variants"]]

    def mem(name, kind):
        m = res["sizes"][name].get("memory", {}).get(kind, {})
        return m.get("delta_mib")

    out = [
        "- **Already fused before this issue** (kept): the n expert projections are one stacked `[n, d, d]` tensor "
        "applied with one `bmm` (E2H) / one `F.linear` over `[n·d, d]` (H2E); the gate is one "
        "`Linear(d, (n+1)·d)`; attention is HF SDPA (flash kernel on CPU); nothing below the first stitch layer "
        "is recorded for backward (no input there needs a gradient).",
    ]
    eb = variant("e2h_before")
    if eb:
        parts = []
        for n, d in eb:
            tr = res["sizes"][n]["training"]
            parts.append(f"{n}: K stitch layers fwd+bwd ×{tr['stitch_layers_after_vs_before']:.2f}, whole step "
                         f"×{1 / d['vs_reference']:.2f}")
        out.append(
            "- **E2H gate layout** (`bts/stitch/layer.py`, **kept**, after ÷ before): " + "; ".join(parts) + ". The E2H "
            "softmax now runs with the model axis outside the hidden axis (a transposed view of the same logits: "
            "same dropout mask, same weights layout) and the mixing is a broadcast multiply + sum instead of an "
            "einsum that ran B·T·d tiny matmuls. Equal to the old formula within fp32 round-off "
            "(`tests/test_scale.py`)."
        )
    ck = variant("ckpt")
    if ck:
        parts = []
        for n, d in ck:
            a, b = mem(n, "stitch_ckpt"), mem(n, "stitch")
            m = f", training-memory delta {a:.0f} vs {b:.0f} MiB ({100 * (1 - a / b):.0f} % less)" if a and b else ""
            parts.append(f"{n}: time ×{d['vs_reference']:.2f}{m}")
        out.append(
            "- **Activation checkpointing of the frozen blocks** — `StitchConfig(activation_checkpointing=True)`, "
            "**opt-in, default off**: " + "; ".join(parts) + ". It costs time (one extra forward of every frozen "
            "layer after the first stitch layer) and pays in memory, so it is for memory-bound runs (long sequences, "
            "big experts: `configs/bts/scale/paper_2p7b.yaml` turns it on). Runtime-only: absent from stitch "
            "manifests unless on."
        )
    co = variant("compile")
    if co:
        parts = [f"{n}: time ×{d['vs_reference']:.2f}; compile + first 2 steps {d.get('compile_s', float('nan')):.0f} s"
                 for n, d in co]
        out.append(
            "- **`torch.compile`** — `StitchConfig(compile=True)`, **opt-in, default off**: " + "; ".join(parts)
            + " (with inductor's on-disk cache from earlier runs; a cold compile took ~60 s on this machine under "
            "load). Pays only when the run is long enough to amortise the compile (and on GPU, where launch overhead "
            "matters more); cached generation stays eager. Compiling the whole `StitchedLM` as one graph instead "
            "(`torch.compile(model)`) took ~4 min to compile on this machine and was not pursued."
        )
    bf = variant("bf16_autocast")
    if bf:
        parts = [f"{n}: time ×{d['vs_reference']:.2f}" for n, d in bf]
        out.append(
            "- **bf16 autocast** on this CPU: " + "; ".join(parts) + " — not used on CPU. On GPU it is Lightning's "
            "`precision: bf16-mixed` (all GPU configs; `benchmarks/gpu_check.py` measures it); the stitch layer "
            "computes in its weights' dtype and returns the input dtype."
        )
    out.append(
        "- **`StitchedLM.generate`** no longer toggles train/eval mode when the model is already in eval mode "
        "(each toggle walks every submodule of the n+1 models: ~3 % of a 32-token batch-1 decode at the tiny size)."
    )
    return out


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,d512", help="comma list of: " + ", ".join(SIZES))
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--variants", default=None, help="override the optimisation variants (comma list, '' = none)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 = auto: all cores on an idle machine, else the cores left free by the "
                         "1-min load average (at least 1) — OpenMP threads that wait for a busy core make timings "
                         "meaningless")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the report from the results.json beside --out (no measurement)")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    load1 = float(load_average().split()[0]) if load_average() != "n/a" else 0.0
    cores = os.cpu_count() or 1
    threads = args.threads or (cores if load1 < 0.5 else max(1, cores - math.ceil(load1)))
    torch.set_num_threads(threads)
    if args.mem_child:
        print(json.dumps(mem_child(args.mem_child, args.sizes, args.quick)))
        return 0

    if args.render:
        out = Path(args.out)
        write_report(json.loads(out.with_name("results.json").read_text()), out)
        print(f"wrote {out}")
        return 0
    import lightning
    import transformers

    t_start = time.perf_counter()
    res = {
        "argv": "".join(" " + a for a in (argv if argv is not None else sys.argv[1:])),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "threads_reason": (f"--threads {args.threads}" if args.threads else
                               f"auto: 1-min load {load1:.2f} at start → " + ("all cores" if load1 < 0.5 else
                               "the cores it leaves free, at least 1")),
            "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
            "load_start": load_average(),
        },
        "sizes": {},
    }
    res["peak_gflops"] = matmul_peak() / 1e9
    print(f"fp32 matmul peak {res['peak_gflops']:.1f} GFLOP/s; load {load_average()}", flush=True)
    data = None
    for name in args.sizes.split(","):
        size = SIZES[name]
        if args.quick:
            size = quick(size)
        if args.variants is not None:
            size = replace(size, variants=[v for v in args.variants.split(",") if v])
        torch.manual_seed(0)
        models = build_family(size)
        r = {"size": {**asdict(size), "arch": asdict(size.arch)}}
        print(f"[{name}] training ...", flush=True)
        r["training"] = tr = bench_training(models, size)
        print(f"[{name}] ratio {tr['ratio']:.3f}; load {load_average()}", flush=True)
        fl_s, fl_f = flops_stitch_step(size), flops_frozen_step(size)
        peak = res["peak_gflops"] * 1e9
        r["mfu"] = {
            "stitch_gflop": fl_s / 1e9,
            "frozen_gflop": fl_f / 1e9,
            "stitch_gflops": fl_s / tr["stitch_s"] / 1e9,
            "stitch": fl_s / tr["stitch_s"] / peak,
            "frozen": fl_f / tr["frozen_s"] / peak,
        }
        print(f"[{name}] generation ...", flush=True)
        r["generation"] = bench_generation(models, size)
        print(f"[{name}] gen ratio {r['generation']['ratio']:.3f}", flush=True)
        del models
        if data is None or data["_seq"] != (size.batch, size.seq):
            print(f"[{name}] data pipeline ...", flush=True)
            try:
                data = {**data_pipeline(size), "_seq": (size.batch, size.seq)}
            except Exception as e:  # noqa: BLE001 - report, do not abort the run
                data = {"error": f"{type(e).__name__}: {e}", "_seq": (size.batch, size.seq)}
        if "error" not in data:
            r["data"] = {k: v for k, v in data.items() if k != "_seq"}
            r["data_vs_consumption"] = data["tokens_per_s"] / (tr["tokens_per_step"] / tr["stitch_s"])
        else:
            r["data_error"] = data["error"]
        if not args.no_memory:
            r["memory"] = {}
            kinds = ["frozen", "stitch", "dense"] + (["stitch_ckpt"] if "ckpt" in size.variants else [])
            for kind in kinds:
                print(f"[{name}] memory {kind} ...", flush=True)
                r["memory"][kind] = measure_memory(kind, name, args.quick)
        res["sizes"][name] = r
    print("lightning frozen-state check ...", flush=True)
    res["lightning_check"] = lightning_frozen_check()
    res["machine"]["load_end"] = load_average()
    res["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    write_report(res, out)
    out.with_name("results.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
