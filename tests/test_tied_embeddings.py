"""Tied input/output embeddings (``tie_word_embeddings=True``, e.g. SmolLM2-135M): ``lm_head.weight`` IS
``model.embed_tokens.weight``. Every other test uses untied tiny models; these check, on tiny tied Llamas, that the
tie and the numbers survive the HF round trip, the static merges (API and ``bts merge``), BTX/BAM upcycling and
their artifacts, BTS stitch checkpoints, and the expert-training ``freeze`` option.

Each expectation is recomputed here by hand (merge formulas on the embeddings, the mean over seed and experts,
``logits = final_hidden @ embeddings.T``), not read back from the code under test.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from baselines.bam import BAMModel, build_bam, load_bam
from baselines.btx import BTXModel, build_btx, export_mixtral, load_btx
from baselines.merge import get_merge_method, load_merged, merge_models
from baselines.upcycle import MixtralLM
from bts.cli.main import main as bts_main
from bts.core.io import BTSError
from bts.dense.modeling import LlamaArch, load_causal_lm
from bts.dense.module import CausalLMModule
from bts.stitch.checkpoint import WEIGHTS, load_stitched, save_stitched
from bts.stitch.model import StitchedLM
from bts.stitch.module import StitchModule
from conftest import fit_random_batches, perturbed_copy


def merge_main(argv: list[str]) -> int:
    return bts_main(["merge", *argv])


EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB = 97


def tiny_tied(model_type: str = "llama", seed: int = 0):
    """conftest.tiny_llama / tiny_qwen2 with ``tie_word_embeddings=True``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1 if model_type == "llama" else 2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).eval()
    assert_tied(model)
    return model


def tied_expert(seed_model, seed: int):
    """A branched expert: ``perturbed_copy`` walks ``parameters()``, which yields the shared tensor once, so the
    noise lands once on the one embedding/head tensor and the deep copy keeps the tie."""
    e = perturbed_copy(seed_model, seed)
    assert_tied(e)
    assert not torch.equal(e.model.embed_tokens.weight, seed_model.model.embed_tokens.weight)
    return e


def assert_tied(model) -> None:
    """The head and the input embeddings are one Parameter (one storage), not two equal ones."""
    head, emb = model.lm_head.weight, model.model.embed_tokens.weight
    assert head is emb and head.data_ptr() == emb.data_ptr(), f"{type(model).__name__}: lm_head is not tied"
    assert model.config.tie_word_embeddings is True


def emb(model) -> torch.Tensor:
    return model.model.embed_tokens.weight.detach()


