#!/usr/bin/env python
"""GPU check for BTS (one CUDA device, < 3 min). Prints ONE JSON line with every result (errors included).

    .venv/bin/python benchmarks/gpu_check.py              # on a CUDA machine, from the repository root
    .venv/bin/python benchmarks/gpu_check.py --no-compile # skip the torch.compile variant (~1 min of compiling)
    .venv/bin/python benchmarks/gpu_check.py --allow-cpu  # dry run of the code paths on CPU (no FSDP part)
    .venv/bin/python benchmarks/gpu_check.py --sizes smol --only-sizes  # SmolLM2 shape only (~2-3 min)

Sections (each one is timed and catches its own errors, so one failure does not hide the others):

* ``sizes.tiny`` / ``sizes.d512``: the benchmarks of ``benchmarks/bench_bts.py`` on the GPU under bf16 autocast
  (what Lightning's ``precision: bf16-mixed`` does): stitch step ÷ frozen n+1 models fwd+bwd (target ≤ 1.10), the
  variants (pre-issue E2H math, activation checkpointing, ``StitchConfig(compile=True)`` on tiny), the K stitch
  layers alone before/after, cached generation tok/s ratio (target ≥ 0.8), peak memory from
  ``torch.cuda.max_memory_allocated`` (above the memory held before the steps) for the frozen baseline, stitch
  training (± checkpointing) and a dense fine-tune of one model, and MFU against a measured bf16 matmul peak.
* ``sizes.smol``: SmolLM2-135M shape, the training-loop levers one at a time (``benchmarks/bench_smol.py``):
  ``expert_mfu`` (dense continued pretraining), ``mfu`` (the BTS step), ``eval_mfu`` and Lightning's overhead.
* ``lightning_bf16``: ``StitchModule`` fit a few steps with ``Trainer(accelerator="gpu", precision="bf16-mixed")``:
  finite loss, frozen weights bit-identical, stitch weights trained and still fp32, no ``.grad`` on frozen params.
* ``fsdp_bts`` / ``fsdp_expert``: ``configs/bts/fsdp_gpu.yaml`` and ``configs/experts/fsdp_gpu.yaml`` parsed by the
  ``bts`` CLI (devices=1, tiny random models saved to a temp dir), the FSDP wrapping inspected (units, which hold
  trainable parameters) and fit for 3 steps; frozen weights checked under ``summon_full_params``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import bench_bts as B  # noqa: E402
import bench_smol  # noqa: E402
import torch  # noqa: E402

T_START = time.perf_counter()


def _round(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def section(results: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - report and continue
        results[name] = {"error": f"{type(e).__name__}: {e}"[:600], "trace": traceback.format_exc()[-2000:]}
    results[name + "_s"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {results[name + '_s']} s", file=sys.stderr, flush=True)


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- benchmarks
def peak_memory(kind: str, models, size, dtype, device) -> dict:
    """Peak allocated GPU memory of 2 training steps above what was allocated before them (MiB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ids = B.random_ids(size).to(device)
    extra = None
    if kind == "frozen":
        step = B.frozen_step_fn(models, ids, dtype)
    elif kind in ("stitch", "stitch_ckpt"):
        step = B.stitch_step_fn(B.make_stitched(models, size, activation_checkpointing=kind == "stitch_ckpt"), ids,
                                autocast=dtype)
    else:  # dense fine-tune of one model (all weights trainable, AdamW)
        extra = copy.deepcopy(models[0])
        step = B.dense_step_fn(extra, ids, dtype)
    if device.type != "cuda":
        step()
        return {"mib": None}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    step()
    torch.cuda.synchronize()
    out = {"mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "held_before_mib": base / 2**20}
    del step, extra
    return out


def bench_size(name: str, device, dtype, compile_ok: bool) -> dict:
    size = B.SIZES[name]
    variants = ["e2h_before", "ckpt"] + (["compile"] if compile_ok and name == "tiny" else [])
    size = replace(size, batch=16, rounds=10, warmup=3, gen_rounds=5, variants=variants)
    torch.manual_seed(0)
    models = [m.to(device) for m in B.build_family(size)]
    tr = B.bench_training(models, size, autocast=dtype)
    gen = B.bench_generation(models, size, autocast=dtype)
    mem = {k: peak_memory(k, models, size, dtype, device) for k in ("frozen", "stitch", "stitch_ckpt", "dense")}
    flops = B.flops_stitch_step(size)
    peak = B.matmul_peak(8192 if device.type == "cuda" else 1024, 5, str(device), dtype or torch.float32)
    out = {
        "step_ratio": tr["ratio"],
        "step_target_holds": tr["ratio"] <= 1.10,
        "frozen_ms": tr["frozen_s"] * 1e3,
        "stitch_ms": tr["stitch_s"] * 1e3,
        "stitch_layers_ms": tr["stitch_layers_only_s"] * 1e3,
        "stitch_layers_before_ms": tr["stitch_layers_only_before_s"] * 1e3,
        "variants_vs_reference": {v: d["vs_reference"] for v, d in tr["variants"].items()},
        "compile_s": tr["variants"].get("compile", {}).get("compile_s"),
        "gen_ratio": gen["ratio"],
        "gen_target_holds": gen["ratio"] >= 0.8,
        "gen_bts_tok_s": gen["bts_tok_s"],
        "gen_sequential_tok_s": gen["sequential_tok_s"],
        "peak_mem_mib": {k: v["mib"] for k, v in mem.items()},
        "mfu": flops / tr["stitch_s"] / peak,
        "matmul_peak_tflops": peak / 1e12,
    }
    del models
    return out


# --------------------------------------------------------------------------------------------------- Lightning
def save_family(tmp: Path, arch, n_experts: int = 3) -> list[str]:
    from bts.dense.modeling import build_llama

    dirs = []
    for i in range(n_experts + 1):
        d = tmp / f"m{i}"
        build_llama(arch, seed=i).save_pretrained(d)
        dirs.append(str(d))
    return dirs


def loader(vocab: int, n: int = 64, t: int = 128, batch: int = 16):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, vocab, (t,), generator=g)} for _ in range(n)]
    return DataLoader(rows, batch_size=batch)


