"""`bts gates`: the gate analysis of a trained BTS checkpoint (``bts.stitch.gates``) from the command line.

``bts gates --ckpt runs/tiny/bts --out results/tiny [--tensorboard DIR]``. Only light imports at the top (the
analysis imports torch and matplotlib): ``--help`` and an unwritable ``--out`` are answered before anything loads.
"""

from __future__ import annotations

from pathlib import Path

from bts.core.io import writable_target


def gates_command(ckpt: str, out: str, tokenizer: str | None = None, tensorboard: str | None = None,
                  n_prompts: int = 8, seed: int = 0, max_tokens: int = 128, n_switch: int = 4,
                  domains: str | None = None, cache_dir: str | None = None, device: str | None = None,
                  allow_changed_models: bool = False) -> int:
    """gate analysis of a trained BTS checkpoint: which model the hub listens to, token by token

    Per-token E2H gate weights (paper §4.3) on prompts of each domain and on context-switching prompts; writes
    <out>/gates.json and <out>/figures/gates_*.png (other files in <out> are kept).

    Args:
        ckpt: trained stitch checkpoint directory (artifact.json kind 'bts', bts.json + stitch.safetensors)
        out: results directory (gates.json, figures/)
        tokenizer: tokenizer directory (default: --ckpt, which holds the training tokenizer)
        tensorboard: also write the figures and mean gates to TensorBoard under this directory
        n_prompts: prompts per domain
        seed: prompt-selection seed
        max_tokens: tokens per domain prompt
        n_switch: context-switching prompts
        domains: comma-separated domains (default: general,code,math,multilingual)
        cache_dir: data cache directory (bts.data)
        device: torch device (default: cuda if available, else cpu)
        allow_changed_models: use frozen models whose weights differ from the checkpoint manifest
    """
    writable_target(out, "--out")  # before the models load
    if tensorboard:
        writable_target(tensorboard, "--tensorboard")
    from bts.stitch.gates.analysis import analyze

    chosen = [d.strip() for d in domains.split(",") if d.strip()] if domains else None
    result = analyze(ckpt, tokenizer or ckpt, out, n_prompts=n_prompts, seed=seed, cache_dir=cache_dir,
                     tb_log_dir=tensorboard, max_tokens=max_tokens, n_switch=n_switch, domains=chosen, device=device,
                     allow_changed_models=allow_changed_models)
    print(result["markdown"], end="")
    print(f"wrote {Path(out) / 'gates.json'} and {len(result['figures'])} figures in {Path(out) / 'figures'}")
    return 0