def head_logits(model, ids) -> torch.Tensor:
    """Independent recomputation of a tied decoder's logits: final normed hidden state times the EMBEDDINGS."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return hidden @ emb(model).T


def safetensors_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tied_family():
    seed = tiny_tied()
    return seed, [tied_expert(seed, s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def saved_tied_family(tmp_path_factory, tied_family):
    seed, experts = tied_family
    root = tmp_path_factory.mktemp("tied")
    seed.save_pretrained(root / "seed")
    dirs = []
    for i, e in enumerate(experts):
        e.save_pretrained(root / f"expert{i}")
        dirs.append(root / f"expert{i}")
    return root / "seed", dirs


# ----------------------------------------------------------------------------------------------------------
# 1. save_pretrained -> from_pretrained / load_causal_lm


def test_hf_round_trip_keeps_tie_and_logits(tied_family, saved_tied_family, ids):
    from transformers import AutoModelForCausalLM

    _, experts = tied_family
    seed_dir, dirs = saved_tied_family
    # the file holds the shared tensor once, under the embeddings' name, and the config says tied
    assert EMB in safetensors_keys(dirs[0] / "model.safetensors")
    assert HEAD not in safetensors_keys(dirs[0] / "model.safetensors")
    assert json.loads((dirs[0] / "config.json").read_text())["tie_word_embeddings"] is True
    with torch.no_grad():
        ref = experts[0](input_ids=ids).logits
    torch.testing.assert_close(ref, head_logits(experts[0], ids), atol=1e-5, rtol=0)
    for loaded in (AutoModelForCausalLM.from_pretrained(dirs[0]).eval(), load_causal_lm(dirs[0]).eval()):
        assert_tied(loaded)
        # the expert's own (perturbed) embeddings, not the seed's nor a re-initialised head
        assert torch.equal(emb(loaded), emb(experts[0]))
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, ref)
    assert_tied(load_causal_lm(seed_dir))


# ----------------------------------------------------------------------------------------------------------
# 2. static merges


def _ties_by_hand(base, experts, density, lam):
    """TIES on one tensor (Yadav et al. 2023): trim each task vector to its top-k magnitudes, elect the sign of the
    total mass (0 counts +), mean of the agreeing entries, scale by lambda. Unit weights."""
    taus = []
    for e in experts:
        tau = (e - base).reshape(-1)
        k = max(1, int(density * tau.numel()))
        keep = torch.zeros_like(tau)
        keep[tau.abs().topk(k).indices] = 1
        taus.append((tau * keep).reshape(base.shape))
    taus = torch.stack(taus)
    sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = (taus.sign() == sign).float()
    count = agree.sum(0)
    return base + lam * (taus * agree).sum(0) / torch.where(count == 0, torch.ones_like(count), count)


MERGES = {
    # name: (method options, bts merge flags, formula over (seed, [experts]) embeddings)
    "soup": (
        {"weights": [1.0, 2.0, 0.0, 1.0]},
        ["--weights", "1", "2", "0", "1"],
        lambda s, es: (1.0 * s + 2.0 * es[0] + 0.0 * es[1] + 1.0 * es[2]) / 4.0,
    ),
    "task_arithmetic": ({"lambda": 0.7}, ["--lambda", "0.7"], lambda s, es: s + 0.7 * sum(e - s for e in es)),
    "ties": (
        {"density": 0.5, "lambda": 0.8},
        ["--density", "0.5", "--lambda", "0.8"],
        lambda s, es: _ties_by_hand(s, es, 0.5, 0.8),
    ),
}


@pytest.mark.parametrize("entry", ["merge_models", "cli"])
@pytest.mark.parametrize("method", sorted(MERGES))
def test_merge_of_tied_models_is_tied_and_follows_the_formula(
    method, entry, tied_family, saved_tied_family, ids, tmp_path, capsys
):
    seed, experts = tied_family
    seed_dir, dirs = saved_tied_family
    opts, flags, formula = MERGES[method]
    expected = formula(emb(seed).float(), [emb(e).float() for e in experts])
    assert not torch.allclose(expected, emb(seed), atol=1e-4)  # the merge moves the embeddings
    out = tmp_path / method
    if entry == "cli":
        argv = ["--method", method, "--seed", str(seed_dir), "--experts", *map(str, dirs), "--out", str(out)]
        assert merge_main(argv + flags) == 0, capsys.readouterr().err
    else:
        kw = dict(opts)
        merge_models(method, seed_dir, dirs, out, weights=kw.pop("weights", None), **kw)
    assert HEAD not in safetensors_keys(out / "model.safetensors")  # one tensor, not a second copy
    merged = load_merged(out).model
    assert_tied(merged)
    torch.testing.assert_close(emb(merged), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, head_logits(merged, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(MERGES))
def test_in_memory_merge_gives_head_and_embeddings_the_same_value(method, tied_family):
    """The state dicts carry both names for the one tensor; the merge must map both to the same value so that
    loading into a tied model is unambiguous (whichever name is loaded last wins)."""
    seed, experts = tied_family
    opts, _, formula = MERGES[method]
    kw = dict(opts)
    weights = kw.pop("weights", None)
    state = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}
    out = get_merge_method(method, **kw).merge(state(seed), [state(e) for e in experts], weights)
    assert torch.equal(out[HEAD], out[EMB])
    torch.testing.assert_close(out[EMB], formula(emb(seed), [emb(e) for e in experts]), atol=1e-6, rtol=0)
    model = tiny_tied(seed=5)
    model.load_state_dict(out, strict=True)
    assert_tied(model)
    assert torch.equal(emb(model), out[EMB])


# ----------------------------------------------------------------------------------------------------------
# 3. BTX / BAM upcycling


def _mean_embeddings(seed, experts) -> torch.Tensor:
    return torch.stack([emb(m).double() for m in (seed, *experts)]).mean(0).float()


@pytest.mark.parametrize("variant", ["top2", "soft"])
def test_btx_from_tied_models_and_mixtral_export(variant, tied_family, ids, tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    seed, experts = tied_family
    before = [emb(m).clone() for m in (seed, *experts)]
    btx = build_btx(seed, experts, variant, router_init_std=0.5).eval()
    assert_tied(btx.model)
    torch.testing.assert_close(emb(btx.model), _mean_embeddings(seed, experts), atol=1e-7, rtol=0)
    assert all(
        torch.equal(emb(m), b) for m, b in zip((seed, *experts), before)
    )  # inputs untouched, still tied
    for m in (seed, *experts):
        assert_tied(m)
    with torch.no_grad():
        logits = btx(ids)
    torch.testing.assert_close(logits, head_logits(btx.model, ids), atol=1e-5, rtol=0)
    # the in-memory Mixtral conversion is tied too (it was not: no_init_weights skipped the tying)
    assert_tied(btx.to_mixtral())
    export_mixtral(btx, tmp_path / "mixtral")
    assert HEAD not in safetensors_keys(tmp_path / "mixtral" / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert isinstance(hf, MixtralForCausalLM)
    assert_tied(hf)
    assert torch.equal(emb(hf), emb(btx.model))
    btx.save(tmp_path / "art")
    loaded = load_btx(tmp_path / "art")
    assert isinstance(loaded, MixtralLM)
    assert_tied(loaded.model)
    assert loaded.param_counts() == btx.param_counts()  # the shared matrix counted once on both sides
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(ids), logits, atol=1e-5, rtol=0)


def test_bam_from_tied_models_artifact_round_trip(tied_family, ids, tmp_path):
    """Regression: ``safetensors.save_model`` stores the shared tensor under one name (``lm_head.weight``); the
    loader's skeleton was built under ``no_init_weights`` (which in transformers 5 also skips tying), so it had two
    tensors and ``load_bam`` failed with 'Missing key(s): model.embed_tokens.weight'."""
    seed, experts = tied_family
    bam = build_bam(seed, experts, router_init_std=0.3).eval()
    assert_tied(bam.model)
    torch.testing.assert_close(emb(bam.model), _mean_embeddings(seed, experts), atol=1e-7, rtol=0)
    with torch.no_grad():
        logits = bam(ids)
    torch.testing.assert_close(logits, head_logits(bam.model, ids), atol=1e-5, rtol=0)
    bam.save(tmp_path)
    assert len({EMB, HEAD} & safetensors_keys(tmp_path / "bam.safetensors")) == 1
    loaded = load_bam(tmp_path)
    assert isinstance(loaded, BAMModel)
    assert_tied(loaded.model)
    assert torch.equal(emb(loaded.model), emb(bam.model))
    assert loaded.param_counts() == bam.param_counts()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), logits, atol=0, rtol=0)


def test_btx_safetensors_fallback_of_tied_qwen2(ids, tmp_path):
    """Qwen2 (attention biases) is not Mixtral-exportable: the same safetensors path as BAM, for BTX."""
    q = tiny_tied("qwen2")
    experts = [tied_expert(q, 1), tied_expert(q, 2)]
    btx = build_btx(q, experts, "top2", router_init_std=0.5).eval()
    assert_tied(btx.model)
    torch.testing.assert_close(emb(btx.model), _mean_embeddings(q, experts), atol=1e-7, rtol=0)
    btx.save(tmp_path)
    assert json.loads((tmp_path / "btx.json").read_text())["format"] == "safetensors"
    loaded = load_btx(tmp_path)
    assert isinstance(loaded, BTXModel)
    assert_tied(loaded.model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), btx(ids), atol=0, rtol=0)
        torch.testing.assert_close(loaded(ids), head_logits(loaded.model, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 4. BTS stitch checkpoints


def test_stitch_checkpoint_over_tied_models(saved_tied_family, ids, tmp_path):
    seed_dir, dirs = saved_tied_family
    model = StitchedLM.from_pretrained_dirs(
        seed_dir, dirs, expert_names=["code", "math", "multilingual"], num_stitch_layers=2
    ).eval()
    for m in model.models:
        assert_tied(m)
    with torch.no_grad():
        identity = model(ids)
        g = torch.Generator().manual_seed(0)
        for p in model.stitch_layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        logits = model(ids)
    assert not torch.allclose(logits, identity, atol=1e-3)  # the stitch weights are not the identity
    out = save_stitched(model, tmp_path / "ckpt")
    keys = safetensors_keys(out / WEIGHTS)
    assert keys == {f"stitch_layers.{j}.{n}" for j in range(2) for n in ("stitch_gate.weight", "stitch_proj")}
    assert all(k.split(".")[2].startswith("stitch_") for k in keys)  # no embedding / head of a frozen model
    loaded = load_stitched(out).eval()
    for m, src in zip(loaded.models, model.models):
        assert_tied(m)
        assert torch.equal(emb(m), emb(src))
    with torch.no_grad():
        assert torch.equal(loaded(ids), logits)


def test_stitch_module_lightning_checkpoint_keeps_only_stitch_tensors(saved_tied_family):
    seed_dir, dirs = saved_tied_family
    module = StitchModule(str(seed_dir), [str(d) for d in dirs[:2]], stitch={"num_stitch_layers": 1})
    full = module.state_dict()
    assert (
        f"model.models.0.{HEAD}" in full and f"model.models.0.{EMB}" in full
    )  # both names of the tied tensor
    ckpt = {"state_dict": dict(full)}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("model.stitch_") for k in ckpt["state_dict"])
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in module.model.stitch_state_dict()}


# ----------------------------------------------------------------------------------------------------------
# 5. expert training: freeze on a tied model

TIED_ARCH = LlamaArch(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=True
)


@pytest.mark.parametrize("part", ["head", "embeddings"])
def test_freezing_only_one_of_tied_head_and_embeddings_is_refused(part, saved_tied_family):
    """Rule: head and embeddings are one tensor when tied, so freezing one alone would silently freeze the other
    (that was the old behaviour); it is a clear error instead. Untied models keep the per-part choice."""
    seed_dir, _ = saved_tied_family
    with pytest.raises(
        BTSError, match=rf"freeze: '{part}' without .* tied input/output embeddings.*both or neither"
    ):
        CausalLMModule(init_from=str(seed_dir), freeze=[part, "final_norm"])
    with pytest.raises(BTSError, match="tied input/output embeddings"):
        CausalLMModule(arch=TIED_ARCH, freeze=[part])
    untied = CausalLMModule(
        arch=LlamaArch(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2),
        freeze=[part],
    )
    frozen = {n for n, p in untied.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.{HEAD if part == 'head' else EMB}"}


@pytest.mark.parametrize("freeze", [["embeddings", "final_norm", "head"], []])
def test_expert_training_on_tied_seed(freeze, tied_family, saved_tied_family, ids, tmp_path):
    seed, _ = tied_family
    seed_dir, _ = saved_tied_family
    out = tmp_path / "expert"
    module = CausalLMModule(
        init_from=str(seed_dir), lr=1e-2, warmup_steps=0, freeze=freeze, output_dir=str(out)
    )
    assert_tied(module.model)
    assert module.model.lm_head.weight.requires_grad is (not freeze)
    layer0 = module.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    fit_random_batches(module)
    assert_tied(module.model)  # training does not split the shared tensor
    assert not torch.equal(module.model.model.layers[0].mlp.up_proj.weight, layer0)  # the body trained
    if freeze:
        assert torch.equal(emb(module.model), emb(seed))  # head = embeddings = the seed's, bit for bit
        assert torch.equal(module.model.model.norm.weight, seed.model.norm.weight)
    else:
        assert not torch.equal(
            emb(module.model), emb(seed)
        )  # the one tensor trained (as head and embeddings)
    reloaded = load_causal_lm(out).eval()
    assert_tied(reloaded)
    assert torch.equal(emb(reloaded), emb(module.model))
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)
    torch.testing.assert_close(
        head_logits(reloaded, ids), reloaded(input_ids=ids).logits.detach(), atol=1e-5, rtol=0
    )
