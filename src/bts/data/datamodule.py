"""``DomainMixDataModule``: packed next-token-prediction sequences drawn from a mixture of domains.

Pipeline, per domain and split:

1. documents: :func:`bts.data.corpus.load_split` (embedded corpus, built on first use, or a ``datasets`` source);
2. token ids of every document (no special tokens), cached as ``<cache>/tokens/<domain>/<split>-<key>.npy`` where
   the key hashes the tokenizer (:func:`~bts.data.tokenizer.tokenizer_fingerprint`) and the document texts, so a
   repeated run loads instead of tokenizing;
3. one stream per domain: ``doc_1 EOS doc_2 EOS ...`` (:func:`pack_stream`);
4. fixed ``seq_len`` blocks: the stream cut into consecutive non-overlapping pieces, the incomplete tail dropped
   (:func:`blocks_of`).

Training (``train_dataloader``): ``num_train_samples`` sequences per epoch. A seeded RNG draws the domain of each
sample from the mixture weights; the sample is that domain's next block in a seeded random block order, and the
order is re-permuted (with a new seed) each time a domain's blocks are exhausted. The plan is a pure function of
``(seed, epoch)``, and epoch ``e`` continues each domain's block order where epoch ``e-1`` stopped (the epoch is
the trainer's ``current_epoch`` when ``train_dataloader`` is called: use ``reload_dataloaders_every_n_epochs=1``
to draw fresh samples every epoch). Batches are ``{"input_ids": LongTensor[batch_size, seq_len]}``; the model
shifts labels itself.

Resuming (``bts fit --ckpt_path``): the datamodule's ``state_dict`` (saved in Lightning checkpoints) records the
epoch and how many training batches of it were consumed; on resume the training loader skips exactly those
batches (a sampler that starts past them, nothing is loaded for them), so a run resumed mid-epoch sees the same
batches in the same order as an uninterrupted one. Lightning by itself would restart the epoch at batch 0 for a
map-style dataset. The plan of a loader that is not reloaded every epoch (``reload_dataloaders_every_n_epochs=0``)
is epoch 0's, also after a resume. Exact for single-process training; under a distributed strategy Lightning
replaces the sampler and the resumed epoch restarts at its first batch (a warning says so).

Evaluation: ``val_dataloader()`` / ``test_dataloader()`` return a **list** of loaders, one per domain of
``eval_domains`` (in that order), each over the first ``val_blocks_per_domain`` blocks of that domain's val / test
stream (fixed order, no shuffling).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bts.core.io import BTSError, atomic_path, atomic_write_text

from .corpus import DomainSource, ensure_built, load_split
from .domains import DOMAINS, check_domain, default_cache_dir
from .mixtures import resolve_mixture
from .sources import EmbeddedConfig
from .tokenizer import encode_batch, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger("bts.data")


# ------------------------------------------------------------------------------------------ packing helpers
def pack_stream(token_lists, eos_id: int, dtype=np.int64) -> np.ndarray:
    """``ids_1 + [eos] + ids_2 + [eos] + ...`` as one 1-D array (every document is followed by EOS)."""
    total = sum(len(t) + 1 for t in token_lists)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for ids in token_lists:
        n = len(ids)
        out[pos:pos + n] = ids
        out[pos + n] = eos_id
        pos += n + 1
    return out


def blocks_of(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """``[n_blocks, seq_len]`` view of the stream's first ``n_blocks * seq_len`` tokens (tail dropped)."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def _stream_sha256(stream: np.ndarray) -> str:
    return hashlib.sha256(str(stream.dtype).encode() + b"|" + np.ascontiguousarray(stream).tobytes()).hexdigest()


