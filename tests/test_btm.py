"""BTM ensemble: posterior weights, the mixture, cached generation, accounting and ``bts merge --method btm``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from baselines import load_merge_output
from baselines.btm import BTMEnsemble
from bts.cli.main import main as bts_main
from bts.core.io import BTSError
from bts.core.language_model import HFLanguageModel, greedy_or_sample_uncached
from bts.core.params import ParamCounts, count_params
from conftest import tiny_llama


def merge_main(argv: list[str]) -> int:
    return bts_main(["merge", *argv])


def tokens(b=2, t=9, seed=0, vocab=97):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_one_model_is_its_log_softmax(llama_family):
    seed, _ = llama_family
    ens = BTMEnsemble([seed])
    x = tokens()
    with torch.no_grad():
        ref = torch.log_softmax(seed(input_ids=x).logits.float(), -1)
        out = ens(x)
    assert out.shape == ref.shape == (2, 9, 97)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(ens.posterior(x), torch.ones(2, 9, 1, dtype=torch.float64))


def _prefix_logliks(models, x):
    """[M, B, T] float64: log p_m(x_1..x_t | x_0), each prefix scored by its own separate forward."""
    M, (B, T) = len(models), x.shape
    ll = torch.zeros(M, B, T, dtype=torch.float64)
    for t in range(1, T):
        for m, model in enumerate(models):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x[:, : t + 1]).logits.double(), -1)
            ll[m, :, t] = logp[:, :-1].gather(-1, x[:, 1 : t + 1, None]).squeeze(-1).sum(-1)
    return ll


def _direct_posterior(ll, prior=None):
    """[B, T, M]: prior_m · exp(ll_m) / Σ_m' prior_m' · exp(ll_m') (Bayes' rule, in probability space)."""
    M = ll.shape[0]
    prior = torch.ones(M, dtype=torch.float64) if prior is None else torch.tensor(prior, dtype=torch.float64)
    w = (prior / prior.sum())[:, None, None] * torch.exp(ll - ll.max(0).values)
    return (w / w.sum(0)).permute(1, 2, 0)


def test_posterior_is_bayes_rule_over_prefix_likelihood(llama_family):
    seed, experts = llama_family
    models = [seed, *experts]
    ens = BTMEnsemble(models)
    x = tokens(t=8)
    post = ens.posterior(x)
    assert post.shape == (2, 8, 4)
    torch.testing.assert_close(post.sum(-1), torch.ones(2, 8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(post[:, 0], torch.full((2, 4), 0.25, dtype=torch.float64))  # t = 0: the prior
    ll = _prefix_logliks(models, x)
    torch.testing.assert_close(post, _direct_posterior(ll), atol=1e-6, rtol=0)
    # non-uniform prior
    prior = [3.0, 1.0, 0.0, 4.0]
    ens_p = BTMEnsemble(models, prior=prior)
    post_p = ens_p.posterior(x)
    torch.testing.assert_close(
        post_p[:, 0], torch.tensor([[3 / 8, 1 / 8, 0, 4 / 8]] * 2, dtype=torch.float64)
    )
    torch.testing.assert_close(post_p, _direct_posterior(ll, prior), atol=1e-6, rtol=0)


def test_mixture_is_posterior_weighted_sum_of_distributions(llama_family):
    seed, experts = llama_family
    models = [seed, *experts[:2]]
    ens = BTMEnsemble(models)
    x = tokens(t=7, seed=1)
    with torch.no_grad():
        probs = torch.stack(
            [torch.softmax(m(input_ids=x).logits.double(), -1) for m in models], -1
        )  # B T V M
        out = ens(x)
    post = _direct_posterior(_prefix_logliks(models, x))
    mix = (probs * post[:, :, None, :]).sum(-1)
    torch.testing.assert_close(out.double().exp(), mix, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 7), atol=1e-5, rtol=0)
    # causal: the output at t does not depend on later tokens
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(ens(y)[:, :5], out[:, :5], atol=1e-6, rtol=0)


def test_posterior_concentrates_on_the_expert_that_explains_the_data(llama_family):
    seed, experts = llama_family
    sharp = copy.deepcopy(experts[1])
    with torch.no_grad():
        sharp.lm_head.weight.mul_(40.0)  # a peaked distribution; the seed is near uniform
    gen = torch.Generator().manual_seed(0)
    x = greedy_or_sample_uncached(
        HFLanguageModel(sharp), tokens(b=3, t=1, seed=2), 24, do_sample=True, generator=gen
    )
    ens = BTMEnsemble([seed, experts[0], sharp])
    post = ens.posterior(x)[..., 2]  # [B, T] mass on the sharp expert
    assert torch.allclose(post[:, 0], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert bool((post[:, -1] > 0.99).all()), post[:, -1]
    # it grows with t (averaged over the batch, in windows)
    means = [float(post[:, i : i + 5].mean()) for i in range(0, 25, 5)]
    assert means == sorted(means), means
    # and the mixture then follows that expert
    with torch.no_grad():
        ref = torch.log_softmax(sharp(input_ids=x).logits.float(), -1)
        out = ens(x)
    nll_mix = -out[:, -5:-1].gather(-1, x[:, -4:, None]).mean()
    nll_sharp = -ref[:, -5:-1].gather(-1, x[:, -4:, None]).mean()
    assert float(nll_mix - nll_sharp) < 0.02


def test_generate_with_caches_matches_reference_loop(llama_family):
    seed, experts = llama_family
    ens = BTMEnsemble([seed, experts[0]])
    x = tokens(b=2, t=4, seed=3)
    ref = greedy_or_sample_uncached(ens, x, 5)
    out = ens.generate(x, 5)
    assert out.shape == (2, 9) and torch.equal(out, ref)
    eos = int(ref[0, 6])  # a token the greedy decode produces: stops row 0 there, pads after
    assert torch.equal(
        ens.generate(x, 5, eos_token_id=eos), greedy_or_sample_uncached(ens, x, 5, eos_token_id=eos)
    )
    s1 = ens.generate(x, 5, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(5))
    s2 = greedy_or_sample_uncached(
        ens, x, 5, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(s1, s2)
    assert torch.equal(ens.generate(x, 0), x)


def test_param_counts_and_errors(llama_family):
    seed, experts = llama_family
    ens = BTMEnsemble([seed, *experts])
    n = count_params(seed)
    assert ens.param_counts() == ParamCounts(trained=0, total=4 * n, active=4 * n)
    assert not any(p.requires_grad for p in ens.parameters())
    with pytest.raises(BTSError, match="share one vocabulary"):
        BTMEnsemble([seed, tiny_llama(1, vocab=50)])
    with pytest.raises(BTSError, match="expected 2 prior weights"):
        BTMEnsemble([seed, experts[0]], prior=[1.0])
    with pytest.raises(BTSError, match="positive sum"):
        BTMEnsemble([seed, experts[0]], prior=[0.0, 0.0])


def test_merge_command_writes_btm_dir(saved_llama_family, tmp_path, capsys):
    seed_dir, expert_dirs = saved_llama_family
    out = tmp_path / "btm"
    argv = [
        "--method",
        "btm",
        "--seed",
        str(seed_dir),
        "--experts",
        *map(str, expert_dirs),
        "--out",
        str(out),
    ]
    assert merge_main(argv) == 0
    info = json.loads((out / "btm.json").read_text())
    assert [m["role"] for m in info["models"]] == ["seed", "expert", "expert", "expert"]
    ens = load_merge_output(out)
    assert isinstance(ens, BTMEnsemble)
    n = count_params(ens.models[0])
    assert info["params"] == {"trained": 0, "total": 4 * n, "active": 4 * n} == ens.param_counts().to_dict()
    x = tokens(t=6)
    ref = BTMEnsemble.from_dirs([seed_dir, *expert_dirs])
    with torch.no_grad():
        torch.testing.assert_close(ens(x), ref(x))
    capsys.readouterr()
    assert merge_main([*argv[:-2], "--out", str(tmp_path / "b2"), "--density", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: method btm does not take option density"
    assert not (tmp_path / "b2").exists()
    # a member that changed after the manifest was written is detected
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(expert_dirs[0])
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    m.save_pretrained(expert_dirs[0])
    with pytest.raises(BTSError, match="changed since"):
        BTMEnsemble.from_dir(out)
    assert math.isfinite(float(ens(x).sum()))


def test_btm_artifact_loader(saved_llama_family, tmp_path):
    from baselines.btm import load_artifact, write_btm_dir
    from test_merges import _save_tiny_tokenizer

    seed_dir, expert_dirs = saved_llama_family
    _save_tiny_tokenizer(seed_dir)
    out = tmp_path / "btm"
    rec = write_btm_dir(seed_dir, expert_dirs[:1], out, prior=[1.0, 3.0])
    assert json.loads((out / "artifact.json").read_text()) == {"kind": "btm"}
    model, tokenizer, params = load_artifact(out)
    assert isinstance(model, BTMEnsemble) and params == rec["params"]
    assert params == {"trained": 0, "total": 2 * count_params(model.models[0]), "active": params["total"]}
    assert tokenizer.convert_tokens_to_ids("a") == 1
    torch.testing.assert_close(model.posterior(tokens(t=3))[:, 0], torch.tensor([[0.25, 0.75]] * 2).double())
