"""Progress lines where no bar shows progress (bts.training.progress), and the parallel pipeline's heartbeat source."""

from __future__ import annotations

import io
import re

import lightning as L
import torch
from torch.utils.data import DataLoader

from bts.dense.modeling import LlamaArch
from bts.dense.module import CausalLMModule
from bts.pipeline.scheduler import _last_progress
from bts.training.progress import ProgressLog, _duration


def _fit(progress_bar: bool, steps: int = 4) -> str:
    stream = io.StringIO()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 64, (12,), generator=g)} for _ in range(16)]
    module = CausalLMModule(arch=LlamaArch(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2), warmup_steps=1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress_bar, enable_model_summary=False,
                        callbacks=[ProgressLog(every_s=3600, stream=stream)])
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=4))
    return stream.getvalue()


def test_first_and_last_step_lines_with_loss_throughput_and_eta():
    lines = _fit(progress_bar=False).splitlines()
    assert len(lines) == 2  # step 1, then (every_s = 1 h) only the last step
    first, last = lines
    assert re.match(r"\[CausalLMModule\] step 1/4 \(25%\) loss \d+\.\d{4} [\d,]+ tokens/s MFU [\d.]+% elapsed \S+ "
                    r"eta \S+$", first), first
    assert last.startswith("[CausalLMModule] step 4/4 (100%)") and "eta" not in last


def test_silent_when_a_progress_bar_shows_progress():
    assert _fit(progress_bar=True) == ""


def test_durations():
    assert [_duration(s) for s in (0, 59.6, 61, 3725)] == ["0s", "1m00s", "1m01s", "1h02m05s"]


def test_heartbeat_reads_the_last_progress_line(tmp_path):
    log = tmp_path / "stage.log"
    assert _last_progress(log) is None
    log.write_text("loading\n[expert_code] step 1/10 (10%) loss 3.0\nnoise\n[expert_code] step 5/10 (50%) loss 2.5\n")
    assert _last_progress(log) == "step 5/10 (50%) loss 2.5"
