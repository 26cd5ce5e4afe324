"""The dense training module: training lowers the loss, the artifact is a HF directory, branching is exact."""

from __future__ import annotations

import json

import lightning as L
import torch
from torch.utils.data import DataLoader

from bts.core.io import state_dict_sha256
from bts.dense.modeling import LlamaArch, load_causal_lm
from bts.dense.module import CausalLMModule

ARCH = LlamaArch(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)


def _loader(n=32, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A learnable pattern: arithmetic sequences mod 64.
    starts = torch.randint(0, 64, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, 1), generator=g)
    ids = (starts + steps * torch.arange(T)) % 64
    return DataLoader([{"input_ids": row} for row in ids], batch_size=8, shuffle=False)


def _trainer(steps, **kw):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def _mean_loss(module, loader):
    module.eval()
    with torch.no_grad():
        return sum(module.lm_loss(b["input_ids"]).item() for b in loader) / len(loader)


def test_training_lowers_loss_and_writes_hf_dir(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(arch=ARCH, lr=1e-2, warmup_steps=2, output_dir=str(tmp_path / "seed"))
    loader = _loader()
    before = _mean_loss(module, loader)
    _trainer(30).fit(module, train_dataloaders=loader)
    after = _mean_loss(module, loader)
    assert after < before - 0.5, (before, after)
    out = tmp_path / "seed"
    assert (out / "model.safetensors").is_file() and (out / "training.json").is_file()
    assert json.loads((out / "training.json").read_text())["freeze"] == []  # the parts kept frozen, as configured
    reloaded = load_causal_lm(out)
    assert state_dict_sha256(reloaded.state_dict()) == state_dict_sha256(module.model.state_dict())


def test_branching_copies_the_seed_exactly(tmp_path):
    seed = CausalLMModule(arch=ARCH)
    seed.model.save_pretrained(tmp_path / "seed")
    expert = CausalLMModule(init_from=str(tmp_path / "seed"))
    assert state_dict_sha256(expert.model.state_dict()) == state_dict_sha256(seed.model.state_dict())
    x = torch.randint(0, 64, (2, 12))
    assert torch.equal(expert(x), seed(x))


def test_validation_logs_per_domain_perplexity():
    module = CausalLMModule(arch=ARCH)
    trainer = _trainer(1)
    metrics = trainer.validate(module, dataloaders=[_loader(8)], verbose=False)[0]
    assert "val/all/ppl" in metrics and metrics["val/all/ppl"] > 1.0


def test_lightning_checkpoint_resumes_with_weights_only(tmp_path):
    module = CausalLMModule(arch=ARCH, lr=1e-2, warmup_steps=2)
    ckpt_dir = tmp_path / "ckpt"
    cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=2, save_top_k=0)
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[cb], enable_progress_bar=False,
              enable_model_summary=False).fit(module, train_dataloaders=_loader())
    resumed = CausalLMModule(arch=ARCH, lr=1e-2, warmup_steps=2)
    trainer = _trainer(6)
    trainer.fit(resumed, train_dataloaders=_loader(), ckpt_path=str(ckpt_dir / "last.ckpt"), weights_only=True)
    assert trainer.global_step == 6


def test_gradient_clipping_under_fsdp_uses_the_root_modules_collective_clip():
    from types import SimpleNamespace
    from unittest import mock

    from lightning.pytorch.strategies import FSDPStrategy

    module = CausalLMModule(arch=ARCH)
    root = mock.Mock()
    module.trainer = SimpleNamespace(strategy=FSDPStrategy(), model=root)
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    root.clip_grad_norm_.assert_called_once_with(0.5)
