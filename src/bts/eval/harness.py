"""lm-evaluation-harness adapter: any ``LanguageModel`` + tokenizer as an lm-eval model named ``"bts"``.

Use it to evaluate real checkpoints on the paper's benchmarks (MMLU 5-shot, BBH 3-shot, MBPP 3-shot,
HumanEval 0-shot, Flores 1-shot, GSM8K 8-shot, MATH 4-shot)::

    import bts.eval.harness                       # registers "bts"
    lm_eval.simple_evaluate(model="bts", model_args="pretrained=DIR", tasks=["gsm8k"], num_fewshot=8)
    lm_eval.simple_evaluate(model=BTSHarnessLM(model=my_stitched_model, tokenizer=tok), tasks=[...])

Scoring mirrors lm-eval's own ``hf`` model (``HFLM``) so that a dense checkpoint gets the same numbers through
either path (tested to 1e-4): the same tokenisation rules (``tok_encode`` adds special tokens as the tokenizer
does by default unless the string already starts with BOS, or as ``add_bos_token`` says), the same
log-likelihood prefix token (BOS, else EOS), left truncation to ``max_length + 1`` tokens, and the same rolling
windows for ``loglikelihood_rolling``. Differences: no padding (rows of equal length are batched together,
since a ``LanguageModel`` takes no attention mask), and ``generate_until`` decodes batch-1 through the model's
own ``generate`` in chunks with stop-string checks (see ``bts.eval.generation``).

Requires the optional ``harness`` extra (``pip install -e ".[harness]"``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - optional extra
    raise ImportError("bts.eval.harness needs lm-eval: pip install -e '.[harness]'") from e

from bts.core.io import BTSError
from bts.core.language_model import HFLanguageModel
from bts.eval.generation import generate_text, model_device

_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTSError(f"cannot load tokenizer from {path}: {first}") from None


@register_model("bts")
class BTSHarnessLM(TemplateLM):
    """An lm-eval ``TemplateLM`` around a ``LanguageModel`` (``model``) or a Hugging Face directory
    (``pretrained``, loaded with ``bts.dense.modeling.load_causal_lm``)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model=None,
        tokenizer=None,
        max_length: int | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        gen_chunk: int = 16,
        seed: int = 1234,
        **kwargs,
    ):
        """
        Args:
            pretrained: Hugging Face model directory (dense or merged model); ignored when ``model`` is given.
            model: a ``LanguageModel`` object (BTS, BTM, routers, BTX/BAM ...).
            tokenizer: tokenizer object or directory (default: ``pretrained``).
            max_length: context length; default: the model config's ``max_position_embeddings`` (else 2048).
            batch_size: rows per forward pass for log-likelihoods ("auto" = 8).
            device: device to move a model loaded from ``pretrained`` to (default: cuda if available).
            dtype: dtype of a model loaded from ``pretrained``.
            max_gen_toks: default generation budget of ``generate_until``.
            add_bos_token: force adding (True) or not adding (False) special tokens when encoding.
            prefix_token_id: token that conditions empty contexts and rolling windows (default BOS, else EOS).
            gen_chunk: tokens per ``generate`` call between stop-string checks.
            seed: seed of the sampling generator (only for ``do_sample=True``).
        """
        super().__init__()
        if model is None:
            if pretrained is None:
                raise BTSError("BTSHarnessLM needs model= (a LanguageModel) or pretrained= (a model directory)")
            from bts.dense.modeling import load_causal_lm

            torch_dtype = getattr(torch, str(dtype).replace("torch.", ""), None)
            if not isinstance(torch_dtype, torch.dtype):
                raise BTSError(f"unknown dtype {dtype!r}")
            hf = load_causal_lm(pretrained, dtype=torch_dtype)
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = HFLanguageModel(hf.to(dev)).eval()
            if tokenizer is None:
                tokenizer = pretrained
        elif device is not None and isinstance(model, torch.nn.Module):
            model = model.to(device)
        if tokenizer is None:
            raise BTSError("BTSHarnessLM needs a tokenizer (object or directory)")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = _load_tokenizer(tokenizer)
        self.lm = model
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise BTSError("the tokenizer has no EOS token")
        self._device = model_device(model)
        self._max_length = int(max_length) if max_length else None
        bs = str(batch_size).split(":")[0]
        self._batch_size = int(bs) if bs.isdigit() and int(bs) > 0 else 8
        if max_batch_size:
            self._batch_size = min(self._batch_size, int(max_batch_size))
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.gen_chunk = int(gen_chunk)
        self.seed = int(seed)
        self.pretrained = str(pretrained) if pretrained is not None else type(model).__name__

    # --- properties lm-eval uses -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        for owner in (self.lm, getattr(self.lm, "model", None)):
            n = getattr(getattr(owner, "config", None), "max_position_embeddings", None)
            if isinstance(n, int) and n > 0:
                return n
        return 2048

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def get_model_info(self) -> dict:
        n = sum(p.numel() for p in self.lm.parameters()) if isinstance(self.lm, torch.nn.Module) else None
        return {"model_num_parameters": n, "model_dtype": None, "model_revision": None, "model_sha": None,
                "bts_model": self.pretrained}

    # --- tokenisation ------------------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        prefix = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and prefix and string.startswith(prefix):
            kw["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **kw)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None, **kwargs):
        rows = []
        for i, (key, context_enc, continuation_enc) in enumerate(requests):
            if not context_enc or not continuation_enc:
                raise BTSError("empty context or continuation in a log-likelihood request")
            if len(continuation_enc) > self.max_length:
                raise BTSError(f"continuation of {len(continuation_enc)} tokens exceeds max_length={self.max_length}")
            inp = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):][:-1]
            rows.append((i, key, inp, list(continuation_enc)))
        bs = max(1, int(override_bs or self.batch_size))
        # equal-length rows share a forward pass (no padding: a LanguageModel takes no attention mask)
        rows.sort(key=lambda r: (-len(r[2]), r[0]))
        results: list = [None] * len(rows)
        pbar = tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0, desc="bts log-likelihoods")
        j = 0
        while j < len(rows):
            k = j + 1
            while k < len(rows) and k - j < bs and len(rows[k][2]) == len(rows[j][2]):
                k += 1
            chunk = rows[j:k]
            x = torch.tensor([r[2] for r in chunk], dtype=torch.long, device=self.device)
            logp = F.log_softmax(self.lm(x).float(), dim=-1)
            for (i, key, inp, cont), lp in zip(chunk, logp):
                n = len(cont)
                lp = lp[len(inp) - n: len(inp)]
                cont_t = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(-1) == cont_t).all())
                answer = (float(lp.gather(-1, cont_t[:, None]).sum()), greedy)
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            pbar.update(len(chunk))
            j = k
        pbar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            ws = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows += [(None, ctx, cont) for ctx, cont in ws]
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        out, pos = [], 0
        for req, n in zip(requests, counts):
            total = float(sum(s for s, _ in scores[pos: pos + n]))
            pos += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # --- generation --------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="bts generate_until"):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_gen = next((int(kw[k]) for k in _MAX_TOKEN_KEYS if kw.get(k) is not None), self.max_gen_toks)
            temperature = float(kw.get("temperature", 0.0) or 0.0)
            do_sample = bool(kw.get("do_sample", False)) and temperature > 0
            if max_gen >= self.max_length:
                raise BTSError(f"max_gen_toks={max_gen} must be below max_length={self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen) or [self.prefix_token_id]
            text = generate_text(
                self.lm, self.tokenizer, ids, max_gen, stops=until, eos_token_id=self.eot_token_id,
                chunk=self.gen_chunk, do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                generator=gen if do_sample else None, device=self.device,
            )
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
