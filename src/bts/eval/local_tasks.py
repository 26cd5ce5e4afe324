"""lm-eval task files over the embedded test splits, so the lm-eval adapter runs offline on any machine.

One task per domain, ``bts_<domain>_ppl``: lm-eval's rolling log-likelihood (``loglikelihood_rolling``, as its
``wikitext`` task) of held-out documents, reported as word perplexity, byte perplexity and bits per byte.
Perplexity-type tasks carry signal for any trained model (there is no chance level to clear), which is why they
are the local tasks: a 135M model is expected near chance on the paper's MMLU-style multiple choice.

``bts eval --harness --harness-tasks bts_general_ppl,bts_code_ppl`` writes the files on first use into
``<cache>/lm_eval_tasks/`` (JSONL documents + one YAML per task) and passes that folder to lm-eval.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from bts.core.io import atomic_dir
from bts.data.domains import DOMAINS

PREFIX = "bts_"
TASKS = tuple(f"{PREFIX}{d}_ppl" for d in DOMAINS)
FORMAT = 1


def is_local(task: str) -> bool:
    return task in TASKS


def task_dir(cache_dir=None) -> Path:
    from bts.data.domains import default_cache_dir

    return default_cache_dir(cache_dir) / "lm_eval_tasks"


def _yaml(task: str, data: Path) -> str:
    # JSON is valid YAML: no quoting rules to get wrong for paths
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        f"  version: {FORMAT}",
        "",
    ])


def write_local_tasks(cache_dir=None, docs: int = 64, seed: int = 0) -> Path:
    """Write (once) the ``bts_<domain>_ppl`` task files: ``docs`` test documents per domain in a seeded order.
    Returns the folder to pass to lm-eval as an include path."""
    from bts.data.corpus import load_split

    out = task_dir(cache_dir)
    # the YAML files name their data by absolute path: a moved cache is rewritten
    stamp = {"format": FORMAT, "docs": docs, "seed": seed, "path": str(out.resolve())}
    stamp_file = out / "bts_tasks.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    with atomic_dir(out) as tmp:
        for domain in DOMAINS:
            recs = load_split(domain, "test", cache_dir=cache_dir)
            order = list(range(len(recs)))
            random.Random(f"{seed}:{domain}").shuffle(order)
            # the final path, not tmp's: the YAML is read after the folder is renamed into place
            data = out.resolve() / f"{PREFIX}{domain}_ppl.jsonl"
            with open(tmp / data.name, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": recs[i]["text"]}, ensure_ascii=False) + "\n" for i in order[:docs])
            (tmp / f"{PREFIX}{domain}_ppl.yaml").write_text(_yaml(f"{PREFIX}{domain}_ppl", data))
        (tmp / stamp_file.name).write_text(json.dumps(stamp))
    return out


def ensure_for(tasks: list[str], include_path: str | os.PathLike | None, cache_dir=None) -> str | None:
    """The include path to give lm-eval: the local task folder when ``tasks`` name local tasks (it must then be
    the only one), else ``include_path`` unchanged."""
    if not any(is_local(t) for t in tasks):
        return None if include_path is None else str(include_path)
    if include_path is not None:
        from bts.core.io import BTSError

        raise BTSError(f"--include-path cannot be combined with the built-in local tasks ({', '.join(TASKS)}); "
                       "copy their files from " + str(task_dir(cache_dir)) + " into your folder instead")
    return str(write_local_tasks(cache_dir))
