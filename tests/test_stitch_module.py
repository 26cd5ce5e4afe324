"""StitchModule under a real Lightning Trainer: only stitch tensors train, frozen models stay bit-identical,
the artifact is a loadable stitch checkpoint, and train_only_new keeps the old slices bit-identical."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from bts.core.io import BTSError, tensor_sha256
from bts.stitch.checkpoint import MANIFEST, load_stitched, save_stitched
from bts.stitch.model import StitchConfig, StitchedLM
from bts.stitch.module import StitchModule


def _loader(n: int = 8, t: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 97, (t,), generator=g)} for _ in range(n)]
    return DataLoader(rows, batch_size=2)


def _fit(module: StitchModule, steps: int = 3, precision: str = "32-true") -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=steps,
        precision=precision,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=_loader())


def _frozen_hashes(model: StitchedLM) -> dict[str, str]:
    return {
        f"{i}.{n}": tensor_sha256(p) for i, m in enumerate(model.models) for n, p in m.state_dict().items()
    }


def test_training_touches_only_stitch_and_writes_checkpoint(tmp_path, saved_llama_family):
    seed_dir, dirs = saved_llama_family
    module = StitchModule(
        hub=str(seed_dir),
        experts=[str(d) for d in dirs],
        expert_names=["code", "math", "multilingual"],
        stitch=StitchConfig(num_stitch_layers=2),
        warmup_steps=1,
        output_dir=str(tmp_path / "bts"),
    )
    assert module.lr == 1e-3 and module.weight_decay == 0.0
    before = _frozen_hashes(module.model)
    stitch_before = {k: v.clone() for k, v in module.model.stitch_state_dict().items()}
    _fit(module)
    assert _frozen_hashes(module.model) == before
    for k, v in module.model.stitch_state_dict().items():
        assert not torch.equal(v, stitch_before[k]), k
    assert all(not m.training for m in module.model.models)
    for name, p in module.named_parameters():
        assert p.requires_grad == (".stitch_" in name), name

    out = tmp_path / "bts"
    manifest = json.loads((out / MANIFEST).read_text())
    assert [e["name"] for e in manifest["experts"]] == ["code", "math", "multilingual"]
    training = json.loads((out / "training.json").read_text())
    assert training["global_step"] == 3 and "freeze" not in training  # no freeze option on a stitch module
    assert training["params"]["trained"] == 2 * 7 * 32 * 32
    loaded = load_stitched(out).eval()
    x = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x), module.model.eval()(x))
    ckpt = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("model.stitch_layers.") for k in ckpt["state_dict"])


def test_frozen_models_held_in_bf16_stay_bit_identical(tmp_path, saved_llama_family):
    """Under bf16-mixed the frozen models are held in bfloat16 (frozen_dtype auto): after training they equal the
    loaded weights cast once, the stitch tensors stay float32 and train, and the checkpoint pins the models as
    loaded (fp32), so it loads and evaluates over the directories as usual."""
    seed_dir, dirs = saved_llama_family
    module = StitchModule(hub=str(seed_dir), experts=[str(d) for d in dirs], stitch=StitchConfig(num_stitch_layers=2),
                          warmup_steps=1, output_dir=str(tmp_path / "bts"))
    as_loaded = {k: v.clone() for k, v in _frozen_state(module.model).items()}
    fp32 = StitchedLM.from_pretrained_dirs(seed_dir, dirs, num_stitch_layers=2).eval()
    _fit(module, precision="bf16-mixed")
    after = _frozen_state(module.model)
    assert all(v.dtype == torch.bfloat16 for v in after.values())
    assert all(torch.equal(after[k], as_loaded[k].to(torch.bfloat16)) for k in after)
    assert all(p.dtype == torch.float32 for p in module.model.stitch_layers.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(module.model.stitch_state_dict().values(),
                                                     fp32.stitch_state_dict().values()))
    loaded = load_stitched(tmp_path / "bts").eval()  # fp32 models from the directories, checked by sha256
    # the same stitch weights over fp32 and bf16-held models under bf16 autocast: the mean NLL agrees within 1 %
    fp32.load_stitch_state_dict(loaded.stitch_state_dict())
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        nll = [torch.nn.functional.cross_entropy(m(x)[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
               for m in (module.model.eval(), fp32)]
    assert abs(float(nll[0] / nll[1]) - 1) < 0.01


def test_bad_frozen_dtype_is_refused(saved_llama_family):
    seed_dir, dirs = saved_llama_family
    with pytest.raises(BTSError, match="frozen_dtype"):
        StitchModule(hub=str(seed_dir), experts=[str(dirs[0])], frozen_dtype="fp8")


def _frozen_state(model: StitchedLM) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p for i, m in enumerate(model.models) for n, p in m.state_dict().items()}


def _slices(model: StitchedLM, idx: list[int]) -> dict[str, str]:
    out = {}
    for j, layer in enumerate(model.stitch_layers):
        for i in idx:
            if i > 0:
                out[f"{j}.proj.{i}"] = tensor_sha256(layer.stitch_proj[i - 1])
            out[f"{j}.gate.{i}"] = tensor_sha256(layer.gate_rows(i))
    return out


@pytest.mark.parametrize("train_only_new", [True, False])
def test_add_expert_training(tmp_path, saved_llama_family, train_only_new):
    seed_dir, dirs = saved_llama_family
    names = ["code", "math", "multilingual"]
    base = StitchedLM.from_pretrained_dirs(seed_dir, dirs[:2], expert_names=names[:2], num_stitch_layers=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.stitch_layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_stitched(base, tmp_path / "base")

    module = StitchModule(
        hub=str(seed_dir),
        experts=[str(d) for d in dirs],
        expert_names=names,
        stitch=StitchConfig(num_stitch_layers=2),
        init_stitch_from=str(tmp_path / "base"),
        train_only_new=train_only_new,
        weight_decay=0.1,  # exercises the masked decoupled weight decay
        warmup_steps=1,
    )
    model = module.model
    assert module.new_experts == ["multilingual"]
    for j, layer in enumerate(model.stitch_layers):  # old slices copied, new slice identity / zero
        old = base.stitch_layers[j]
        assert torch.equal(layer.stitch_proj[:2], old.stitch_proj)
        for i in range(3):
            assert torch.equal(layer.gate_rows(i), old.gate_rows(i))
        assert torch.equal(layer.stitch_proj[2], torch.eye(32)) and not layer.gate_rows(3).any()
    old_before, new_before = _slices(model, [0, 1, 2]), _slices(model, [3])
    expected_trained = 2 * 2 * 32 * 32 if train_only_new else 2 * 7 * 32 * 32
    assert module.param_counts().trained == expected_trained
    _fit(module)
    old_after, new_after = _slices(model, [0, 1, 2]), _slices(model, [3])
    assert all(new_after[k] != new_before[k] for k in new_before)
    if train_only_new:
        assert old_after == old_before
    else:
        assert all(old_after[k] != old_before[k] for k in old_before)


def test_bad_module_arguments(tmp_path, saved_llama_family):
    seed_dir, dirs = saved_llama_family
    with pytest.raises(BTSError, match="init_stitch_from"):
        StitchModule(hub=str(seed_dir), experts=[str(dirs[0])], train_only_new=True)
    base = StitchedLM.from_pretrained_dirs(seed_dir, dirs[:2], num_stitch_layers=2)
    save_stitched(base, tmp_path / "base")
    with pytest.raises(BTSError, match="nothing is new"):
        StitchModule(
            hub=str(seed_dir),
            experts=[str(d) for d in dirs[:2]],
            stitch=StitchConfig(num_stitch_layers=2),
            init_stitch_from=str(tmp_path / "base"),
            train_only_new=True,
        )
    with pytest.raises(BTSError, match="lacks"):
        StitchModule(
            hub=str(seed_dir),
            experts=[str(dirs[0])],
            stitch=StitchConfig(num_stitch_layers=2),
            init_stitch_from=str(tmp_path / "base"),
        )
    with pytest.raises(BTSError, match="num_stitch_layers"):
        StitchModule(
            hub=str(seed_dir),
            experts=[str(d) for d in dirs],
            stitch=StitchConfig(num_stitch_layers=4),
            init_stitch_from=str(tmp_path / "base"),
        )
