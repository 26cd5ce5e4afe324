"""`bts eval` (suite and --harness) and `bts gates` on every kind of artifact the project writes, through the real
CLI entry: each tiny artifact is written as its training module / merge command writes it (artifact.json + the
training tokenizer), and its kind is detected from artifact.json."""

from __future__ import annotations

import json
import math
import os

import pytest

from bts.cli.main import main as bts_main
from bts.core.io import atomic_write_json, copy_tokenizer_files
from bts.eval.testing import all_texts, synthetic_records, tiny_tokenizer
from conftest import perturbed_copy, tiny_llama

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

KINDS = ("hf", "bts", "btm", "expert_routing", "bam_adapters", "btx_mixtral", "bam")


def _finish(out, tok_src, kind: str | None):
    copy_tokenizer_files(tok_src, out)
    if kind is not None:
        atomic_write_json(out / "artifact.json", {"kind": kind})
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from baselines.bam import build_bam
    from baselines.bam_adapters import BAMAdaptersModel
    from baselines.btm import write_btm_dir
    from baselines.expert_routing import ExpertRouter
    from baselines.moe import load_family
    from baselines.upcycle import build_btx
    from bts.stitch.checkpoint import save_stitched
    from bts.stitch.model import StitchedLM

    root = tmp_path_factory.mktemp("artifacts")
    records = synthetic_records(30)
    tok = tiny_tokenizer(all_texts(records), vocab_size=300)
    seed = tiny_llama(0, vocab=len(tok), layers=2)
    family = [seed, perturbed_copy(seed, 1), perturbed_copy(seed, 2)]
    dirs = []
    for name, m in zip(("seed", "expert_code", "expert_math"), family):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    src = {"seed": str(dirs[0]), "experts": [str(d) for d in dirs[1:]]}
    out = {"hf": dirs[0]}
    stitched = StitchedLM.from_pretrained_dirs(dirs[0], dirs[1:], num_stitch_layers=2)
    out["bts"] = _finish(save_stitched(stitched, root / "bts"), dirs[0], None)
    write_btm_dir(dirs[0], dirs[1:], root / "btm")
    out["btm"] = root / "btm"
    ExpertRouter(load_family(dirs[0], dirs[1:]), 4).save(root / "routing", extra=src)
    out["expert_routing"] = _finish(root / "routing", dirs[0], "expert_routing")
    BAMAdaptersModel(load_family(dirs[0], dirs[1:])).save(root / "bam_adapters", extra=src)
    out["bam_adapters"] = _finish(root / "bam_adapters", dirs[0], "bam_adapters")
    build_btx(family[0], family[1:], "top2").save(root / "btx", extra=src)
    out["btx_mixtral"] = _finish(root / "btx", dirs[0], "btx")
    build_bam(family[0], family[1:]).save(root / "bam", extra=src)
    out["bam"] = _finish(root / "bam", dirs[0], "btx")
    jsonl = root / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for recs in records.values() for r in recs))
    return out, jsonl, root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.mark.parametrize("kind", KINDS)
def test_suite_evaluates_every_artifact_kind(artifacts, kind, tmp_path, capsys):
    """Perplexity, and perplexity after a domain switch: every kind is scored on the same post-switch tokens, each
    predicted from the whole block (prefix included) by the model's own forward pass."""
    import torch
    import torch.nn.functional as F

    from bts.data.switching import switch_blocks_of
    from bts.eval.command import load_model_and_tokenizer

    dirs, jsonl, _ = artifacts
    out = tmp_path / "m.json"
    rc = bts_main(["eval", "--model", str(dirs[kind]), "--tasks", "ppl,switch", "--data", str(jsonl), "--set",
                   "ppl_blocks=2", "--set", "switch_blocks=2", "--set", "switch_types=general>code,code>math",
                   "--seq-len", "32", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    res = json.loads(out.read_text())
    ppl = res["ppl"]
    assert ppl and all(math.isfinite(v) and v > 1 for v in ppl.values() if isinstance(v, float))
    model, tok = load_model_and_tokenizer(dirs[kind], device="cpu")
    records = {}
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        records.setdefault(rec["domain"], []).append(rec)
    blocks = switch_blocks_of(lambda d: records[d], lambda t: tok(t, add_special_tokens=False)["input_ids"],
                              tok.eos_token_id, 32, ["general>code", "code>math"], n_blocks=2)
    assert set(res["switch_ppl"]) == {"general>code", "code>math", "all"}
    for name, bl in blocks.items():
        with torch.no_grad():
            scores = model(torch.tensor([b.ids for b in bl])).float()
        want = [float(F.cross_entropy(scores[i, b.switch - 1: -1].double(), torch.tensor(b.ids[b.switch:]),
                                      reduction="sum")) for i, b in enumerate(bl)]
        cell = res["items"][f"switch:{name}"]
        assert cell["den"] == [24, 16] and cell["num"] == pytest.approx(want, rel=1e-4), (kind, name)


def test_harness_evaluates_a_stitch_checkpoint(artifacts, tmp_path, capsys):
    dirs, _, _ = artifacts
    data = tmp_path / "roll.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("x = 1 + 2", "the bridge and the rain")))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "roll.yaml").write_text(
        f"task: bts_art_roll\ndataset_path: json\ntest_split: train\ndataset_kwargs:\n  cache_dir: {tmp_path / 'c'}\n"
        f"  data_files: {{train: {data}}}\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    out = tmp_path / "h.json"
    rc = bts_main(["eval", "--harness", "--model", str(dirs["bts"]), "--harness-tasks", "bts_art_roll",
                   "--include-path", str(tasks), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    res = json.loads(out.read_text())
    assert res["model"] == str(dirs["bts"])
    assert math.isfinite(res["results"]["bts_art_roll"]["word_perplexity,none"])


def test_a_directory_of_no_known_kind_is_one_line(artifacts, tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"")
    assert bts_main(["eval", "--model", str(tmp_path), "--tasks", "ppl"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {tmp_path} is not a model artifact: expected a Hugging Face model directory")
    for kind in ("bam_adapters", "btm", "btx", "bts", "expert_routing"):
        assert kind in line


def test_gates_read_the_kind(artifacts, tmp_path, capsys):
    dirs = artifacts[0]
    assert bts_main(["gates", "--ckpt", str(dirs["btm"]), "--out", str(tmp_path / "g")]) == 2
    line = _error_line(capsys)
    assert "is a 'btm' artifact: gate analysis needs a BTS stitch checkpoint" in line
    assert not (tmp_path / "g").exists()


def test_gates_on_a_stitch_checkpoint_without_tokenizer_flag(artifacts, tmp_path, capsys):
    dirs, _, _ = artifacts
    out = tmp_path / "g"
    rc = bts_main(["gates", "--ckpt", str(dirs["bts"]), "--out", str(out), "--n-prompts", "1", "--max-tokens", "24",
                   "--n-switch", "1", "--domains", "general,code"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert json.loads((out / "gates.json").read_text())["checkpoint"] == str(dirs["bts"])
