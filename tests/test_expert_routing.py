"""Expert routing (baselines.expert_routing): targets, prefix routing, training of the router through the shared
Lightning loop on a synthetic task where the generating model is clearly the best, counts, artifacts."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from baselines.expert_routing import ExpertRouter, ExpertRoutingModule, load_expert_router
from bts.core.io import state_dict_sha256
from bts.core.params import count_params
from conftest import perturbed_copy, tiny_llama

VOCAB, SEQ = 97, 24


def sharp(seed: int, lo: int, hi: int):
    """A tiny random Llama with a peaked next-token distribution concentrated on tokens [lo, hi) (a 'domain'):
    its samples are very likely under it and unlikely under the others."""
    m = tiny_llama(seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
        m.lm_head.weight[:lo] = 0
        m.lm_head.weight[hi:] = 0
    return m


@torch.no_grad()
def sample_from(model, n: int, g: torch.Generator) -> torch.LongTensor:
    out = torch.randint(0, VOCAB, (n, 1), generator=g)
    for _ in range(SEQ - 1):
        probs = torch.softmax(model(input_ids=out).logits[:, -1].float(), -1)
        out = torch.cat([out, torch.multinomial(probs, 1, generator=g)], dim=1)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Models: a flat seed (never best) and two sharp 'experts'; data: half sampled from each expert."""
    root = tmp_path_factory.mktemp("routing")
    models = [tiny_llama(0), sharp(1, 0, 48), sharp(2, 48, VOCAB)]
    dirs = []
    for i, m in enumerate(models):
        m.save_pretrained(root / f"m{i}")
        dirs.append(str(root / f"m{i}"))
    g = torch.Generator().manual_seed(0)
    # one batched sampling loop per model: 24 sequences from each expert
    x = torch.cat([sample_from(models[1], 24, g), sample_from(models[2], 24, g)])
    y = torch.tensor([1] * 24 + [2] * 24)
    perm = torch.randperm(48, generator=g)
    batches, labels = list(x[perm].split(8)), list(y[perm].split(8))
    return dirs, batches, labels


def fit(module, batches, steps):
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = [{"input_ids": b} for b in batches]
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))


def test_targets_are_the_lowest_loss_model(synthetic):
    dirs, batches, labels = synthetic
    router = ExpertRoutingModule(dirs[0], dirs[1:]).net
    losses = router.sequence_losses(batches[0])
    assert losses.shape == (8, 3)
    assert torch.equal(losses.argmin(1), labels[0])  # the generating expert is clearly best
    assert (losses.gather(1, labels[0][:, None]) < losses.min(1).values[:, None] + 1e-6).all()


def test_router_training_lowers_router_loss(synthetic, tmp_path):
    dirs, batches, labels = synthetic
    module = ExpertRoutingModule(
        dirs[0],
        dirs[1:],
        route_prefix=8,
        min_prefix=4,
        lr=0.1,
        warmup_steps=0,
        weight_decay=0.0,
        output_dir=str(tmp_path / "er"),
    )
    net = module.net
    held_out, held_labels = batches[-1], labels[-1]
    frozen_sha = state_dict_sha256(net.models.state_dict())
    torch.manual_seed(0)
    before, _ = net.router_loss(held_out, min_prefix=8)
    fit(module, batches[:-1] * 2, steps=10)
    torch.manual_seed(0)
    after, acc = net.router_loss(held_out, min_prefix=8)
    assert after.item() < before.item() - 0.3, (before.item(), after.item())
    assert acc.item() >= 0.75
    assert (net.route(held_out) == held_labels).float().mean() >= 0.75
    assert state_dict_sha256(net.models.state_dict()) == frozen_sha  # only the router trained
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["net.router.weight"]
    # artifact: router weights + the source directories
    meta = json.loads((tmp_path / "er" / "expert_routing.json").read_text())
    assert meta["experts"] == dirs[1:] and meta["route_prefix"] == 8
    loaded = load_expert_router(tmp_path / "er")
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out), net(held_out), atol=0, rtol=0)


