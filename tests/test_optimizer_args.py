"""The optimiser arguments every trained module shares (bts.training.optimizer): one schema, per-module defaults,
recorded resolved, wrong keys and values refused."""

import itertools
import subprocess
import sys

import pytest
import torch

from bts.core.io import BTSError
from bts.dense.modeling import LlamaArch
from bts.dense.module import CausalLMModule
from bts.stitch.module import StitchModule
from bts.training.optimizer import OPTIMIZER_DEFAULTS, resolve_optimizer_args

ARCH = LlamaArch(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2)


def optimizers_of(module, steps=20):
    class FakeTrainer:  # what configure_optimizers reads
        estimated_stepping_batches = steps

    module.trainer = FakeTrainer()
    cfg = module.configure_optimizers()
    return cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]


def test_defaults_and_overrides_reach_the_optimizer():
    module = CausalLMModule(arch=ARCH, lr=5e-4, betas=[0.8, 0.9])
    assert module.optimizer_args == {**OPTIMIZER_DEFAULTS, "lr": 5e-4, "betas": (0.8, 0.9)}
    assert module.hparams["lr"] == 5e-4 and "warmup_steps" not in module.hparams  # hparams keep what was given
    opt, _ = optimizers_of(module)
    assert opt.defaults["lr"] == 5e-4 and opt.defaults["betas"] == (0.8, 0.9)
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert OPTIMIZER_DEFAULTS["weight_decay"] in decays


def test_stitch_module_has_its_own_defaults():
    # a lower peak and no decay for stitch matrices that start at the identity
    assert StitchModule.optimizer_defaults["lr"] == 1e-3 and StitchModule.optimizer_defaults["weight_decay"] == 0.0
    assert CausalLMModule.optimizer_defaults["lr"] == 3e-3


@pytest.mark.parametrize("given, match", [
    ({"lrr": 1e-3}, "unknown optimiser argument 'lrr'"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio in"),
    ({"warmup_steps": -1}, "warmup_steps"),
])
def test_bad_arguments_are_one_error(given, match):
    with pytest.raises(BTSError, match=match):
        resolve_optimizer_args(given, OPTIMIZER_DEFAULTS)
    with pytest.raises(BTSError, match=match):
        CausalLMModule(arch=ARCH, **given)


def test_a_misspelt_key_on_the_command_line_is_one_error_line():
    out = subprocess.run([sys.executable, "-m", "bts.cli.main", "fit", "--config", "configs/seed/tiny.yaml",
                          "--model.init_args.lrr", "0.1"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("error:") and "lrr" in out.stderr


def test_schedule_uses_the_resolved_values():
    module = CausalLMModule(arch=ARCH, lr=1e-2, warmup_steps=4, min_lr_ratio=0.1)
    opt, sched = optimizers_of(module, steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # linear warmup over 4 steps to the peak 1e-2, then cosine down towards 10 % of it
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] and lrs[3] == max(lrs)
    torch.testing.assert_close(torch.tensor(max(lrs)), torch.tensor(1e-2))
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:])) and 1e-3 <= lrs[-1] < 2e-3


def test_the_fast_check_knows_the_optimiser_keys():
    """The check before heavy imports reads ``**optimizer: Unpack[OptimizerArgs]`` statically: the optimiser keys are
    accepted and a misspelt one is refused there, without importing torch."""
    from bts.cli.config_check import init_params, precheck

    for cls in ("bts.stitch.module.StitchModule", "bts.dense.module.CausalLMModule", "baselines.btx.BTXModule"):
        keys = init_params(cls)
        assert keys is not None and {"lr", "warmup_steps", "min_lr_ratio", "weight_decay", "betas"} <= keys
    assert "lrr" not in init_params("bts.dense.module.CausalLMModule")
    with pytest.raises(BTSError, match="lrr"):
        precheck(["fit", "--config", "configs/seed/tiny.yaml", "--model.init_args.lrr", "0.1"])
