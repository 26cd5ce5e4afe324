"""What trains runs in train mode: a Hugging Face model loads in eval mode and Lightning keeps each module's mode, so
an expert continued from the seed must be switched to train mode (its dropout on); frozen models stay in eval mode."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from bts.dense.module import CausalLMModule
from bts.stitch.module import StitchModule
from conftest import perturbed_copy, tiny_llama


def _with_dropout(seed: int = 0):
    m = tiny_llama(seed, layers=2)
    m.config.attention_dropout = 0.1
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.1
    return m


def _fit(module) -> dict:
    seen = {}
    step = module.training_step

    def recording_step(batch, batch_idx):
        seen["modules"] = {name: m.training for name, m in module.named_modules()}
        return step(batch, batch_idx)

    module.training_step = recording_step
    batches = [{"input_ids": torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return seen["modules"]


def test_an_expert_continues_pretraining_in_train_mode(tmp_path):
    _with_dropout().save_pretrained(tmp_path / "seed")
    module = CausalLMModule(init_from=str(tmp_path / "seed"), warmup_steps=0, freeze=["embeddings", "head"])
    assert not module.model.training  # as loaded
    modes = _fit(module)
    assert all(modes.values()), [n for n, t in modes.items() if not t]
    assert module.model.model.layers[0].self_attn.attention_dropout == 0.1


def test_stitching_trains_the_stitch_layers_with_the_frozen_models_in_eval_mode(tmp_path):
    seed = _with_dropout()
    seed.save_pretrained(tmp_path / "seed")
    perturbed_copy(seed, 1).save_pretrained(tmp_path / "expert_code")
    module = StitchModule(hub=str(tmp_path / "seed"), experts=[str(tmp_path / "expert_code")],
                          stitch={"num_stitch_layers": 2, "gate_dropout": 0.1}, warmup_steps=0)
    modes = _fit(module)
    frozen = [n for n in modes if n.startswith("model.models.")]
    stitch = [n for n in modes if n.startswith("model.stitch_layers")]
    assert frozen and stitch
    assert not any(modes[n] for n in frozen) and all(modes[n] for n in stitch)
