"""``bts eval``: evaluate any model artifact with the suite or with lm-eval.

    bts eval --model DIR [--tokenizer DIR] [--tasks ppl,math,translation,code,general] [--out metrics.json]
             [--seq-len 128] [--set math_items=64 --set humaneval_items=0 ...]
    bts eval --harness --model DIR --harness-tasks mmlu,gsm8k [--num-fewshot 5] [--include-path DIR]
             [--limit N] [--out results.json]

``--model`` is any artifact the project writes, its kind read from ``artifact.json`` (``bts.eval.loading``): a
Hugging Face directory (dense or merged), a BTS stitch checkpoint, BTM, expert routing, BAM adapters, BTX/BAM.
The first form runs ``bts.eval.suite.evaluate`` and writes one ``metrics.json`` method entry (default
``--tasks``: ``bts.eval.suite.DEFAULT_TASKS``, perplexity and the likelihood / teacher-forced metrics; the generation
metrics run when named, e.g. ``--tasks math``). The second form delegates to
``lm_eval.simple_evaluate`` with the ``bts`` adapter (``bts.eval.harness``). Without ``--out`` the JSON goes to
stdout. Bad input is a ``BTSError`` (``bts.cli.main`` prints one line ``error: ...``, exit 2), an unwritable
``--out`` is found before any model loads, and output files are written atomically, so a failed run leaves no
partial file. The options: ``eval_command``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from bts.core.io import BTSError, atomic_write_text, check_output_file
from bts.eval.harness_import import import_error


def _device(arg: str | None) -> str:
    from bts.dense.modeling import (
        resolve_device,  # a model is loaded next anyway: no start-up cost for an early error
    )

    return str(resolve_device(arg))


def _dtype(arg: str):
    import torch

    dt = getattr(torch, arg.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise BTSError(f"unknown dtype {arg!r}")
    return dt


def load_model_and_tokenizer(model_dir, tokenizer_dir=None, device: str = "cpu", dtype=None,
                             allow_changed_models: bool = False):
    """Any artifact the project writes (``bts.eval.loading.artifact_kind``: a Hugging Face directory, a BTS stitch
    checkpoint, BTM, expert routing, BAM adapters, BTX/BAM) as a ``LanguageModel`` in eval mode, and its tokenizer
    (from ``tokenizer_dir``, default the artifact directory)."""
    import torch

    from bts.core.artifacts import HF_KIND, artifact_kind
    from bts.core.language_model import HFLanguageModel
    from bts.data.tokenizer import load_tokenizer_from
    from bts.dense.modeling import load_causal_lm
    from bts.eval.loading import load_for_eval

    kind = artifact_kind(model_dir)
    tok = load_tokenizer_from(Path(tokenizer_dir or model_dir))
    dtype = dtype or torch.float32
    if kind == HF_KIND:
        model = HFLanguageModel(load_causal_lm(model_dir, dtype=dtype))
    else:
        model, _, _ = load_for_eval(model_dir, allow_changed_models=allow_changed_models,
                                    tokenizer_dir=tokenizer_dir)
        model = model.to(dtype)
    vocab = _vocab_size(model)
    if vocab is not None and len(tok) > vocab:
        raise BTSError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}")
    return model.to(device).eval(), tok


def _vocab_size(model) -> int | None:
    for owner in (model, getattr(model, "model", None), getattr(getattr(model, "model", None), "config", None)):
        v = getattr(owner, "vocab_size", None)
        if isinstance(v, int):
            return v
    return None


def _read_records(path) -> dict[str, list[dict]]:
    data: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BTSError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "domain" not in rec or "text" not in rec:
                raise BTSError(f"{path}:{i}: a record needs 'domain' and 'text' fields")
            data.setdefault(str(rec["domain"]), []).append(rec)
    return data


def _run_suite(args) -> dict:
    from bts.eval.suite import DEFAULT_TASKS, EvalConfig, evaluate, resolve_tasks

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise BTSError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    if args.seed is not None:
        overrides["seed"] = str(args.seed)
    if args.allow_unsafe_exec:
        overrides["allow_unsafe_exec"] = "true"
    cfg = EvalConfig.from_overrides(overrides)
    tasks = args.tasks or ",".join(DEFAULT_TASKS)
    resolve_tasks(tasks)  # validate names before loading anything
    data = _read_records(args.data) if args.data else None
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, _device(args.device), _dtype(args.dtype),
                                          args.allow_changed_models)
    result = evaluate(model, tok, tasks=tasks, cfg=cfg, cache_dir=args.cache_dir, seq_len=args.seq_len,
                      progress=not args.no_progress, data=data)
    result["info"]["model"] = str(args.model)
    result["info"]["config"] = cfg.to_dict()
    return result


def _run_harness(args) -> dict:
    if not args.harness_tasks:
        raise BTSError("--harness needs --harness-tasks (comma-separated lm-eval task names)")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise import_error(e) from None
    from bts.eval.harness import BTSHarnessLM
    from bts.eval.local_tasks import ensure_for

    if args.include_path and not Path(args.include_path).is_dir():
        raise BTSError(f"--include-path is not a directory: {args.include_path}")
    tasks = [t.strip() for t in args.harness_tasks.split(",") if t.strip()]
    include = ensure_for(tasks, args.include_path, args.cache_dir)  # the built-in bts_<domain>_ppl task files
    tm = None
    if include:  # indexing lm-eval's own ~10k task files takes seconds: skip it when not needed
        tm = TaskManager(include_path=include, include_defaults=False)
        if not all(t in set(tm.all_tasks) for t in tasks):
            tm = None
    if tm is None:
        tm = TaskManager(include_path=include) if include else TaskManager()
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise BTSError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    _load_tasks(tasks, tm)  # before the model: an uncached hub dataset is one line, not a model load later
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, _device(args.device), _dtype(args.dtype),
                                          args.allow_changed_models)
    lm = BTSHarnessLM(model=model, tokenizer=tok, batch_size=args.batch_size, max_length=args.max_length)
    lm.pretrained = str(args.model)
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, task_manager=tm,
                                  limit=limit, log_samples=args.log_samples)
    if res is None:  # non-zero rank
        return {}
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
            "n-samples", "samples")
    out = {k: res[k] for k in keep if k in res}
    out["model"] = str(args.model)
    return out


HUB_UNREACHABLE = ("ConnectionError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "DatasetNotFoundError")


def _load_tasks(tasks: list[str], tm) -> None:
    """Load the lm-eval tasks (their datasets) once, with a clear line when a dataset is neither cached nor
    reachable on the hub; ``simple_evaluate`` then reuses them through ``tm``."""
    from lm_eval.tasks import get_task_dict

    try:
        loaded = get_task_dict(tasks, tm)
    except Exception as e:
        chain, seen = [], e
        while seen is not None and len(chain) < 8:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        if not any(type(x).__name__ in HUB_UNREACHABLE for x in chain):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTSError(
            f"lm-eval task(s) {', '.join(tasks)}: a dataset is not in the local cache and the hub cannot be reached "
            f"({first}); run once with network access to cache it, or provide local task files: a task YAML with "
            "dataset_path: json and dataset_kwargs.data_files pointing at your files, in a directory passed with "
            "--include-path DIR"
        ) from None
    tm.load_task_or_group = lambda *_a, **_k: loaded


def eval_command(model: str, tokenizer: str | None = None, allow_changed_models: bool = False,
                 out: str | None = None, device: str | None = None, dtype: str = "float32",
                 tasks: str | None = None, cache_dir: str | None = None, data: str | None = None, seq_len: int = 128,
                 seed: int | None = None, set: list[str] | None = None, no_progress: bool = False,
                 allow_unsafe_exec: bool = False, harness: bool = False, harness_tasks: str | None = None,
                 num_fewshot: int | None = None, include_path: str | None = None, limit: float | None = None,
                 batch_size: int = 1, max_length: int | None = None, log_samples: bool = False) -> int:
    """evaluate any model artifact with the BTS suite, or with lm-evaluation-harness (--harness)

    Suite tasks: ppl, switch (perplexity after a mid-block domain switch) and the task groups of
    bts.eval.suite.TASK_GROUPS (math, translation, code, general) or their metric names; metric definitions:
    bts.eval.suite.TASKS; 'avg' is the mean of the downstream metrics that ran. The generation metrics are not in
    the default list (no signal at the tiny scale); a group name (e.g. --tasks ppl,math,translation,code) or a
    metric name runs them. Without --out the JSON goes to stdout.

    Args:
        model: model artifact: a Hugging Face directory or any directory the project writes with an artifact.json
            (BTS stitch checkpoint, BTM, expert routing, BAM adapters, BTX/BAM)
        tokenizer: tokenizer directory (default: --model)
        allow_changed_models: BTS checkpoints: use frozen models whose weights differ from the checkpoint manifest
        out: write the JSON here (atomically) instead of stdout
        device: torch device (default: cuda if available, else cpu)
        dtype: model dtype (float32, bfloat16, float16)
        tasks: suite: comma-separated ppl, switch and task groups or metric names (default: ppl, switch and the
            likelihood / teacher-forced metrics, bts.eval.suite.DEFAULT_TASKS)
        cache_dir: suite: data cache directory (bts.data)
        data: suite: JSONL file of test records (each with a 'domain' field) to use instead of the data layer's
            test splits
        seq_len: suite: perplexity block length / prompt context
        seed: suite: item-selection seed (EvalConfig.seed)
        set: suite: override an EvalConfig field, KEY=VALUE, e.g. --set math_items=64 (repeatable)
        no_progress: no progress bars
        allow_unsafe_exec: suite: run HumanEval completions even where the code-execution sandbox is unavailable
        harness: run lm-evaluation-harness tasks instead of the suite
        harness_tasks: --harness: comma-separated lm-eval task names (e.g. mmlu,gsm8k); built in and offline:
            bts_general_ppl, bts_code_ppl, bts_math_ppl, bts_multilingual_ppl
        num_fewshot: --harness: few-shot examples (default: the task's own)
        include_path: --harness: directory with extra lm-eval task YAMLs
        limit: --harness: examples per task (int) or fraction (<1)
        batch_size: --harness: rows per log-likelihood forward pass
        max_length: --harness: context length (default: model config)
        log_samples: --harness: include per-sample outputs in the JSON
    """
    args = SimpleNamespace(**locals())  # the helpers below read the options as attributes
    args.set = set or []
    if out is not None:  # before any model is loaded: a run that cannot write its result does not start
        check_output_file(out, "--out")
    if not harness and (harness_tasks or include_path or num_fewshot is not None):
        raise BTSError("--harness-tasks/--include-path/--num-fewshot need --harness")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr carries only our progress bars and the one-line error
    try:
        result = _run_harness(args) if harness else _run_suite(args)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    text = json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
    if out:
        atomic_write_text(out, text)
    else:
        sys.stdout.write(text)
    return 0