def _stream_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def train_plan(block_counts: list[int], weights: list[float], num_samples: int, seed: int,
               epoch: int = 0) -> np.ndarray:
    """``[num_samples, 2]`` array of ``(domain index, block index)`` for one epoch (see the module docstring)."""
    k = len(block_counts)
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    rng = np.random.default_rng([seed, 0x5EED])
    consumed = np.zeros(k, dtype=np.int64)
    for _ in range(epoch):  # replay earlier epochs' draws so that this epoch continues their block orders
        consumed += np.bincount(rng.choice(k, size=num_samples, p=p), minlength=k)
    domains = rng.choice(k, size=num_samples, p=p)
    plan = np.empty((num_samples, 2), dtype=np.int64)
    plan[:, 0] = domains
    perms: dict[tuple[int, int], np.ndarray] = {}
    pos = consumed.copy()
    for i, d in enumerate(domains):
        n = block_counts[d]
        pass_, j = divmod(int(pos[d]), n)
        key = (int(d), pass_)
        if key not in perms:
            perms[key] = np.random.default_rng([seed, int(d), pass_]).permutation(n)
        plan[i, 1] = perms[key][j]
        pos[d] += 1
    return plan


class MixtureTrainDataset(Dataset):
    """Samples of one epoch: item ``i`` is block ``plan[i, 1]`` of domain ``plan[i, 0]``."""

    def __init__(self, blocks: list[np.ndarray], plan: np.ndarray):
        self.blocks = blocks
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d, b = self.plan[i]
        return {"input_ids": torch.from_numpy(self.blocks[d][b].astype(np.int64))}


class ResumableSequentialSampler(Sampler[int]):
    """``0, 1, ..., n - 1``; after ``skip(k)`` the next pass only starts at ``k`` (later passes start at 0).
    ``len`` stays ``n`` so that Lightning's epoch length and lr schedule do not change on resume."""

    def __init__(self, n: int):
        self.n = int(n)
        self._start = 0

    def skip(self, k: int) -> None:
        self._start = max(0, min(int(k), self.n))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        start, self._start = self._start, 0
        return iter(range(start, self.n))


