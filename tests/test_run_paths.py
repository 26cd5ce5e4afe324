"""A user's path through the Lightning commands: `bts --help`, one run root (`--run_dir`), expert names from the
directories, `bts validate` of a stage config evaluating what the stage trained, results printed once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning  # noqa: F401  (imported here so its log handler binds to the session's stderr, not a test's capsys)
import pytest
import yaml

import tiny_fit as tf
from bts.cli.commands import COMMANDS, one_line_help
from bts.cli.main import main as bts_main
from bts.cli.run_dir import apply_run_dir
from bts.core.io import BTSError

ROOT = Path(__file__).resolve().parents[1]


def test_help_describes_every_command_in_one_line(capsys):
    assert bts_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        help_line = one_line_help(command)
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert help_line in line and ":" + command.target.split(":")[1] not in line and len(help_line) > 20


@pytest.mark.parametrize("key, expect", [
    ("--trainer.max_stepz", "unrecognized arguments: --trainer.max_stepz 3"),
    ("--model.init_args.bogus", "Problem with given class_path 'bts.stitch.module.StitchModule': Option 'bogus'"),
    ("--model.init_args.stitch.bogus", "Problem with given class_path 'bts.stitch.model.StitchConfig': Option 'bogus'"),
])
def test_key_errors_are_found_before_lightning_or_torch_is_imported(key, expect):
    code = ("import sys; from bts.cli.main import main; rc = main(['fit', '--config', 'configs/bts/tiny.yaml', "
            f"'{key}', '3']); print(rc, 'lightning' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip().removeprefix('error: ')}"]
    assert expect in done.stderr


@pytest.mark.parametrize("config", ["configs/bts/tiny.yaml", "configs/experts/tiny_math.yaml",
                                    "configs/seed/tiny.yaml", "configs/bts/scale/paper_2p7b.yaml"])
def test_run_dir_relocates_every_run_path(tmp_path, config):
    argv = apply_run_dir(["fit", "--config", str(ROOT / config), "--run_dir", str(tmp_path / "run")])
    assert argv[:2] == ["fit", "--config"] and len(argv) == 3
    resolved = Path(argv[2])
    assert resolved == tmp_path / "run" / "configs" / Path(config).name
    values = re.findall(r":\s+(\S+)|^\s+-\s+(\S+)", "\n".join(ln.split("#")[0] for ln in
                                                             resolved.read_text().splitlines()), re.MULTILINE)
    paths = [v for pair in values for v in pair if "/" in v]
    assert paths and not [p for p in paths if p.startswith("runs/")]
    cfg = yaml.safe_load(resolved.read_text())
    assert cfg["model"]["init_args"]["output_dir"].startswith(str(tmp_path / "run") + "/")
    assert cfg["trainer"]["default_root_dir"].startswith(str(tmp_path / "run") + "/")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    sources = tf.write_corpus(root / "corpus", n=80)
    tok = tf.write_tokenizer(root / "tok")
    dirs = {}
    for name, seed, noise in (("base", 0, 0.0), ("coder", 0, 0.02), ("mathy", 1, 0.02)):
        dirs[name] = tf.save_llama(root / "mine" / name, seed, len(tok), layers=2, noise=noise)
        tok.save_pretrained(str(dirs[name]))
    return root, sources, dirs


def _small_data(root, sources) -> list[str]:
    return ["--data.init_args.sources", json.dumps(sources), "--data.init_args.mixture",
            json.dumps({"general": 0.5, "code": 0.5}), "--data.init_args.eval_domains", '["general", "code"]',
            "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "4",
            "--data.init_args.num_train_samples", "8", "--data.init_args.val_blocks_per_domain", "2",
            "--data.init_args.cache_dir", str(root / "cache")]


def test_tiny_bts_config_over_ones_own_models_needs_only_their_paths(family, tmp_path, capsys):
    root, sources, dirs = family
    run = tmp_path / "run"
    rc = bts_main(["fit", "--config", str(ROOT / "configs/bts/tiny.yaml"), "--run_dir", str(run),
                   "--model.init_args.hub", str(dirs["base"]),
                   "--model.init_args.experts", f"[{dirs['coder']}, {dirs['mathy']}]",
                   "--model.init_args.stitch.num_stitch_layers", "2", "--trainer.max_steps", "2",
                   "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
                   *_small_data(root, sources)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    manifest = json.loads((run / "bts" / "bts.json").read_text())
    assert [e["name"] for e in manifest["experts"]] == ["coder", "mathy"]
    assert (run / "ckpt" / "bts" / "last.ckpt").is_file() and (run / "logs" / "bts").is_dir()
    resolved = yaml.safe_load((run / "configs" / "tiny.yaml").read_text())
    assert resolved["data"]["init_args"]["tokenizer_dir"] == str(dirs["base"])  # the hub's: run/tokenizer is absent


def test_expert_names_count_mismatch_names_the_key(family, tmp_path, capsys):
    from bts.core.io import BTSError
    from bts.stitch.model import StitchedLM

    _, _, dirs = family
    with pytest.raises(BTSError, match=r"^expert_names has 3 names \(a, b, c\) but experts has 2 directories"):
        StitchedLM.from_pretrained_dirs(dirs["base"], [dirs["coder"], dirs["mathy"]], expert_names=["a", "b", "c"],
                                        num_stitch_layers=1)


def _expert_config(tmp_path, root, sources, dirs, output_dir) -> Path:
    model = {"class_path": "bts.dense.module.CausalLMModule",
             "init_args": {"init_from": str(dirs["base"]), "output_dir": str(output_dir)}}
    data = tf.data_config(tmp_path, root / "tok", sources)
    trainer = tf.trainer_config(tmp_path, limit_val_batches=2)
    return tf.write_config(tmp_path / "expert.yaml", model, data, trainer)


def _table(out: str) -> dict[str, float]:
    assert out.count("metric") == 1, out  # one table, not one per dataloader
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(val/\S+)\s+(\S+)$", out, re.MULTILINE)}


def test_validate_of_an_expert_config_evaluates_the_expert_once(family, tmp_path, capsys):
    root, sources, dirs = family
    cfg = _expert_config(tmp_path, root, sources, dirs, dirs["coder"])
    assert bts_main(["validate", "--config", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert f"evaluating the trained model {dirs['coder']}" in captured.err
    expert = _table(captured.out)
    assert bts_main(["validate", "--config", str(cfg), "--model.init_args.init_from", str(dirs["base"]),
                     "--trainer.default_root_dir", str(tmp_path / "logs_seed")]) == 0
    seed = _table(capsys.readouterr().out)
    assert expert.keys() == seed.keys() and "val/general/ppl" in expert and expert != seed


def test_validate_before_training_says_what_to_pass(family, tmp_path, capsys):
    root, sources, dirs = family
    cfg = _expert_config(tmp_path, root, sources, dirs, tmp_path / "not_trained")
    assert bts_main(["test", "--config", str(cfg)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: bts test of this config would evaluate its starting "
                                                   f"point {dirs['base']} (model.init_args.init_from)")
    assert "--ckpt_path" in lines[0] and "--model.init_args.init_from" in lines[0]


def test_run_dir_with_an_overlay_that_names_no_paths(tmp_path):
    """An overlay of trainer settings beside the stage config: the stage config is relocated, the overlay applies as
    it is; an overlay alone has nothing to relocate and is one error."""
    overlay = tmp_path / "short.yaml"
    overlay.write_text("trainer:\n  max_steps: 2\n")
    run = tmp_path / "run"
    argv = apply_run_dir(["fit", "--config", str(ROOT / "configs/seed/tiny.yaml"), "--config", str(overlay),
                          "--run_dir", str(run)])
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert configs[1] == str(overlay) and Path(configs[0]).parent == run / "configs"
    assert yaml.safe_load(Path(configs[0]).read_text())["model"]["init_args"]["output_dir"].startswith(str(run) + "/")
    with pytest.raises(BTSError, match="no --config given has any"):
        apply_run_dir(["fit", "--config", str(overlay), "--run_dir", str(run)])
