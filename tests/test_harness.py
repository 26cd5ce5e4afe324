"""lm-eval adapter (bts.eval.harness) against lm-eval's own `hf` model, offline, with local YAML tasks."""

from __future__ import annotations

import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

lm_eval = pytest.importorskip("lm_eval")

from bts.eval.testing import tiny_tokenizer
from conftest import tiny_llama


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network even when huggingface_hub/datasets were imported (and read their env) before this module."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    try:
        import datasets.config as ds_config
    except ImportError:  # pragma: no cover
        return
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(ds_config, name):
            monkeypatch.setattr(ds_config, name, True)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only oversubscribe."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CORPUS = [
    "The capital of France is Paris. The capital of Spain is Madrid.",
    "Question: What is 2 + 3?\nAnswer: 5",
    "def add(a, b):\n    return a + b\n",
    "A cat sat on the mat and looked at the dog.",
] * 10

MC = [
    {"question": "The capital of France is", "choices": ["Paris", "Madrid", "the mat"], "label": 0},
    {"question": "A cat sat on the", "choices": ["mat", "dog", "capital"], "label": 0},
    {"question": "", "choices": ["Paris", "cat"], "label": 1},  # empty context -> prefix token
]
ROLL = [{"text": CORPUS[0]}, {"text": CORPUS[2] * 12}]  # the second needs several rolling windows
GEN = [{"q": "Question: What is 2 + 3?\nAnswer:", "a": " 5"}, {"q": "def add(a, b):\n", "a": "    return a + b"}]


def _write_tasks(root):
    data = root / "data"
    data.mkdir()
    for name, rows in (("mc", MC), ("roll", ROLL), ("gen", GEN)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ntest_split: train\ndataset_kwargs:\n  cache_dir: {root / 'hf_cache'}\n"
    (tasks / "mc.yaml").write_text(
        "task: bts_test_mc\n" + common + f"  data_files: {{train: {data / 'mc.jsonl'}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\ntarget_delimiter: ' '\nmetric_list:\n  - metric: acc\n"
    )
    (tasks / "roll.yaml").write_text(
        "task: bts_test_roll\n" + common + f"  data_files: {{train: {data / 'roll.jsonl'}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (tasks / "gen.yaml").write_text(
        "task: bts_test_gen\n" + common + f"  data_files: {{train: {data / 'gen.jsonl'}}}\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tok = tiny_tokenizer(CORPUS, vocab_size=300)
    model = tiny_llama(0, vocab=len(tok), layers=2)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return root, model_dir, _write_tasks(root)


def _run(model, tasks_dir, names):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # indexing lm-eval's own tasks: ~10 s
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=tm,
                                   log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def _resps(res, task):
    return [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def both(setup):
    pytest.importorskip("accelerate")  # lm-eval's HFLM needs it (lm-eval[hf])
    from lm_eval.models.huggingface import HFLM

    from bts.eval.harness import BTSHarnessLM

    _, model_dir, tasks_dir = setup
    names = ["bts_test_mc", "bts_test_roll", "bts_test_gen"]
    ours = BTSHarnessLM(pretrained=str(model_dir), device="cpu", batch_size=4, max_length=64)
    ref = HFLM(pretrained=str(model_dir), device="cpu", batch_size=1, dtype="float32", max_length=64)
    return _run(ours, tasks_dir, names), _run(ref, tasks_dir, names), ours


def test_loglikelihood_matches_hf(both):
    ours, ref, _ = both
    a, b = _resps(ours, "bts_test_mc"), _resps(ref, "bts_test_mc")
    assert len(a) == len(MC)
    diffs = []
    for ra, rb in zip(a, b):
        for (lla, ga), (llb, gb) in zip((x[0] for x in ra), (x[0] for x in rb)):
            assert float(lla) == pytest.approx(float(llb), abs=1e-4)
            assert ga == gb
            diffs.append(abs(float(lla) - float(llb)))
    print(f"max |loglikelihood(bts) - loglikelihood(hf)| over {len(diffs)} requests: {max(diffs):.3g}")
    assert ours["results"]["bts_test_mc"]["acc,none"] == ref["results"]["bts_test_mc"]["acc,none"]


def test_rolling_matches_hf(both):
    ours, ref, lm = both
    a, b = _resps(ours, "bts_test_roll"), _resps(ref, "bts_test_roll")
    for ra, rb in zip(a, b):
        assert float(ra[0][0]) == pytest.approx(float(rb[0][0]), abs=1e-4)
    print(f"max |rolling loglikelihood(bts) - (hf)|: {max(abs(float(x[0][0]) - float(y[0][0])) for x, y in zip(a, b)):.3g}")
    # the long document really spans several windows of max_length=64
    assert len(lm.tok_encode(ROLL[1]["text"])) > 2 * lm.max_length
    for key in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["bts_test_roll"][key] == pytest.approx(ref["results"]["bts_test_roll"][key], rel=1e-4)


def test_generate_until_matches_hf_greedy(both):
    ours, ref, _ = both
    a, b = _resps(ours, "bts_test_gen"), _resps(ref, "bts_test_gen")
    assert all(isinstance(x[0][0], str) for x in a)
    assert a == b  # greedy decoding of the same weights
    assert "exact_match,none" in ours["results"]["bts_test_gen"]


def test_wraps_any_language_model(setup):
    """A non-HF LanguageModel object (here: the HF model behind the interface) works as lm-eval's model."""
    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer

    from bts.core.language_model import HFLanguageModel
    from bts.dense.modeling import load_causal_lm
    from bts.eval.harness import BTSHarnessLM

    _, model_dir, _ = setup
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    lm = BTSHarnessLM(model=HFLanguageModel(load_causal_lm(model_dir)), tokenizer=tok, max_length=64)
    reqs = [Instance("loglikelihood", {}, ("A cat sat on the", " mat"), 0),
            Instance("loglikelihood", {}, ("A cat sat on the", " dog"), 1)]
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(out) == 2 and all(ll < 0 for ll, _ in out)
    gen = lm.generate_until([Instance("generate_until", {}, ("def add(a, b):\n", {"until": ["\n"],
                                                                                      "max_gen_toks": 5}), 0)],
                            disable_tqdm=True)
    assert isinstance(gen[0], str) and "\n" not in gen[0]
    assert lm_eval.api.registry.get_model("bts") is BTSHarnessLM