def test_forward_is_the_routed_models_logits_decided_by_the_prefix(llama_family):
    seed, experts = llama_family
    p = 4
    router = ExpertRouter([seed, *experts], route_prefix=p, router_init_std=1.0).eval()
    ids = torch.randint(0, VOCAB, (6, 10), generator=torch.Generator().manual_seed(1))
    choice = router.route(ids)
    per_pos = router.route_positions(ids)
    assert per_pos.shape == (6, 10) and torch.equal(per_pos[:, -1], choice)
    assert (per_pos[:, p - 1 :] == choice[:, None]).all()  # fixed from the end of the routing prefix on
    for t in range(p):  # inside the prefix: routed on the tokens up to t
        assert torch.equal(per_pos[:, t], router.route(ids[:, : t + 1]))
    logits = router(ids)
    dense = [m(input_ids=ids).logits for m in router.models]
    for b in range(6):
        for t in range(10):
            torch.testing.assert_close(logits[b, t], dense[int(per_pos[b, t])][b, t], atol=1e-5, rtol=0)
    changed = ids.clone()
    changed[:, p:] = (changed[:, p:] + 1) % VOCAB  # tokens after the prompt prefix do not change the route
    assert torch.equal(router.route(changed), choice)
    assert torch.equal(router.route_positions(changed), per_pos)
    assert router.route(ids[:, :2]).shape == (6,)  # shorter than route_prefix: uses what is there


def _flip(router, ids, p):
    """(row, position s in 1..p-1, token) such that replacing ids[row, s] by token changes the row's route."""
    base = router.route(ids)
    for b in range(ids.shape[0]):
        for s in range(1, p):
            for tok in range(VOCAB):
                changed = ids[b : b + 1].clone()
                changed[0, s] = tok
                if int(router.route(changed)[0]) != int(base[b]):
                    return b, s, tok
    raise AssertionError("no flipping token found")


def test_routing_never_reads_a_token_it_scores(llama_family):
    """Causality: the logits that predict token ``s`` (positions ``< s``) do not depend on token ``s`` or any later
    token, even when changing token ``s`` (inside the routing prefix) changes the routing decision. The old rule
    (the whole block scored with the model routed on its first P tokens) fails this: the check below shows that
    under it the prediction of the flipped token would have changed."""
    seed, experts = llama_family
    p, t = 6, 12
    router = ExpertRouter([seed, *experts], route_prefix=p, router_init_std=1.0, router_seed=3).eval()
    ids = torch.randint(0, VOCAB, (4, t), generator=torch.Generator().manual_seed(2))
    b, s, tok = _flip(router, ids, p)
    changed = ids.clone()
    changed[b, s] = tok
    with torch.no_grad():
        before, after = router(ids), router(changed)
        torch.testing.assert_close(after[:, :s], before[:, :s], atol=1e-5, rtol=0)  # the prediction of token s
        assert torch.equal(router.route_positions(changed)[:, :s], router.route_positions(ids)[:, :s])
        assert int(router.route(changed)[b]) != int(router.route(ids)[b])  # the final route did change
        # old rule: every position scored by the model routed on the first P tokens -> token s's prediction moves
        old_before = router.models[int(router.route(ids)[b])](input_ids=ids[b : b + 1]).logits[0, s - 1]
        old_after = router.models[int(router.route(changed)[b])](input_ids=changed[b : b + 1]).logits[0, s - 1]
        assert not torch.allclose(old_before, old_after, atol=1e-3)
        # every position: changing token s..T-1 leaves positions < s untouched
        g = torch.Generator().manual_seed(5)
        for pos in range(1, t):
            other = ids.clone()
            other[:, pos:] = torch.randint(0, VOCAB, (4, t - pos), generator=g)
            torch.testing.assert_close(router(other)[:, :pos], before[:, :pos], atol=1e-5, rtol=0)


def test_forward_matches_generation_prefix_logits(llama_family):
    """``forward(x)[:, t]`` is the last-position logits of ``forward(x[:, :t+1])`` (what uncached generation uses),
    and every token but the first is scored, as for every other method."""
    seed, experts = llama_family
    router = ExpertRouter([seed, *experts], route_prefix=5, router_init_std=1.0, router_seed=1).eval()
    ids = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = router(ids)
        assert full.shape == (5, 9, VOCAB)
        for t in range(9):
            torch.testing.assert_close(full[:, t], router(ids[:, : t + 1])[:, -1], atol=1e-5, rtol=0)
        from bts.training.perplexity import token_nll

        assert token_nll(full, ids).shape == (5, 8)
    assert len(router.route_positions(ids)[:, :4].unique()) > 1  # the test exercises more than one model


def test_param_counts(llama_family):
    seed, experts = llama_family
    router = ExpertRouter([seed, *experts])
    one = count_params(seed)
    counts = router.param_counts()
    assert counts.trained == 32 * 4
    assert counts.total == 4 * one + 32 * 4
    assert counts.active == one + 32 * 4


def test_identical_experts_keep_the_dense_logits():
    seed = tiny_llama(0)
    router = ExpertRouter([seed, perturbed_copy(seed, 1, scale=0.0)], router_init_std=1.0).eval()
    ids = torch.randint(0, VOCAB, (3, 9))
    torch.testing.assert_close(router(ids), seed(input_ids=ids).logits, atol=0, rtol=0)