def lightning_bf16(device) -> dict:
    import lightning as L

    from bts.dense.modeling import LlamaArch
    from bts.stitch.model import StitchConfig
    from bts.stitch.module import StitchModule

    arch = LlamaArch()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_family(Path(tmp), arch)
        module = StitchModule(hub=dirs[0], experts=dirs[1:], stitch=StitchConfig(), warmup_steps=1)
        frozen = {f"{i}.{k}": sha(v) for i, m in enumerate(module.model.models) for k, v in m.state_dict().items()}
        stitch0 = {k: v.clone() for k, v in module.model.stitch_state_dict().items()}
        steps = 10
        trainer = L.Trainer(max_steps=steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            precision="bf16-mixed", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader(arch.vocab_size))
        fit_s = time.perf_counter() - t0
        after = {f"{i}.{k}": sha(v) for i, m in enumerate(module.model.models) for k, v in m.state_dict().items()}
        loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
        return {
            "steps": int(trainer.global_step),
            "fit_s": fit_s,
            "ms_per_step_incl_warmup": fit_s / max(1, trainer.global_step) * 1e3,
            "loss": loss,
            "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
            "frozen_bit_identical": after == frozen,
            "frozen_with_grad": sum(p.grad is not None for m in module.model.models for p in m.parameters()),
            "stitch_trained": all(not torch.equal(v.cpu(), stitch0[k].cpu())
                                  for k, v in module.model.stitch_state_dict().items()),
            "stitch_dtypes": sorted({str(p.dtype) for p in module.model.stitch_layers.parameters()}),
            "optimizer_state_tensors": len(trainer.optimizers[0].state),
        }