class BlockDataset(Dataset):
    """Fixed-order blocks of one domain (evaluation)."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.blocks[i].astype(np.int64))}


# ---------------------------------------------------------------------------------------------- datamodule
class DomainMixDataModule(L.LightningDataModule):
    """Packed LM sequences from a weighted mixture of the ``general`` / ``code`` / ``math`` / ``multilingual``
    domains, with one validation/test loader per evaluation domain (held-out perplexity per domain)."""

    def __init__(
        self,
        tokenizer_dir: str,
        mixture: str | dict[str, float] = "seed",
        seq_len: int = 128,
        batch_size: int = 16,
        num_train_samples: int = 4096,
        val_blocks_per_domain: int = 32,
        eval_domains: list[str] | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        sources: dict[str, dict] | None = None,
        corpus: dict[str, Any] | None = None,
    ):
        """
        Args:
            tokenizer_dir: Directory of a saved ``transformers`` fast tokenizer (``bts.data.train_tokenizer``).
                Its EOS token separates packed documents.
            mixture: Training mixture: a preset name (``seed``, ``expert_code``, ``expert_math``,
                ``expert_multilingual``, ``bts``, ``uniform``) or weights ``{domain: weight}`` (normalised; domains
                left out get 0).
            seq_len: Tokens per packed sequence (every batch is ``[batch_size, seq_len]``).
            batch_size: Sequences per batch (training and evaluation).
            num_train_samples: Packed training sequences drawn per epoch (domains drawn by the mixture weights).
            val_blocks_per_domain: Evaluation sequences per domain: the first N blocks of its val (test) stream.
            eval_domains: Domains that get a validation/test loader, in this order (``None`` = all four).
            seed: Seed of the training draws (domain per sample and block orders); same seed, same batches.
            num_workers: DataLoader worker processes.
            cache_dir: Corpus/token cache directory (``None``: ``$BTS_CACHE_DIR``, else ``./.cache/bts``).
            sources: Per-domain source overrides, e.g. ``{"code": {"kind": "hf", "path": "json",
                "data_files": "code.jsonl"}}`` (fields of ``bts.data.DomainSource``); other domains use the
                embedded corpus.
            corpus: Build options of the embedded corpus (fields of ``bts.data.EmbeddedConfig``, e.g.
                ``{"math_per_module": 2000}``); ``None`` = defaults. Must match the options the cache was built
                with, or the affected domains are rebuilt.
        """
        super().__init__()
        self.save_hyperparameters()
        for name, value, low in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                                 ("num_train_samples", num_train_samples, 1),
                                 ("val_blocks_per_domain", val_blocks_per_domain, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BTSError(f"{name} must be an integer >= {low}, got {value!r}")
        self.tokenizer_dir = str(tokenizer_dir)
        self.mixture = mixture
        self.weights = resolve_mixture(mixture)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_train_samples = num_train_samples
        self.val_blocks_per_domain = val_blocks_per_domain
        domains = list(DOMAINS) if eval_domains is None else list(eval_domains)
        if not domains:
            raise BTSError("eval_domains is empty; list at least one domain")
        for d in domains:
            check_domain(d)
        if len(set(domains)) != len(domains):
            raise BTSError(f"eval_domains has duplicates: {domains}")
        self.eval_domains = domains
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.sources: dict[str, DomainSource] = {}
        for d, src in (sources or {}).items():
            check_domain(d)
            self.sources[d] = DomainSource.coerce(src)
        self.corpus_config = EmbeddedConfig.from_dict(corpus)
        self._tokenizer = None
        self._ready = False
        self._resume: dict[str, int] | None = None  # set by load_state_dict (resuming a Lightning checkpoint)
        self.train_domains = [d for d, w in self.weights.items() if w > 0]
        self.train_blocks: dict[str, np.ndarray] = {}
        self.val_blocks: dict[str, np.ndarray] = {}
        self.test_blocks: dict[str, np.ndarray] = {}
        self.token_counts: dict[str, dict[str, int]] = {}

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def tokenizer(self):
        """The fast tokenizer loaded from ``tokenizer_dir`` (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def _cache(self) -> Path:
        return default_cache_dir(self.cache_dir)

    def _embedded(self, domains) -> list[str]:
        return [d for d in domains if self.sources.get(d, DomainSource()).kind == "embedded"]

    def token_stream(self, domain: str, split: str) -> np.ndarray:
        """EOS-separated token stream of one domain/split (cached on disk, see the module docstring)."""
        recs = load_split(domain, split, cache_dir=self.cache_dir, source=self.sources.get(domain),
                          config=self.corpus_config)
        texts = [r["text"] for r in recs]
        tok = self.tokenizer
        h = hashlib.sha256(tokenizer_fingerprint(tok).encode())
        for t in texts:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        path = self._cache() / "tokens" / domain / f"{split}-{h.hexdigest()[:24]}.npy"
        digest_path = path.with_suffix(".sha256")  # written after the .npy: a stream without one is not trusted
        if path.is_file():
            try:
                stream = np.load(path, allow_pickle=False)
                if not digest_path.is_file():
                    log.info("token cache %s has no checksum (older cache or interrupted write); re-tokenizing", path)
                elif digest_path.read_text().strip() == _stream_sha256(stream):
                    return stream
                else:
                    log.warning("token cache %s does not match its sha256 (corrupt); re-tokenizing", path)
            except (OSError, ValueError):
                log.warning("token cache %s is unreadable; re-tokenizing", path)
        stream = pack_stream(encode_batch(tok, texts), self.eos_id, dtype=_stream_dtype(len(tok)))
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, stream, allow_pickle=False)
        atomic_write_text(digest_path, _stream_sha256(stream) + "\n")
        return stream

    # ------------------------------------------------------------------------------------------- lightning
    def prepare_data(self) -> None:
        """Build the embedded corpus of the domains in use (once per node; ``setup`` would also do it)."""
        needed = set(self.train_domains) | set(self.eval_domains)
        emb = self._embedded([d for d in DOMAINS if d in needed])
        if emb:
            ensure_built(self.cache_dir, emb, config=self.corpus_config)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        _ = self.tokenizer
        for d in self.train_domains:
            stream = self.token_stream(d, "train")
            blocks = blocks_of(stream, self.seq_len)
            self.token_counts.setdefault(d, {})["train"] = len(stream)
            if len(blocks) == 0:
                raise BTSError(f"domain {d} has mixture weight {self.weights[d]:.3g} but its train data is empty "
                               f"({len(stream)} tokens < seq_len {self.seq_len})")
            self.train_blocks[d] = blocks
        for split, store in (("val", self.val_blocks), ("test", self.test_blocks)):
            for d in self.eval_domains:
                stream = self.token_stream(d, split)
                self.token_counts.setdefault(d, {})[split] = len(stream)
                blocks = blocks_of(stream, self.seq_len)[: self.val_blocks_per_domain]
                if len(blocks) == 0:
                    raise BTSError(f"eval domain {d} has no {split} data ({len(stream)} tokens < seq_len "
                                   f"{self.seq_len})")
                if len(blocks) < self.val_blocks_per_domain:
                    log.warning("eval domain %s: only %d %s blocks of %d tokens (asked for %d)", d, len(blocks),
                                split, self.seq_len, self.val_blocks_per_domain)
                store[d] = blocks
        self._ready = True

    def _loader(self, ds: Dataset, sampler: Sampler | None = None) -> DataLoader:
        # pinned host memory on a GPU machine: the host-to-device copy of a batch is then asynchronous instead of
        # waiting for the queued training step (a per-step sync)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=False,
                          pin_memory=torch.cuda.is_available())

    def train_plan(self, epoch: int = 0) -> np.ndarray:
        """``[num_train_samples, 2]`` (index into ``train_domains``, block index) of one epoch."""
        self.setup()
        return train_plan([len(self.train_blocks[d]) for d in self.train_domains],
                          [self.weights[d] for d in self.train_domains], self.num_train_samples, self.seed, epoch)

    def train_dataset(self, epoch: int = 0) -> MixtureTrainDataset:
        self.setup()
        return MixtureTrainDataset([self.train_blocks[d] for d in self.train_domains], self.train_plan(epoch))

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        # a loader that is not reloaded every epoch is built once, at epoch 0, in an uninterrupted run: use that plan
        reload = int(getattr(trainer, "reload_dataloaders_every_n_epochs", 0) or 0) if trainer is not None else 1
        ds = self.train_dataset(epoch if reload > 0 else 0)
        sampler = ResumableSequentialSampler(len(ds))
        resume, self._resume = self._resume, None
        n_batches = math.ceil(len(ds) / self.batch_size)
        if resume is not None and resume.get("epoch") == epoch and 0 < resume.get("batches_done", 0) < n_batches:
            done = int(resume["batches_done"])
            if trainer is not None and trainer.world_size > 1:
                log.warning("resuming mid-epoch under a distributed strategy: epoch %d restarts at its first batch "
                            "(the distributed sampler cannot skip the %d batches already trained)", epoch, done)
            else:
                sampler.skip(done * self.batch_size)
                log.info("resuming epoch %d after its first %d training batches", epoch, done)
                # Lightning warns that a mid-epoch resume of a loader without its own state_dict is unreliable; this
                # one's position lives in the datamodule's state_dict and the sampler has just skipped exactly the
                # batches trained, so the resume is exact (tests/test_fit_interrupt.py)
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the "
                                        "epoch ended and your dataloader is not resumable")
        return self._loader(ds, sampler)

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        return [self._loader(BlockDataset(self.val_blocks[d])) for d in self.eval_domains]

    def test_dataloader(self) -> list[DataLoader]:
        self.setup()
        return [self._loader(BlockDataset(self.test_blocks[d])) for d in self.eval_domains]

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the draw settings and, during fit, the position in the epoch."""
        state: dict[str, Any] = {"seed": self.seed, "weights": self.weights}
        trainer = getattr(self, "trainer", None)
        if trainer is not None and getattr(trainer.state.fn, "value", None) == "fit":
            state["epoch"] = int(trainer.current_epoch)
            state["batches_done"] = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") != self.seed or state_dict.get("weights") != self.weights:
            log.warning("the checkpoint was trained with data seed %s / mixture %s, this run uses %s / %s: the "
                        "resumed data order differs from the original run's", state_dict.get("seed"),
                        state_dict.get("weights"), self.seed, self.weights)
        if "batches_done" in state_dict:
            self._resume = {"epoch": state_dict.get("epoch"), "batches_done": state_dict["batches_done"]}


__all__ = ["BlockDataset", "DomainMixDataModule", "MixtureTrainDataset", "ResumableSequentialSampler", "blocks_of",
           "pack_stream", "train_plan"]
