"""Batch-1 text generation with stop strings on top of any ``LanguageModel.generate`` (suite and lm-eval adapter).

``LanguageModel.generate`` only stops at an EOS token. To stop at strings (a newline, ``"\\ndef "``) without
generating the full budget, generation runs in chunks of ``chunk`` tokens: after each chunk the decoded text is
checked for a stop string. Greedy decoding is deterministic, so the chunked result is the same token sequence as
one call with the full budget (it only ends earlier); the prompt is re-encoded at every chunk, which is cheap at
the suite's sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def model_device(model) -> torch.device:
    """Device of a model's first parameter (CPU for parameter-less callables)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    dev = getattr(model, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text`` (len(text) when there is none)."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return cut


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stops: Sequence[str] = (),
    eos_token_id: int | None = None,
    chunk: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> str:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (batch 1); return the decoded text cut at the first
    stop string (the stop string itself is removed). EOS ends generation and is not part of the text."""
    device = device if device is not None else model_device(model)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    chunk = max(1, int(chunk))
    while len(new) < max_new_tokens:
        n = min(chunk, max_new_tokens - len(new))
        out = model.generate(
            ids, max_new_tokens=n, eos_token_id=eos_token_id, do_sample=do_sample, temperature=temperature,
            generator=generator,
        )
        step = out[0, ids.shape[1]:].tolist()
        ended = len(step) < n
        if eos_token_id is not None and eos_token_id in step:
            step = step[: step.index(eos_token_id)]
            ended = True
        new += step
        if ended or not step:
            break
        if stops:
            text = tokenizer.decode(new, skip_special_tokens=True)
            if first_stop(text, stops) < len(text):
                break
        ids = torch.cat([ids, torch.tensor([step], dtype=torch.long, device=device)], dim=1)
    text = tokenizer.decode(new, skip_special_tokens=True)
    return text[: first_stop(text, stops)]