def fsdp_run(config: str, kind: str) -> dict:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from bts.cli.lightning import run_lightning
    from bts.dense.modeling import LlamaArch

    arch = LlamaArch()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = save_family(tmp, arch)
        args = ["--config", str(ROOT / config), "--trainer.devices", "1", "--trainer.logger", "false",
                "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp / "root"),
                "--trainer.enable_progress_bar", "false", "--model.init_args.output_dir", "null"]
        if kind == "bts":
            args += ["--model.init_args.hub", dirs[0], "--model.init_args.experts", json.dumps(dirs[1:])]
        else:
            args += ["--model.init_args.init_from", dirs[0]]
        cli = run_lightning(args, run=False)
        module, trainer = cli.model, cli.trainer
        assert isinstance(trainer.strategy, FSDPStrategy), type(trainer.strategy)
        inner = module.model
        if kind == "bts":
            frozen_before = {f"{i}.{k}": sha(v) for i, m in enumerate(inner.models) for k, v in m.state_dict().items()}
            stitch_before = {k: sha(v) for k, v in inner.stitch_state_dict().items()}
        else:
            dense_before = {k: sha(v) for k, v in inner.state_dict().items()}
        trainer.fit(module, train_dataloaders=loader(arch.vocab_size))
        units = [m for m in trainer.model.modules() if isinstance(m, FSDP)]

        def flat_requires_grad(unit) -> bool:  # the unit's own (flat) parameter, without nested units
            handle = getattr(unit, "_handle", None)
            return bool(handle is not None and handle.flat_param.requires_grad)

        trainable_units = [type(u.module).__name__ for u in units if flat_requires_grad(u)]
        out = {
            "steps": int(trainer.global_step),
            "fsdp_units": len(units),
            "unit_types": sorted({type(u.module).__name__ for u in units}),
            "units_with_trainable_params": sorted(set(trainable_units)),
            "loss": float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan")))),
        }
        with FSDP.summon_full_params(trainer.model):
            if kind == "bts":
                out["frozen_bit_identical"] = frozen_before == {
                    f"{i}.{k}": sha(v) for i, m in enumerate(inner.models) for k, v in m.state_dict().items()}
                after = {k: sha(v) for k, v in inner.stitch_state_dict().items()}
                out["stitch_trained"] = all(after[k] != v for k, v in stitch_before.items())
                out["frozen_with_grad"] = sum(p.grad is not None for m in inner.models for p in m.parameters())
            else:
                after = {k: sha(v) for k, v in inner.state_dict().items()}
                out["weights_changed"] = sum(after[k] != v for k, v in dense_before.items())
                out["weights_total"] = len(dense_before)
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out


# --------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--allow-cpu", action="store_true", help="dry run on CPU (fp32/bf16 autocast, no FSDP)")
    ap.add_argument("--sizes", default="tiny,d512", help="comma-separated: tiny, d512, smol (SmolLM2-135M shape)")
    ap.add_argument("--only-sizes", action="store_true", help="skip the Lightning and FSDP sections")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(json.dumps({"error": "no CUDA device (use --allow-cpu for a dry run)"}))
        return 1
    device = torch.device("cuda" if cuda else "cpu")
    import lightning
    import transformers

    res: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "precision": "bf16-mixed (torch.autocast bfloat16)",
    }
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    res["sizes"] = {}
    for name in args.sizes.split(","):
        if name == "smol":  # SmolLM2-135M shape: the training-loop levers as MFU (benchmarks/bench_smol.py)
            section(res["sizes"], name, lambda: bench_smol.bench_smol(device, compile_ok=not args.no_compile))
            continue
        # compile only while the budget allows (it is the slowest part)
        compile_ok = not args.no_compile and time.perf_counter() - T_START < 60
        section(res["sizes"], name, lambda name=name, c=compile_ok: bench_size(name, device, torch.bfloat16, c))
    if args.only_sizes:
        res["wall_s"] = time.perf_counter() - T_START
        print(json.dumps(_round(res), default=str))
        return 0
    section(res, "lightning_bf16", lambda: lightning_bf16(device))
    if cuda:
        section(res, "fsdp_bts", lambda: fsdp_run("configs/bts/fsdp_gpu.yaml", "bts"))
        section(res, "fsdp_expert", lambda: fsdp_run("configs/experts/fsdp_gpu.yaml", "expert"))
    res["wall_s"] = time.perf_counter() - T_START
    print(json.dumps(_round(res), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
