"""`bts eval` (bts.eval.command) and the Lightning DownstreamEvalCallback."""

from __future__ import annotations

import json
import os

import pytest

from bts.cli.main import main as bts_main
from bts.eval.suite import GENERATIVE_TASKS, TASKS, EvalConfig
from bts.eval.testing import all_texts, synthetic_records, tiny_tokenizer
from conftest import tiny_llama


def main(argv: list[str]) -> int:
    return bts_main(["eval", *argv])


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


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


SMALL = ["--set", "ppl_blocks=2", "--set", "math_items=3", "--set", "general_items=2", "--set", "code_items=2",
         "--set", "translation_items=3", "--set", "humaneval_items=1", "--set", "humaneval_max_new_tokens=4",
         "--set", "math_max_new_tokens=3", "--set", "translation_max_new_tokens=3", "--set", "switch_blocks=1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    data = synthetic_records(30)
    tok = tiny_tokenizer(all_texts(data), vocab_size=300)
    d = root / "model"
    tiny_llama(0, vocab=len(tok), layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    jsonl = root / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for recs in data.values() for r in recs))
    return d, jsonl


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_help(tmp_path, capsys):
    # help wins over arguments that would fail, and touches nothing
    assert main(["--help", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "m.json")]) == 0
    assert capsys.readouterr().err == "" and list(tmp_path.iterdir()) == []


def test_suite_run_writes_metrics(model_dir, tmp_path, capsys):
    d, jsonl = model_dir
    out = tmp_path / "m.json"
    rc = main(["--model", str(d), "--data", str(jsonl), "--out", str(out), "--no-progress", *SMALL])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert set(res["ppl"]) == {"general", "code", "math", "multilingual"}
    assert list(res["tasks"]) == [t for t in TASKS if t not in GENERATIVE_TASKS] and isinstance(res["avg"], float)
    assert res["info"]["config"]["math_items"] == 3
    assert set(res["tasks_ci"]) == set(res["tasks"]) and "ppl:math" in res["items"]
    assert len(res["switch_ppl"]) == 13 and "switch:all" in res["items"]  # 12 switch types and the pooled cell
    # the generation metrics run when asked for by group or name
    rc = main(["--model", str(d), "--data", str(jsonl), "--out", str(out), "--no-progress", *SMALL,
               "--tasks", "math,humaneval_pass1", "--set", "math_mc_items=3"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["math_em", "math_mc_acc", "humaneval_pass1"] and res["ppl"] == {}
    assert res["info"]["items"]["math_em"] == 3 and len(res["items"]["math_em"]["num"]) == 3


def test_code_execution_refused_without_isolation(model_dir, tmp_path, capsys, monkeypatch):
    """Where the sandbox cannot start, HumanEval is refused with one error line unless --allow-unsafe-exec."""
    from bts.eval import sandbox

    d, jsonl = model_dir
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "user namespaces are disabled")
    out = tmp_path / "m.json"
    argv = ["--model", str(d), "--data", str(jsonl), "--out", str(out), "--no-progress", *SMALL,
            "--tasks", "humaneval_pass1"]
    assert main(argv) == 2
    line = _err_line(capsys)
    assert "user namespaces are disabled" in line and "--allow-unsafe-exec" in line and not out.exists()
    assert main([*argv, "--allow-unsafe-exec"]) == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["info"]["config"]["allow_unsafe_exec"] is True and "humaneval_pass1" in res["tasks"]


@pytest.mark.parametrize(
    "argv, msg",
    [
        ([], "required"),
        (["--model", "/nonexistent/model"],
         "no model artifact at /nonexistent/model: expected a Hugging Face model directory"),
        (["--model", "{d}", "--tasks", "ppl,mmlu"], "unknown task 'mmlu'"),
        (["--model", "{d}", "--set", "nope=1"], "unknown EvalConfig field"),
        (["--model", "{d}", "--set", "math_items"], "KEY=VALUE"),
        (["--model", "{d}", "--seq-len", "abc"], "--seq-len: Expected a <class 'int'>. Got value: abc"),
        (["--model", "{d}", "--tokenizer", "/nonexistent/tok"], "tokenizer directory not found"),
        (["--model", "{d}", "--harness-tasks", "x"], "need --harness"),
        (["--model", "{d}", "--harness"], "--harness needs --harness-tasks"),
        (["--model", "{d}", "--harness", "--harness-tasks", "x", "--include-path", "/nonexistent"],
         "not a directory"),
        (["--model", "{d}", "--data", "/nonexistent.jsonl", "--tasks", "ppl"], "No such file"),
        (["--model", "{d}", "--data", "{bad}", "--tasks", "ppl"], "needs 'domain' and 'text'"),
        (["--model", "{d}", "--data", "{jsonl}", "--tasks", "ppl", "--set", "ppl_domains=code,klingon"],
         "no 'klingon' records"),
    ],
)
def test_errors_are_one_line_exit_2_no_output(model_dir, tmp_path, capsys, argv, msg):
    d, jsonl = model_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    out = tmp_path / "out" / "m.json"
    argv = [a.format(d=d, jsonl=jsonl, bad=bad) for a in argv] + ["--out", str(out), "--no-progress"]
    assert main(argv) == 2
    assert msg in _err_line(capsys)
    assert not out.exists()
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").glob(".*")) if out.parent.exists() else True


def test_harness_mode(model_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    d, _ = model_dir
    data = tmp_path / "mc.jsonl"
    data.write_text('{"q": "Save item", "choices": ["1", "2"], "label": 0}\n')
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"task: bts_cmd_mc\ndataset_path: json\ndataset_kwargs:\n  data_files: {{train: {data}}}\n"
        f"  cache_dir: {tmp_path / 'hf'}\ntest_split: train\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "h.json"
    rc = main(["--harness", "--model", str(d), "--harness-tasks", "bts_cmd_mc", "--include-path", str(tasks),
               "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert "acc,none" in res["results"]["bts_cmd_mc"]


def test_callback_logs_and_writes_json(tmp_path):
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from bts.dense.modeling import LlamaArch
    from bts.dense.module import CausalLMModule
    from bts.eval.callbacks import DownstreamEvalCallback

    data = synthetic_records(30)
    tok = tiny_tokenizer(all_texts(data), vocab_size=300)
    module = CausalLMModule(arch=LlamaArch(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, max_position_embeddings=256), warmup_steps=1)
    blocks = torch.randint(3, len(tok), (4, 16))
    loader = torch.utils.data.DataLoader([{"input_ids": b} for b in blocks], batch_size=2)
    cfg = EvalConfig(math_items=2, translation_items=2, code_items=2, general_items=2, humaneval_items=1,
                     humaneval_max_new_tokens=4, math_max_new_tokens=3, translation_max_new_tokens=3)
    out = tmp_path / "downstream.json"
    cb = DownstreamEvalCallback(tasks=("ppl", "math", "translation", "code", "general"), cfg=cfg, tokenizer=tok,
                                json_path=str(out), data=data)
    logger = CSVLogger(tmp_path / "logs", name="t")
    trainer = L.Trainer(max_steps=2, logger=logger, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == list(TASKS) and res["ppl"] == {}
    csv = (tmp_path / "logs" / "t" / "version_0" / "metrics.csv").read_text()
    header = csv.splitlines()[0].split(",")
    assert {f"test/{k}" for k in TASKS} | {"test/avg", "test/translation_s_bleu"} <= set(header)
    assert module.training  # the suite restores train mode
    from bts.eval.suite import DEFAULT_TASKS

    assert DownstreamEvalCallback().tasks == [t for t in DEFAULT_TASKS if t != "ppl"]  # no generation by default
