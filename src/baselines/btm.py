"""BTM ensemble: Branch-Train-Merge's inference-time mixture of expert LMs.

Li et al., "Branch-Train-Merge: Embarrassingly Parallel Training of Expert Language Models",
arXiv 2208.03306 (2022), §3 (ensembling with a domain posterior). Here the ensemble members are the seed and
the experts (docs/design.md §2); nothing trains.

Definition (1-indexed tokens ``x_1..x_T``; output position ``t`` scores the next token ``x_{t+1}``)::

    p(x_{t+1} | x_≤t) = Σ_m  p(m | x_≤t) · p_m(x_{t+1} | x_≤t)

    p(m | x_≤t) ∝ p(m) · Π_{s=2..t} p_m(x_s | x_<s)         (Bayes' rule; uniform prior p(m) = 1/M)

So the posterior used at position ``t`` conditions on every token that is input at positions ``≤ t``
(``x_1..x_t``), through the likelihood of ``x_2..x_t``: the first token has no likelihood (nothing
predicts it), so at ``t = 1`` the weights are the prior. The posterior never looks at the token being
predicted. All sums are done in log space (``logsumexp``), the running log-likelihoods in float64.

The forward returns log-probabilities ``[B, T, V]`` (float32). ``generate`` keeps one KV cache per member
and updates each member's running log-likelihood with every appended token — the same distribution as the
reference uncached loop.

Parameter accounting (paper Table 2): trained 0; every member runs for every token, so
``total = active = Σ_m params(m)``.

``bts merge --method btm`` writes no weights: it writes a directory with ``btm.json`` (member paths, their
state-dict sha256, prior, ``params`` counts), ``artifact.json`` (``{"kind": "btm"}``, for ``bts.eval.loading``)
and the seed's tokenizer files; :meth:`BTMEnsemble.from_dir` / :func:`load_artifact` load it. The evaluation
loader finds it through the entry point ``btm = "baselines.btm:load_artifact"`` in the ``bts.artifacts`` group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from baselines.merge import check_model_dirs, check_output_dir
from bts.core import hf_compat, tree_attention
from bts.core.io import BTSError, atomic_dir, atomic_write_json, copy_tokenizer_files, state_dict_sha256
from bts.core.language_model import sample_next
from bts.core.params import ParamCounts, count_params
from bts.core.tree_attention import TreeRows
from bts.dense.modeling import freeze, load_causal_lm


def _cached_step(model: nn.Module, input_ids: Tensor, cache):
    """One forward with a KV cache (its argument and output names differ across transformers 5.x: ``hf_compat``)."""
    out = model(input_ids=input_ids, use_cache=True, **hf_compat.model_cache_kwargs(model, cache))
    return out, hf_compat.output_cache(out)


def _normalised_log_prior(prior: Sequence[float] | None, m: int) -> Tensor:
    if prior is None:
        return torch.full((m,), -math.log(m), dtype=torch.float64)
    prior = [float(p) for p in prior]
    if len(prior) != m:
        raise BTSError(f"btm: expected {m} prior weights (seed + experts, seed first), got {len(prior)}")
    if any(not math.isfinite(p) or p < 0 for p in prior) or sum(prior) <= 0:
        raise BTSError(f"btm: prior weights must be >= 0 with a positive sum, got {prior}")
    p = torch.tensor(prior, dtype=torch.float64)
    return torch.log(p / p.sum())


class BTMEnsemble(nn.Module):
    """Posterior-weighted ensemble of frozen causal LMs (members: seed first, then experts)."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        prior: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
    ):
        super().__init__()
        if not models:
            raise BTSError("btm: at least one model is required")
        vocab = {int(m.config.vocab_size) for m in models}
        if len(vocab) != 1:
            raise BTSError(f"btm: all models must share one vocabulary, got vocab sizes {sorted(vocab)}")
        self.models = nn.ModuleList([freeze(m) for m in models])
        self.names = list(names) if names is not None else [f"model{i}" for i in range(len(models))]
        self.register_buffer("log_prior", _normalised_log_prior(prior, len(models)), persistent=False)

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_dirs(cls, dirs: Sequence[str | Path], prior: Sequence[float] | None = None) -> BTMEnsemble:
        dirs = [Path(d) for d in dirs]
        check_model_dirs(dirs)
        return cls([load_causal_lm(d) for d in dirs], prior=prior, names=[d.name for d in dirs])

    @classmethod
    def from_dir(cls, path: str | Path, verify: bool = True) -> BTMEnsemble:
        """Load a directory written by :func:`write_btm_dir` (``verify``: members' sha256 must match)."""
        path = Path(path)
        info_path = path / "btm.json"
        if not info_path.is_file():
            raise BTSError(f"not a BTM ensemble directory (no btm.json): {path}")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        members = info["models"]
        check_model_dirs([Path(m["path"]) for m in members])
        models = []
        for m in members:
            model = load_causal_lm(m["path"])
            if verify and state_dict_sha256(model.state_dict()) != m["state_dict_sha256"]:
                raise BTSError(
                    f"btm: model {m['path']} changed since {info_path} was written (sha256 differs)"
                )
            models.append(model)
        ens = cls(models, prior=info.get("prior"), names=[m["name"] for m in members])
        ens.info = info
        return ens

    # -- the mixture -----------------------------------------------------------------------------------

    def _member_log_probs(self, input_ids: Tensor) -> Tensor:
        """``[M, B, T, V]`` float32 log-probabilities of every member."""
        return torch.stack(
            [
                torch.log_softmax(m(input_ids=input_ids, use_cache=False).logits.float(), dim=-1)
                for m in self.models
            ]
        )

    @staticmethod
    def _prefix_log_lik(logps: Tensor, input_ids: Tensor) -> Tensor:
        """``[M, B, T]`` float64: at position t (0-indexed), Σ_{s=1..t} log p_m(x_s | x_<s); 0 at t = 0."""
        tok = logps[:, :, :-1].gather(-1, input_ids[None, :, 1:, None].expand(logps.shape[0], -1, -1, 1))
        cum = tok.squeeze(-1).double().cumsum(dim=-1)
        return torch.cat([torch.zeros_like(cum[..., :1]), cum], dim=-1)

    def _log_posterior_from(self, prefix_ll: Tensor) -> Tensor:
        """Normalised log p(m | prefix) over dim 0 from ``[M, ...]`` prefix log-likelihoods (float64)."""
        prior = self.log_prior.to(prefix_ll.device).reshape(-1, *([1] * (prefix_ll.dim() - 1)))
        joint = prior + prefix_ll
        return joint - torch.logsumexp(joint, dim=0, keepdim=True)

    def _mix(self, log_post: Tensor, logps: Tensor) -> Tensor:
        return torch.logsumexp(log_post.to(logps.dtype).unsqueeze(-1) + logps, dim=0)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Log-probabilities ``[B, T, V]`` of the posterior-weighted mixture."""
        logps = self._member_log_probs(input_ids)
        log_post = self._log_posterior_from(self._prefix_log_lik(logps, input_ids))
        return self._mix(log_post, logps)

    def forward_tree(self, input_ids: Tensor, tree: TreeRows) -> Tensor:
        """Log-probabilities ``[B, T, V]`` of the mixture on packed rows (``bts.core.tree_attention``): the
        posterior at a position conditions on the tokens it attends to (the shared context and its own
        continuation), exactly as on that continuation's own row."""
        logps = torch.stack([torch.log_softmax(tree_attention.hf_logits(m, input_ids, tree).float(), dim=-1)
                             for m in self.models])  # [M, B, T, V]
        before = tree.predecessors()  # the position whose output predicts each token; -1 for none
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
        tok = logps[:, rows, before.clamp(min=0), input_ids].double()  # [M, B, T]
        tok = torch.where(before >= 0, tok, torch.zeros_like(tok))
        prefix_ll = torch.einsum("bts,mbs->mbt", tree.visible.double(), tok)  # sum over the tokens seen so far
        return self._mix(self._log_posterior_from(prefix_ll), logps)

    def supports_tree_attention(self) -> bool:
        return all(tree_attention.supports(m.config) for m in self.models)

    @torch.no_grad()
    def posterior(self, input_ids: Tensor) -> Tensor:
        """``[B, T, M]`` float64: the weights p(m | prefix) that position t mixes with (prefix = the input
        tokens at positions <= t; the likelihood covers positions 1..t, 0-indexed)."""
        logps = self._member_log_probs(input_ids)
        return self._log_posterior_from(self._prefix_log_lik(logps, input_ids)).exp().permute(1, 2, 0)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Decode with one KV cache per member (same semantics as ``greedy_or_sample_uncached``)."""
        out = input_ids
        if max_new_tokens <= 0:
            return out
        caches, full = [], []
        for m in self.models:
            o, cache = _cached_step(m, input_ids, None)
            caches.append(cache)
            full.append(torch.log_softmax(o.logits.float(), dim=-1))
        logps = torch.stack(full)  # [M, B, T, V]
        prefix_ll = self._prefix_log_lik(logps, input_ids)[..., -1]  # [M, B]
        last = logps[:, :, -1]  # [M, B, V]
        del full, logps
        done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        for step in range(max_new_tokens):
            scores = self._mix(self._log_posterior_from(prefix_ll), last)  # [B, V]
            nxt = sample_next(scores, do_sample, temperature, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            idx = nxt[None, :, None].expand(last.shape[0], -1, 1)
            prefix_ll = prefix_ll + last.gather(-1, idx).squeeze(-1).double()
            lasts = []
            for i, m in enumerate(self.models):
                o, caches[i] = _cached_step(m, nxt[:, None], caches[i])
                lasts.append(torch.log_softmax(o.logits[:, -1].float(), dim=-1))
            last = torch.stack(lasts)
        return out

    # -- accounting ------------------------------------------------------------------------------------

    def param_counts(self) -> ParamCounts:
        total = sum(count_params(m) for m in self.models)
        return ParamCounts(trained=0, total=total, active=total)


def write_btm_dir(
    seed_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    out_dir: str | Path,
    prior: Sequence[float] | None = None,
    force: bool = False,
) -> dict:
    """Write a BTM ensemble directory (``btm.json`` + the seed's tokenizer files) atomically; returns the
    record. Members are referenced by absolute path and pinned by state-dict sha256 (no weights copied)."""
    seed_dir, out_dir = Path(seed_dir), Path(out_dir)
    dirs = [seed_dir, *[Path(d) for d in expert_dirs]]
    if len(dirs) < 2:
        raise BTSError("at least one expert directory is required")
    check_model_dirs(dirs)
    check_output_dir(out_dir, dirs, "btm.json", force)
    _normalised_log_prior(prior, len(dirs))  # validate before loading anything
    members, counts = [], []
    vocab = set()
    for role, d in zip(["seed"] + ["expert"] * (len(dirs) - 1), dirs):
        model = load_causal_lm(d)
        vocab.add(int(model.config.vocab_size))
        members.append(
            {
                "name": d.name,
                "role": role,
                "path": str(d.resolve()),
                "state_dict_sha256": state_dict_sha256(model.state_dict()),
            }
        )
        counts.append(count_params(model))
        del model
    if len(vocab) != 1:
        raise BTSError(f"btm: all models must share one vocabulary, got vocab sizes {sorted(vocab)}")
    record = {
        "method": "btm",
        "models": members,
        "prior": [float(p) for p in prior] if prior is not None else None,
        "posterior": "Bayes rule over the likelihood of the input prefix (tokens 2..t at position t)",
        "params": ParamCounts(trained=0, total=sum(counts), active=sum(counts)).to_dict(),
    }
    with atomic_dir(out_dir) as tmp:
        record["tokenizer_files"] = copy_tokenizer_files(seed_dir, tmp)
        atomic_write_json(tmp / "btm.json", record)
        atomic_write_json(tmp / "artifact.json", {"kind": "btm"})
    return record


def load_artifact(path: str | Path):
    """``bts.artifacts`` loader: ``(model, tokenizer, params_dict)`` for a BTM ensemble directory."""
    from bts.data.tokenizer import load_tokenizer_from

    path = Path(path)
    model = BTMEnsemble.from_dir(path).eval()
    info = model.info
    tok_dir = path if info.get("tokenizer_files") else Path(info["models"][0]["path"])
    return model, load_tokenizer_from(tok_dir), model.param_counts().to_dict()
