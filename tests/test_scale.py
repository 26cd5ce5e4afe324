"""Scale: the paper's 2.7B architecture counted on the meta device, the Qwen2.5 family config trained on tiny
random Qwen2 models, the GPU (FSDP) configs construct, and the optional speed/memory paths of ``StitchedLM``
(activation checkpointing, ``torch.compile``) keep the reference numerics."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from bts.core.io import tensor_sha256
from bts.core.params import count_params
from bts.dense.modeling import LlamaArch, build_llama
from bts.stitch.layer import StitchLayer
from bts.stitch.model import StitchConfig, StitchedLM
from bts.stitch.module import StitchModule
from conftest import perturbed_copy, tiny_llama, tiny_qwen2

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "configs" / "bts" / "scale"
GPU_CONFIGS = [
    "configs/bts/fsdp_gpu.yaml",
    "configs/experts/fsdp_gpu.yaml",
    "configs/bts/scale/paper_2p7b.yaml",
    "configs/bts/scale/paper_2p7b_seed.yaml",
    "configs/bts/scale/paper_2p7b_expert.yaml",
    "configs/bts/scale/qwen2p5_1p5b.yaml",
]

# exact counts of the paper's 2.7B architecture (untied embeddings, vocab 128256)
PAPER_DENSE_TOTAL = 3_446_270_976
PAPER_DENSE_NON_EMBEDDING = 2_658_266_112
PAPER_STITCH = 264_241_152  # 4 · 7 · 3072², paper Table 2


def _cfg(path: str | Path) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


# --- paper 2.7B on the meta device -------------------------------------------------------------------------------
def test_paper_2p7b_parameter_counts_on_meta():
    arch = LlamaArch(**_cfg(SCALE / "paper_2p7b_seed.yaml")["model"]["init_args"]["arch"])
    assert (arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size) == (20, 3072, 12288)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.vocab_size) == (24, 1, 128256)
    assert arch.rope_theta == 500_000.0
    bts = _cfg(SCALE / "paper_2p7b.yaml")["model"]["init_args"]
    stitch_cfg = StitchConfig(**bts["stitch"])
    n = len(bts["experts"])
    assert (n, stitch_cfg.num_stitch_layers) == (3, 4)

    with torch.device("meta"):
        models = [build_llama(arch, seed=s) for s in range(n + 1)]
    dense = count_params(models[0])
    embedding = models[0].model.embed_tokens.weight.numel() + models[0].lm_head.weight.numel()
    assert dense == PAPER_DENSE_TOTAL
    assert dense - embedding == PAPER_DENSE_NON_EMBEDDING  # the "2.7B"
    assert abs(dense - embedding - 2.7e9) / 2.7e9 < 0.02

    stitched = StitchedLM(models[0], models[1:], stitch_cfg, expert_names=bts["expert_names"])  # outside the ctx
    counts = stitched.param_counts()
    assert counts.trained == PAPER_STITCH == 4 * 7 * 3072**2
    assert counts.total == counts.active == (n + 1) * PAPER_DENSE_TOTAL + PAPER_STITCH
    assert stitched.placement() == [(5, "h2e"), (10, "e2h"), (15, "h2e"), (20, "e2h")]
    assert all(p.device.type == "meta" for p in stitched.stitch_layers.parameters())
    assert all(not p.requires_grad for m in stitched.models for p in m.parameters())


# --- Qwen2.5 family config on tiny random Qwen2 models -------------------------------------------------------------
def test_qwen2p5_family_config_trains_on_tiny_qwen2(tmp_path):
    cfg = _cfg(SCALE / "qwen2p5_1p5b.yaml")
    args = dict(cfg["model"]["init_args"])
    assert cfg["model"]["class_path"] == "bts.stitch.module.StitchModule"
    names = args["expert_names"]
    # the real family: 28 layers of d 1536 -> K=4 after 7/14/21/28; 4·(2·2+1)·1536² stitch parameters
    from transformers import Qwen2Config, Qwen2ForCausalLM

    real = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        family = [Qwen2ForCausalLM(real) for _ in range(len(names) + 1)]
    meta_bts = StitchedLM(family[0], family[1:], StitchConfig(**args["stitch"]))
    assert meta_bts.placement() == [(7, "h2e"), (14, "e2h"), (21, "h2e"), (28, "e2h")]
    assert meta_bts.param_counts().trained == 4 * 5 * 1536**2 == 47_185_920

    # the same config over tiny random Qwen2 models saved like the real ones
    hub = tiny_qwen2(0)
    dirs = []
    for i, m in enumerate([hub, *[perturbed_copy(hub, s) for s in range(1, len(names) + 1)]]):
        d = tmp_path / f"qwen{i}"
        m.save_pretrained(d)
        dirs.append(str(d))
    args.update(hub=dirs[0], experts=dirs[1:], output_dir=str(tmp_path / "bts"), warmup_steps=1)
    module = StitchModule(**args)
    assert type(module.model.hub).__name__ == "Qwen2ForCausalLM"
    frozen = {f"{i}.{k}": tensor_sha256(v) for i, m in enumerate(module.model.models) for k, v in m.state_dict().items()}
    before = {k: v.clone() for k, v in module.model.stitch_state_dict().items()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 97, (12,), generator=g)} for _ in range(8)]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=cfg["trainer"]["gradient_clip_val"])
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=2))
    assert trainer.global_step == 2
    assert {f"{i}.{k}": tensor_sha256(v) for i, m in enumerate(module.model.models)
            for k, v in m.state_dict().items()} == frozen
    assert all(not torch.equal(v, before[k]) for k, v in module.model.stitch_state_dict().items())
    assert json.loads((tmp_path / "bts" / "bts.json").read_text())["stitch_params"] == 4 * 5 * 32**2


# --- GPU configs: parse, and their strategies construct ---------------------------------------------------------
@pytest.mark.parametrize("path", GPU_CONFIGS)
def test_gpu_configs_parse_and_strategy_constructs(path, capsys):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    from bts.cli.lightning import run_lightning

    # the whole config goes through the `bts fit` parser (every key known, every class importable)
    with pytest.raises(SystemExit) as e:
        run_lightning(["fit", "--config", str(ROOT / path), "--print_config"])
    assert e.value.code in (0, None)
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)  # the parsed config keeps the file's classes
    assert printed["model"]["class_path"] == _cfg(path)["model"]["class_path"]
    assert printed["trainer"]["precision"] == _cfg(path)["trainer"]["precision"]

    trainer = _cfg(path)["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    spec = trainer["strategy"]
    if isinstance(spec, str):
        assert spec == "ddp"
        return
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": spec})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen + trainable parameters in one module
    wrapped = strategy.kwargs["auto_wrap_policy"]._module_classes
    assert any(c.__name__ == "LlamaDecoderLayer" for c in wrapped)
    if _cfg(path)["model"]["class_path"] == "bts.stitch.module.StitchModule":
        assert StitchLayer in wrapped  # the only trainable FSDP units


# --- optional paths of StitchedLM keep the numerics -----------------------------------------------------------
def _family_model(**cfg) -> StitchedLM:
    hub = tiny_llama(0)
    cfg = {"num_stitch_layers": 2, "gate_dropout": 0.0, "init": "random", **cfg}
    torch.manual_seed(0)
    model = StitchedLM(hub, [perturbed_copy(hub, s) for s in (1, 2, 3)], StitchConfig(**cfg))
    return model.train()


def _loss_and_grads(model: StitchedLM, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


def test_activation_checkpointing_keeps_numerics_and_is_runtime_only():
    ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))
    model = _family_model()
    ref = _loss_and_grads(model, ids)
    model.config.activation_checkpointing = True
    got = _loss_and_grads(model, ids)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-7)
    assert got[2].keys() == ref[2].keys() and len(ref[2]) == 4
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for m in model.models for p in m.parameters())
    # not part of the model definition: absent from to_dict (stitch manifests, hparams) unless switched on
    assert "activation_checkpointing" not in StitchConfig().to_dict() and "compile" not in StitchConfig().to_dict()
    on = StitchConfig(activation_checkpointing=True).to_dict()
    assert on["activation_checkpointing"] is True and StitchConfig(**on) == StitchConfig(activation_checkpointing=True)


@pytest.mark.slow
def test_compile_keeps_numerics():
    """``StitchConfig(compile=True)``: same logits, loss and stitch gradients as eager within fp32 round-off."""
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    model = _family_model()
    ref = _loss_and_grads(model, ids)
    compiled = copy.deepcopy(model)
    compiled.config = StitchConfig(**{**model.config.to_dict(), "compile": True})
    got = _loss_and_grads(compiled, ids)
    assert compiled._compiled is not None
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-4, atol=1e-6)
    # cached generation stays eager and equal
    compiled.eval()
    model.eval()
    prompt = ids[:1, :5]
    assert torch.equal(compiled.generate(prompt, 4), model.generate(prompt, 4))


def test_e2h_layout_matches_the_einsum_formula():
    """The E2H fast path (softmax with the model axis outside, broadcast-sum mixing) equals the original formula
    ``softmax(logits [B,T,d,n+1], -1)`` + ``einsum("btdn,nbtd->btd")``: outputs, recorded gates and gradients."""
    torch.manual_seed(0)
    layer = StitchLayer(16, 3, "e2h", gate_dropout=0.0, init="random")
    layer.record_gates = True
    hs = [torch.randn(2, 5, 16, requires_grad=True) for _ in range(4)]
    out = layer(hs)
    gates = layer.last_gates
    got = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(out)), [*hs, *layer.parameters()])

    b, t, d = hs[0].shape
    g = torch.softmax(layer._gate_logits(hs[0]), dim=-1)
    proj = torch.bmm(torch.stack(hs[1:]).view(3, b * t, d), layer.stitch_proj.transpose(1, 2)).view(3, b, t, d)
    ref = [g[..., 0] * hs[0] + torch.einsum("btdn,nbtd->btd", g[..., 1:], proj), *proj.unbind(0)]
    want = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(ref)), [*hs, *layer.parameters()])
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gates, g.detach().mean(dim=2), rtol=1e-6, atol=1e-7)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
