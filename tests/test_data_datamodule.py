"""DomainMixDataModule on small synthetic local JSONL sources: packing, mixture proportions, reproducibility,
per-domain eval loaders, token cache, input errors."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from bts.core.io import BTSError
from bts.data import datamodule as dm_mod
from bts.data.datamodule import DomainMixDataModule, blocks_of, pack_stream, train_plan
from bts.data.domains import DOMAINS
from bts.data.tokenizer import build_tokenizer

SEQ = 16


def _texts(domain: str, n: int) -> list[str]:
    if domain == "general":
        return [f"Paragraph {i}: the committee met on day {i} and discussed the harbour, the bridge and rain."
                for i in range(n)]
    if domain == "code":
        return [f"def f{i}(a, b):\n    if a > {i}:\n        return a - b\n    return a + b\n" for i in range(n)]
    if domain == "math":
        return [f"Question: What is {i} times {i % 7 + 2}?\nAnswer: {i * (i % 7 + 2)}" for i in range(n)]
    return [f"English: Delete item {i}?\nVietnamese: Xóa mục {i}?" if i % 2 else
            f"Hindi: आइटम {i} हटाएँ?\nEnglish: Delete item {i}?" for i in range(n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    sources = {}
    for d in DOMAINS:
        p = root / f"{d}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(d, 600)), encoding="utf-8")
        sources[d] = {"kind": "hf", "path": "json", "data_files": str(p)}
    tok = build_tokenizer([t for d in DOMAINS for t in _texts(d, 200)], vocab_size=400)
    tok_dir = root / "tok"
    tok.save_pretrained(str(tok_dir))
    return {"root": root, "sources": sources, "tok_dir": str(tok_dir), "cache": str(root / "cache")}


def make(env, **kw):
    args = {"tokenizer_dir": env["tok_dir"], "seq_len": SEQ, "batch_size": 8, "num_train_samples": 64,
            "val_blocks_per_domain": 4, "cache_dir": env["cache"], "sources": env["sources"]}
    args.update(kw)
    return DomainMixDataModule(**args)


def test_pack_stream_and_blocks():
    docs = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13]]
    s = pack_stream(docs, eos_id=2)
    assert s.tolist() == [5, 6, 7, 2, 8, 2, 2, 9, 10, 11, 12, 13, 2]
    b = blocks_of(s, 4)
    assert b.shape == (3, 4) and b.reshape(-1).tolist() == s[:12].tolist()
    assert blocks_of(s, 20).shape == (0, 20)


def test_signature_is_typed_and_documented():
    sig = inspect.signature(DomainMixDataModule.__init__)
    doc = DomainMixDataModule.__init__.__doc__
    for name, p in sig.parameters.items():
        if name == "self":
            continue
        assert p.annotation is not inspect.Parameter.empty, name
        assert f"{name}:" in doc, name
    assert sig.parameters["mixture"].default == "seed" and sig.parameters["seq_len"].default == 128


def test_streams_blocks_and_batches(env):
    dm = make(env)
    dm.setup("fit")
    tok = dm.tokenizer
    assert dm.eos_id == tok.eos_token_id == 2
    for d in DOMAINS:
        stream = dm.token_stream(d, "train")
        # EOS after every document, and decoding the stream gives back the documents in order
        texts = [r["text"] for r in dm_mod.load_split(d, "train", cache_dir=env["cache"], source=env["sources"][d])]
        assert int((stream == 2).sum()) == len(texts)
        first = stream[: int(np.argmax(stream == 2))]
        assert tok.decode(first.tolist()) == texts[0]
        blocks = dm.train_blocks[d]
        assert blocks.shape[1] == SEQ and blocks.shape[0] == len(stream) // SEQ
        assert np.array_equal(blocks.reshape(-1), stream[: blocks.size])  # blocks concatenate to the stream prefix
    batches = list(dm.train_dataloader())
    assert len(batches) == 8
    for b in batches:
        assert set(b) == {"input_ids"} and b["input_ids"].dtype == torch.long and b["input_ids"].shape == (8, SEQ)
    # every training sample is one of the domain's blocks
    ds = dm.train_dataset()
    for i in range(len(ds)):
        d, j = ds.plan[i]
        assert np.array_equal(ds[i]["input_ids"].numpy(), dm.train_blocks[dm.train_domains[d]][j])


def test_mixture_proportions_honoured(env):
    dm = make(env, mixture={"general": 0.5, "code": 0.3, "math": 0.15, "multilingual": 0.05},
              num_train_samples=2000)
    plan = dm.train_plan()
    share = np.bincount(plan[:, 0], minlength=4) / len(plan)
    for k, d in enumerate(dm.train_domains):
        assert abs(share[k] - dm.weights[d]) < 0.03, (d, share[k])
    dm2 = make(env, mixture="expert_math", num_train_samples=2000)
    assert dm2.train_domains == ["general", "math"]
    share = np.bincount(dm2.train_plan()[:, 0], minlength=2) / 2000
    assert abs(share[1] - 0.9) < 0.03


def test_reproducible_order_and_wraparound(env):
    a, b, c = make(env, seed=1), make(env, seed=1), make(env, seed=2)
    ba = torch.cat([x["input_ids"] for x in a.train_dataloader()])
    bb = torch.cat([x["input_ids"] for x in b.train_dataloader()])
    bc = torch.cat([x["input_ids"] for x in c.train_dataloader()])
    assert torch.equal(ba, bb) and not torch.equal(ba, bc)
    # a domain's blocks are drawn without replacement until exhausted, then in a new order (wrap around)
    small = make(env, mixture={"math": 1.0}, num_train_samples=0 + 1)
    small.setup()
    n = len(small.train_blocks["math"])
    plan = train_plan([n], [1.0], 2 * n + 3, seed=0)
    assert sorted(plan[:n, 1].tolist()) == list(range(n)) and sorted(plan[n:2 * n, 1].tolist()) == list(range(n))
    assert not np.array_equal(plan[:n, 1], plan[n:2 * n, 1])
    # epoch e continues where epoch e-1 stopped
    e0, e1 = train_plan([n], [1.0], 5, 0, epoch=0), train_plan([n], [1.0], 5, 0, epoch=1)
    assert np.array_equal(np.concatenate([e0, e1])[:, 1], plan[:10, 1])


def test_val_and_test_loaders_per_domain(env):
    dm = make(env, eval_domains=["math", "code"], val_blocks_per_domain=3)
    dm.setup("validate")
    assert dm.eval_domains == ["math", "code"]
    vals, tests = dm.val_dataloader(), dm.test_dataloader()
    assert isinstance(vals, list) and len(vals) == 2 and len(tests) == 2
    for loader, d in zip(vals, ["math", "code"]):
        x = torch.cat([b["input_ids"] for b in loader])
        assert x.shape == (3, SEQ)
        assert np.array_equal(x.numpy(), blocks_of(dm.token_stream(d, "val"), SEQ)[:3])
        again = torch.cat([b["input_ids"] for b in loader])
        assert torch.equal(x, again)  # fixed order
    x_test = torch.cat([b["input_ids"] for b in tests[0]])
    assert not torch.equal(x_test, torch.cat([b["input_ids"] for b in vals[0]]))
    assert make(env).eval_domains == list(DOMAINS)


def test_token_cache_is_reused(env, monkeypatch):
    make(env).setup()

    def boom(*a, **k):
        raise AssertionError("tokenized again although cached")

    monkeypatch.setattr(dm_mod, "encode_batch", boom)
    dm = make(env)
    dm.setup()
    assert len(dm.train_blocks["code"]) > 0
    assert list((make(env)._cache() / "tokens" / "code").glob("train-*.npy"))


def test_input_errors(env, tmp_path):
    with pytest.raises(BTSError, match="unknown domain 'poetry'"):
        make(env, eval_domains=["code", "poetry"])
    with pytest.raises(BTSError, match="unknown domain 'poetry'"):
        make(env, mixture={"poetry": 1.0})
    with pytest.raises(BTSError, match="unknown domain 'poetry'"):
        make(env, sources={"poetry": {"kind": "hf", "path": "json"}})
    with pytest.raises(BTSError, match="negative"):
        make(env, mixture={"code": -1.0, "math": 2.0})
    with pytest.raises(BTSError, match="all zero"):
        make(env, mixture={"code": 0.0})
    with pytest.raises(BTSError, match="unknown mixture preset 'best'"):
        make(env, mixture="best")
    with pytest.raises(BTSError, match="seq_len must be an integer >= 2"):
        make(env, seq_len=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "tiny"}) + "\n")
    sources = dict(env["sources"], code={"kind": "hf", "path": "json", "data_files": str(empty)})
    dm = make(env, sources=sources, mixture={"code": 0.5, "general": 0.5}, cache_dir=str(tmp_path / "c"))
    with pytest.raises(BTSError, match=r"domain code has mixture weight 0.5 but its train data is empty"):
        dm.setup()
    # a domain with zero weight may be empty for training (its eval data is still required)
    dm = make(env, sources=sources, mixture="expert_math", eval_domains=["math"], cache_dir=str(tmp_path / "c"))
    dm.setup()
    with pytest.raises(BTSError, match="no tokenizer at"):
        make(env, tokenizer_dir=str(tmp_path / "nothing")).setup()


def test_lightning_trainer_integration(env):
    """The loaders plug into a Lightning fit/validate loop (one val loader per domain)."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(400, 8)
            self.head = torch.nn.Linear(8, 400)
            self.seen = {}

        def forward(self, ids):
            return self.head(self.emb(ids))

        def _loss(self, ids):
            logits = self(ids[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, 400), ids[:, 1:].reshape(-1))

        def training_step(self, batch, i):
            return self._loss(batch["input_ids"])

        def validation_step(self, batch, i, dataloader_idx=0):
            self.seen[dataloader_idx] = self.seen.get(dataloader_idx, 0) + len(batch["input_ids"])
            self.log("val_loss", self._loss(batch["input_ids"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make(env, num_train_samples=16)
    model = Tiny()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert model.seen == {k: 4 for k in range(4)}


def test_lightning_cli_schema_parses():
    """The __init__ signature works as a LightningCLI/jsonargparse schema (types and defaults)."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(exit_on_error=False)
    p.add_class_arguments(DomainMixDataModule, "data")
    cfg = p.parse_args(["--data.tokenizer_dir=tok", '--data.mixture={"code": 0.5, "general": 0.5}',
                        "--data.eval_domains=[math, code]",
                        '--data.sources={"code": {"kind": "hf", "path": "json", "data_files": "x.jsonl"}}'])
    assert cfg.data.mixture == {"code": 0.5, "general": 0.5} and cfg.data.eval_domains == ["math", "code"]
    assert cfg.data.sources["code"]["path"] == "json"
    cfg = p.parse_args(["--data.tokenizer_dir=tok"])
    assert cfg.data.mixture == "seed" and cfg.data.seq_len == 128 and cfg.data.num_train_samples == 4096
