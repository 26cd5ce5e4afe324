"""Shared hermetic fixtures: tiny random Hugging Face decoders built in-process (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama(seed: int = 0, vocab: int = 97, d: int = 32, layers: int = 4, ffn: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, vocab: int = 97, d: int = 32, layers: int = 4, ffn: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


def perturbed_copy(model, seed: int, scale: float = 0.02):
    """A 'branched expert': the model's weights plus seeded noise (same architecture)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def fit_random_batches(module, steps: int = 2, batch: int = 4, seq: int = 16, vocab: int = 97) -> None:
    """A few Lightning training steps of ``module`` on seeded random token batches (no validation, no logging)."""
    import lightning as L
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)} for _ in range(steps)]
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              limit_val_batches=0).fit(module, train_dataloaders=DataLoader(data, batch_size=None))


@pytest.fixture
def llama_family():
    """A seed and three experts branched from it (tiny Llama)."""
    seed = tiny_llama(0)
    return seed, [perturbed_copy(seed, s) for s in (1, 2, 3)]


@pytest.fixture
def saved_llama_family(tmp_path, llama_family):
    """The same family saved as Hugging Face directories: (seed_dir, [expert_dirs])."""
    seed, experts = llama_family
    seed_dir = tmp_path / "seed"
    seed.save_pretrained(seed_dir)
    dirs = []
    for i, e in enumerate(experts):
        d = tmp_path / f"expert{i}"
        e.save_pretrained(d)
        dirs.append(d)
    return seed_dir, dirs


# A test that skips is a test that does not exist: with BTS_FAIL_ON_SKIP=1 (set by .ci/run) a skipped test that is
# not marked `gpu` fails the session, so a parity test can never silently disappear from CI.
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("BTS_FAIL_ON_SKIP") == "1" and _SKIPPED and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("BTS_FAIL_ON_SKIP") == "1" and _SKIPPED:
        terminalreporter.write_line(f"error: {len(_SKIPPED)} test(s) skipped outside the gpu marker "
                                    f"(BTS_FAIL_ON_SKIP=1): " + ", ".join(_SKIPPED[:10]), red=True)
