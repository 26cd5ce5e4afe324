"""Helpers for tests that run `bts fit` end to end on tiny synthetic inputs (no embedded corpus build):
local JSONL corpora for two domains (``hf`` sources with ``path: json``), a small BPE tokenizer, tiny Llama
Hugging Face directories and Lightning CLI configs written to a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

DOMAINS = ("general", "code")


def texts(domain: str, n: int) -> list[str]:
    if domain == "general":
        return [f"Paragraph {i}: the committee met on day {i} and discussed the harbour, the bridge and rain."
                for i in range(n)]
    return [f"def f{i}(a, b):\n    if a > {i}:\n        return a - b\n    return a + b\n" for i in range(n)]


def write_corpus(root: Path, n: int = 300) -> dict[str, dict]:
    """JSONL files per domain; returns the datamodule's ``sources`` mapping."""
    root.mkdir(parents=True, exist_ok=True)
    sources = {}
    for d in DOMAINS:
        p = root / f"{d}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(d, n)), encoding="utf-8")
        sources[d] = {"kind": "hf", "path": "json", "data_files": str(p)}
    return sources


def write_tokenizer(out: Path, vocab_size: int = 300):
    from bts.data.tokenizer import build_tokenizer

    tok = build_tokenizer([t for d in DOMAINS for t in texts(d, 100)], vocab_size=vocab_size)
    tok.save_pretrained(str(out))
    return tok


def save_llama(out: Path, seed: int = 0, vocab: int = 300, d: int = 32, layers: int = 4, noise: float = 0.0):
    from conftest import perturbed_copy, tiny_llama

    m = tiny_llama(seed, vocab=vocab, d=d, layers=layers)
    if noise:
        m = perturbed_copy(m, seed + 100, noise)
    m.save_pretrained(out)
    return out


def data_config(root: Path, tok_dir: Path, sources: dict, **kw) -> dict:
    init = {"tokenizer_dir": str(tok_dir), "mixture": {"general": 0.5, "code": 0.5}, "seq_len": 16,
            "batch_size": 4, "num_train_samples": 64, "val_blocks_per_domain": 2,
            "eval_domains": ["general", "code"], "seed": 0, "num_workers": 0,
            "cache_dir": str(root / "cache"), "sources": sources}
    init.update(kw)
    return {"class_path": "bts.data.DomainMixDataModule", "init_args": init}


def trainer_config(root: Path, max_steps: int = 2, callbacks: list | None = None, **kw) -> dict:
    cfg = {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
           "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
           "limit_val_batches": 0, "default_root_dir": str(root / "logs"), "callbacks": callbacks or []}
    cfg.update(kw)
    return cfg


def write_config(path: Path, model: dict, data: dict, trainer: dict, seed: int = 0) -> Path:
    path.write_text(yaml.safe_dump({"seed_everything": seed, "trainer": trainer, "model": model, "data": data},
                                   sort_keys=False))
    return path
