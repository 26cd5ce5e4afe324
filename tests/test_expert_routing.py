"""Expert routing (baselines.expert_routing): targets, prefix routing, training of the router through the shared
Lightning loop on a synthetic task where the generating model is clearly the best, counts, artifacts."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from baselines.expert_routing import ExpertRouter, ExpertRoutingModule, load_expert_router
from bts.io import state_dict_sha256
from bts.params import count_params
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
    router = ExpertRouter([seed, *experts], route_prefix=4, router_init_std=1.0).eval()
    ids = torch.randint(0, VOCAB, (6, 10), generator=torch.Generator().manual_seed(1))
    choice = router.route(ids)
    logits = router(ids)
    for b in range(6):
        dense = router.models[int(choice[b])](input_ids=ids[b : b + 1]).logits
        torch.testing.assert_close(logits[b : b + 1], dense, atol=1e-6, rtol=0)
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % VOCAB  # tokens after the prompt prefix do not change the route
    assert torch.equal(router.route(changed), choice)
    assert router.route(ids[:, :2]).shape == (6,)  # shorter than route_prefix: uses what is there


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
