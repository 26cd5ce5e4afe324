"""The project commands (bts.cli.commands): command lines made from typed signatures, one table, errors printed
once, fast help, and the one output rule (issue 23: nothing lost; ``bts.core.io.check_output``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bts.cli.commands import COMMANDS, Command, build_parser, one_line_help
from bts.cli.main import main as bts_main
from bts.stitch.checkpoint import MANIFEST, save_stitched
from bts.stitch.model import StitchedLM

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["code", "math", "multilingual"]


def demo_command(source: str, /, steps: int = 3, rate: float | None = None, lambda_: list[float] | None = None,
                 tags: list[str] | None = None, no_progress: bool = False, out: str = "x", force: bool = False) -> int:
    """a command for these tests

    More text.

    Args:
        source: where it reads from
        steps: how many steps
        rate: a rate
        lambda_: scales
        tags: labels
        no_progress: quiet
        out: where it writes
    """
    print(json.dumps({"source": source, "steps": steps, "rate": rate, "lambda": lambda_, "tags": tags,
                      "no_progress": no_progress, "out": out, "force": force}))
    return 3 if steps == 0 else 0


@pytest.fixture
def demo(monkeypatch):
    monkeypatch.setitem(COMMANDS, "demo", Command(f"{__name__}:demo_command", loads_models=False))
    return lambda *argv: bts_main(["demo", *argv])


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "usage:" not in captured.out, captured.err
    return lines[0]


def test_the_command_line_is_the_signature(demo, capsys):
    assert demo("src", "--steps", "5", "--lambda", "0.3", "0.5", "--tags", "a", "--tags", "b", "c",
                "--no-progress", "--rate=0.25", "--force") == 0
    assert json.loads(capsys.readouterr().out) == {"source": "src", "steps": 5, "rate": 0.25, "lambda": [0.3, 0.5],
                                                   "tags": ["a", "b", "c"], "no_progress": True, "out": "x",
                                                   "force": True}
    assert demo("src") == 0  # defaults are the function's own (an absent list is not [])
    assert json.loads(capsys.readouterr().out) == {"source": "src", "steps": 3, "rate": None, "lambda": None,
                                                   "tags": None, "no_progress": False, "out": "x", "force": False}
    assert demo("src", "--steps", "0") == 3  # the function's return value is the exit status


@pytest.mark.parametrize("argv, expect", [
    (["src", "--steps", "many"], "error: bts demo: --steps: Expected a <class 'int'>. Got value: many"),
    (["src", "--stepz", "1"], "error: bts demo: unrecognized arguments: --stepz 1"),
    ([], "error: bts demo: the following arguments are required: SOURCE"),
    (["src", "--lambda"], "error: bts demo: argument --lambda: expected at least one argument"),
])
def test_usage_errors_are_one_line_naming_the_option(demo, capsys, argv, expect):
    assert demo(*argv) == 2
    assert _one_error_line(capsys) == expect


def test_help_comes_from_the_docstring(demo, capsys):
    assert demo("--help", "--steps", "many") == 0  # help wins over a bad value
    out = capsys.readouterr().out
    assert out.startswith("usage: bts demo ") and "a command for these tests\n\nMore text." in out
    out = " ".join(out.split())
    for flag, text in [("--steps STEPS", "how many steps"), ("--lambda LAMBDA", "scales"), ("--no-progress", "quiet"),
                       ("--force", "not an earlier output of this command")]:
        assert flag in out and text in out
    assert one_line_help(COMMANDS["demo"]) == "a command for these tests"


def test_every_command_has_a_parser_with_its_documented_options():
    """Every converted command builds; the options that tests, docs and profiles use are there, spelt as before."""
    import importlib

    expected = {"eval": {"--model", "--out", "--set", "--no-progress", "--harness-tasks", "--seq-len"},
                "merge": {"--method", "--seed", "--experts", "--out", "--lambda", "--val-tokens", "--config", "--force"},
                "stitch-remove": {"--ckpt", "--expert", "--out", "--force"},
                "ceiling": {"--runs", "--out", "--fit-blocks", "--test-blocks", "--max-iter", "--force"},
                "import-gguf": {"--model", "--gguf", "--out", "--cache-dir", "--force"},
                "data": {"--cache-dir", "--domains", "--force", "--tokenizer", "--check-digests", "--write-digests"},
                "compare": {"--against", "--top", "--json"},
                "sweep": {"--config", "--profile", "--no-progress", "--jobs", "--table-only"},
                "gates": {"--ckpt", "--out", "--tokenizer", "--tensorboard", "--n-prompts", "--max-tokens", "--n-switch"},
                "reproduce": {"--profile", "--seeds", "--force", "--no-progress", "--jobs", "--force-results",
                              "--allow-changed-models", "--bundle"},
                "bundle": {"--verify", "--with-corpus", "--without-data-wheels", "--deps", "--have",
                           "--python-version", "--platform", "--cache-dir", "--project"}}
    for name, command in COMMANDS.items():
        module, _, fn = command.target.partition(":")
        parser = build_parser(name, getattr(importlib.import_module(module), fn))
        flags = {s for a in parser._actions for s in a.option_strings}
        assert expected.pop(name) <= flags, name
    assert not expected


@pytest.mark.parametrize("argv, says", [
    (["reproduce", "--seeds", "two"], "--seeds"),
    (["reproduce", "--seeds", "0"], "--seeds must be >= 1"),
    (["reproduce", "--force"], "--force"),
    (["reproduce", "--profile", "no_such_profile"], "no_such_profile"),
    (["reproduce", "--jobs", "0"], "--jobs must be >= 1"),
    (["bundle", "out", "--platform"], "--platform"),
    (["bundle", "out", "--deps", "--python-version", "3.12", "--platform", "a", "B!"], "not a wheel platform tag"),
])
def test_reproduce_and_bundle_usage_errors(argv, says, tmp_path, capsys, monkeypatch):
    """The two pipeline commands parse by their signatures too: a bad value is one line naming it, nothing run."""
    monkeypatch.chdir(tmp_path)
    assert bts_main(argv) == 2
    assert says in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_help_imports_no_torch():
    """`bts <cmd> --help` of every converted command (and `bts --help`) imports neither torch nor lightning nor
    transformers: it answers in a fraction of a second (timings: benchmarks/STARTUP.md)."""
    names = list(COMMANDS)
    code = ("import sys; from bts.cli.main import main\n"
            f"for name in {names!r} + [None]:\n"
            "    rc = main([name, '--help'] if name else ['--help'])\n"
            "    heavy = [m for m in ('torch', 'lightning', 'transformers') if m in sys.modules]\n"
            "    print(name, rc, heavy, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    report = done.stderr.strip().splitlines()
    assert report == [f"{n} 0 []" for n in [*names, None]], done.stderr[-3000:]


@pytest.fixture
def trained_bts(tmp_path, saved_llama_family):
    """A tiny trained BTS stitch checkpoint (``bts fit`` output: no ``derived_from``)."""
    seed_dir, dirs = saved_llama_family
    model = StitchedLM.from_pretrained_dirs(seed_dir, dirs, expert_names=NAMES, num_stitch_layers=2)
    save_stitched(model, tmp_path / "bts")
    return tmp_path / "bts"


def _snapshot(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_stitch_remove_never_overwrites_a_trained_checkpoint(tmp_path, trained_bts, capsys):
    other = tmp_path / "other"
    save_stitched(StitchedLM.from_pretrained_dirs(tmp_path / "seed", [tmp_path / f"expert{i}" for i in range(3)],
                                                  expert_names=NAMES, num_stitch_layers=2), other)
    before = _snapshot(other)
    capsys.readouterr()
    argv = ["stitch-remove", "--ckpt", str(trained_bts), "--expert", "math", "--out", str(other)]
    assert bts_main(argv) == 2
    line = _one_error_line(capsys)
    assert "refusing to overwrite" in line and "BTS stitch checkpoint" in line and "--force" in line
    assert _snapshot(other) == before
    # its own input, even with --force
    assert bts_main(["stitch-remove", "--ckpt", str(trained_bts), "--expert", "math", "--out", str(trained_bts),
                     "--force"]) == 2
    assert "is one of the inputs" in _one_error_line(capsys)
    # a rerun over its own earlier output is fine (a reproduce stage that reruns), and --force replaces the trained one
    rm = tmp_path / "rm"
    assert bts_main(["stitch-remove", "--ckpt", str(trained_bts), "--expert", "math", "--out", str(rm)]) == 0
    assert bts_main(["stitch-remove", "--ckpt", str(trained_bts), "--expert", "code", "--out", str(rm)]) == 0
    assert json.loads((rm / MANIFEST).read_text())["derived_from"]["removed"] == "code"
    assert bts_main([*argv, "--force"]) == 0
    assert json.loads((other / MANIFEST).read_text())["derived_from"]["removed"] == "math"


def test_merge_never_overwrites_a_trained_model(tmp_path, saved_llama_family, capsys):
    seed_dir, dirs = saved_llama_family
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    argv = ["merge", "--method", "soup", "--seed", str(seed_dir), "--experts", *map(str, dirs), "--out", str(trained)]
    assert bts_main(argv) == 2
    line = _one_error_line(capsys)
    assert "refusing to overwrite" in line and "a model (config.json)" in line and "--force" in line
    assert [p.name for p in trained.iterdir()] == ["config.json"]
    assert bts_main([*argv, "--force"]) == 0
    assert (trained / "merge.json").is_file()


def test_ceiling_data_and_eval_refuse_what_they_would_lose(tmp_path, capsys):
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    assert bts_main(["ceiling", "--runs", str(tmp_path / "runs"), "--out", str(trained)]) == 2
    assert "refusing to overwrite" in (line := _one_error_line(capsys)) and "--force" in line
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "bts_tokenizer.json").write_text(json.dumps({"vocab_size": 999}))
    assert bts_main(["data", "--cache-dir", str(tmp_path / "cache"), "--tokenizer", str(tok)]) == 2
    assert "a trained tokenizer" in (line := _one_error_line(capsys)) and "--force" in line
    assert not (tmp_path / "cache").exists()  # refused before the corpus was built
    assert bts_main(["eval", "--model", str(trained), "--out", str(trained)]) == 2
    assert "is a directory" in _one_error_line(capsys)
    assert [p.name for p in trained.iterdir()] == ["config.json"]


def test_outputs_that_cannot_be_written_fail_before_any_work(tmp_path):
    """Every command checks its outputs first: one line, exit 2, before torch is even imported."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        ["eval", "--model", str(tmp_path), "--out", f"{blocker}/x.json"],
        ["eval", "--model", str(tmp_path), "--out", "/proc/x/y.json"],
        ["stitch-remove", "--ckpt", str(tmp_path), "--expert", "math", "--out", "/proc/rm3"],
        ["stitch-remove", "--ckpt", str(tmp_path), "--expert", "math", "--out", f"{blocker}/rm"],
        ["merge", "--method", "soup", "--seed", str(tmp_path), "--experts", str(tmp_path), "--out", "/proc/m"],
        ["ceiling", "--runs", str(tmp_path), "--out", "/proc/c"],
        ["data", "--cache-dir", str(tmp_path / "cache"), "--tokenizer", "/proc/t"],
        ["import-gguf", "--cache-dir", str(tmp_path / "cache"), "--out", f"{blocker}/g"],
        ["compare", str(tmp_path), "--json", "/proc/x/c.json"],
    ]
    code = ("import sys; from bts.cli.main import main\n"
            f"for argv in {cases!r}:\n"
            "    rc = main(argv)\n"
            "    print(rc, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.stdout.split("\n")[:-1] == ["2 False"] * len(cases), done.stderr[-3000:]
    errors = done.stderr.strip().splitlines()
    assert len(errors) == len(cases) and all(e.startswith("error: ") for e in errors), done.stderr[-3000:]
    for argv, err in zip(cases, errors):
        target = argv[-1]
        assert ("/proc" in err if target.startswith("/proc") else f"{blocker} is a file" in err), (argv, err)
    assert not (tmp_path / "cache").exists()


def test_a_command_prints_no_error_itself():
    """Errors are printed once, by bts.cli.main: no command module swallows a BTSError (catching one to raise a
    clearer one is fine) or prints `error:`, and none has a parser of its own."""
    import ast

    for command in COMMANDS.values():
        module = command.target.partition(":")[0]
        source = (ROOT / "src" / Path(*module.split("."))).with_suffix(".py").read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ExceptHandler) and "BTSError" in ast.unparse(node.type or ast.Name("")):
                assert isinstance(node.body[-1], ast.Raise), (module, node.lineno)
        assert not re.search(r"print\(f?[\"']error", source), module
        assert "CommandParser" not in source, module

