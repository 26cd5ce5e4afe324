"""A reduced end-to-end reproduction (a few steps per stage) writes a schema-valid metrics.json and tables,
reuses finished stages, and refuses bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from bts.cli.main import main as bts_main
from bts.core.io import BTSError, exclusive_lock
from bts.eval.config import EvalConfig
from bts.pipeline.profile import load_profile
from bts.pipeline.summary import aggregate_seeds

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["seed", "expert_code", "expert_math", "expert_multilingual", "soup", "task_arithmetic", "ties", "btm",
           "expert_routing", "btx_sample", "btx_soft", "btx_top2", "bam", "bam_adapters", "bts"]
ABLATIONS = ["bts_k1", "bts_all_e2h", "bts_hub_math", "bts_two_model", "bts_remove_code", "bts_remove_math",
             "bts_remove_multilingual", "bts_add_multilingual"]
DOMAINS = ["general", "code", "math", "multilingual"]


def _smoke_profile(tmp_path: Path) -> Path:
    p = load_profile(str(ROOT / "configs/reproduce/smoke.yaml"))
    raw = yaml.safe_load((ROOT / "configs/reproduce/smoke.yaml").read_text())
    raw.pop("base")
    base = yaml.safe_load((ROOT / "configs/reproduce/tiny.yaml").read_text())
    raw = {**base, **raw, "runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
           "keep_checkpoints": False}
    assert len(raw["stages"]) == len(p.stages)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _check_entry(name: str, e: dict, no_signal=()) -> None:
    assert e["family"] in ("dense", "merging", "upcycling"), name
    assert set(e["params"]) >= {"trained", "total", "active"}, name
    assert all(isinstance(e["params"][k], int) for k in ("trained", "total", "active")), name
    assert e["params"]["active"] <= e["params"]["total"], name
    assert set(e["ppl"]) == set(DOMAINS) and all(v > 1.0 for v in e["ppl"].values()), name
    assert all(0.0 <= v <= 100.0 for v in e["tasks"].values()), name
    assert bool(e["tasks"]) == (name in METHODS), name  # ablation rows: perplexity only (ablation_eval_tasks)
    signal = [v for t, v in e["tasks"].items() if t not in no_signal]
    assert e["avg"] == (pytest.approx(sum(signal) / len(signal)) if signal else None), name
    assert set(e["ppl_ci"]) == set(DOMAINS) and set(e["tasks_ci"]) == set(e["tasks"]), name
    for d, (lo, hi) in e["ppl_ci"].items():
        assert lo <= e["ppl"][d] <= hi, (name, d)
    # perplexity after a domain switch: the Table 3 methods (ablation rows: perplexity only)
    assert bool(e["switch_ppl"]) == (name in METHODS), name
    assert set(e.get("switch_ppl_ci", {})) == set(e["switch_ppl"]), name
    for k, (lo, hi) in e.get("switch_ppl_ci", {}).items():
        assert e["switch_ppl"][k] > 1.0 and lo <= e["switch_ppl"][k] <= hi, (name, k)


@pytest.mark.slow
def test_reduced_reproduction_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # stage configs name configs/... relative to the repository
    profile = _smoke_profile(tmp_path)
    assert bts_main(["reproduce", "--profile", str(profile), "--no-progress"]) == 0
    results = tmp_path / "results"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["profile"] == "smoke" and metrics["seeds"] == [0]
    assert set(metrics["config"]) >= {"d_model", "n_layers", "vocab_size", "n_experts", "stitch_layers", "domains"}
    assert sorted(metrics["methods"]) == sorted(METHODS)
    assert sorted(metrics["ablations"]) == sorted(ABLATIONS)
    for name, e in {**metrics["methods"], **metrics["ablations"]}.items():
        _check_entry(name, e, metrics["no_signal_tasks"])
    # the regime, chance levels, claims with verdicts and CIs, and the environment (docs/design.md §7, issue 15)
    regime = metrics["regime"]
    assert regime["seed_tokens_per_param"] >= 20 and regime["expert_lr"] and regime["seed_peak_lr"]
    assert set(regime["experts"]) == {"code", "math", "multilingual"}
    assert all(set(v) == {"own_ppl_gain", "ceiling"} for v in regime["experts"].values())
    assert set(metrics["chance"]) == set(metrics["methods"]["seed"]["tasks"])
    assert metrics["claims"] and all(c["verdict"] in ("holds", "does not hold", "unresolved") and len(c["ci"]) == 2
                                     for c in metrics["claims"])
    assert {"versions", "data"} <= set(metrics["env"])
    assert {"bts_beats_btm_switching", "bts_beats_expert_routing_switching"} <= {c["id"] for c in metrics["claims"]}
    assert "## Domain-switching text" in (results / "table.md").read_text()
    cfg = metrics["config"]
    n, K, d = cfg["n_experts"], cfg["stitch_layers"], cfg["d_model"]
    bts = metrics["methods"]["bts"]["params"]
    seed = metrics["methods"]["seed"]["params"]["total"]
    # eq. 3-4 per stitch layer, plus the closed H2E gates' logit bias ((n + 1)·d) in each of the K/2 H2E layers
    assert bts["trained"] == K * (2 * n + 1) * d * d + (K // 2) * (n + 1) * d
    assert bts["total"] == bts["trained"] + (n + 1) * seed
    for f in ("table.md", "params.md", "ablations.md", "README.md", "gates.json"):
        assert (results / f).is_file(), f
    assert (results / "figures" / "gates_summary.png").is_file()
    # the figures of metrics.json (issue 23), shown by the README (the smoke profile logs no loss curves)
    for f in ("ppl_domains.png", "claims_forest.png"):
        assert (results / "figures" / f).is_file(), f
    readme = (results / "README.md").read_text()
    assert "](figures/claims_forest.png)" in readme and "](figures/ppl_domains.png)" in readme
    assert "unresolved (of" in readme and "seed tokens per parameter" in readme
    # keep_checkpoints: false deletes each finished stage's Lightning checkpoints (its output stays)
    ckpts = tmp_path / "runs" / "ckpt"
    assert (tmp_path / "runs" / "bts" / "stitch.safetensors").is_file()
    assert not ckpts.exists() or not any(ckpts.rglob("*.ckpt"))
    # A second run reuses every stage (nothing retrains) and gives the same numbers.
    assert bts_main(["reproduce", "--profile", str(profile), "--no-progress"]) == 0
    again = json.loads((results / "metrics.json").read_text())
    assert again["methods"] == metrics["methods"] and again["ablations"] == metrics["ablations"]
    assert set(again["stage_seconds"]["seed0"]) <= {"data"}
    assert again["claims"] == metrics["claims"]


def test_unknown_profile_and_bad_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(BTSError, match="unknown reproduction profile"):
        load_profile("no_such_profile")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: x\nruns_dir: r\nresults_dir: s\nstages: []\nbogus: 1\n")
    with pytest.raises(BTSError, match="unknown key 'bogus'"):
        load_profile(str(bad))
    # a profile's eval settings load as the suite's EvalConfig
    smoke = load_profile("smoke")
    assert isinstance(smoke.eval, EvalConfig) and smoke.eval.ppl_blocks == 2 and smoke.eval.code_items == 2
    assert load_profile("tiny").eval == EvalConfig()


def test_concurrent_runs_are_refused(tmp_path):
    with exclusive_lock(tmp_path / ".lock", "run directory x"), pytest.raises(BTSError, match="in use by pid"), \
            exclusive_lock(tmp_path / ".lock", "run directory x"):
        pass


def test_seed_aggregation_mean_and_std():
    a = {"methods": {"m": {"ppl": {"code": 2.0}, "avg": 1.0, "family": "dense"}}}
    b = {"methods": {"m": {"ppl": {"code": 4.0}, "avg": 3.0, "family": "dense"}}}
    out = aggregate_seeds([a, b])["methods"]["m"]
    assert out["ppl"]["code"] == 3.0 and out["ppl"]["code_std"] == pytest.approx(2 ** 0.5)
    assert out["avg"] == 2.0 and out["family"] == "dense"


def test_parallel_stage_failure_names_the_stage_and_stops_dependants(tmp_path):
    from bts.pipeline.profile import Profile, StageSpec
    from bts.pipeline.run import Pipeline

    stages = [StageSpec(name="bad", kind="command", args=["merge", "--config", str(tmp_path / "missing.yaml")]),
              StageSpec(name="after_bad", kind="command", args=["merge", "--config", "x.yaml"], after=["bad"])]
    profile = Profile(profile="p", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"), stages=stages)
    pipe = Pipeline(profile, 0, progress=False)
    preps = {s.name: pipe.prepare(s) for s in stages}
    with pytest.raises(BTSError, match="stage bad failed"):
        pipe._run_parallel(preps, jobs=2)
    logs = tmp_path / "runs" / "logs" / "reproduce"
    assert "missing.yaml" in (logs / "bad.log").read_text()  # the worker's output went to the stage's log
    assert not (logs / "after_bad.log").exists()  # a stage after a failed one never starts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_stage_workers_die_with_the_pipeline_process():
    import os
    import signal
    import subprocess
    import time

    script = (
        "import multiprocessing as mp, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from bts.pipeline.scheduler import _die_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'), initializer=_die_with_parent)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(3)\n"
        "    print(*pool._processes, flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the stage worker outlived the killed pipeline process")


@pytest.mark.parametrize("config", ["configs/seed/tiny.yaml", "configs/experts/tiny_code.yaml",
                                    "configs/baselines/btx_top2.yaml", "configs/bts/tiny.yaml"])
def test_each_seed_varies_init_and_data_order(tmp_path, config):
    # seed_everything alone leaves the configs' own seeds (weight/router init, data order) fixed
    from bts.pipeline.profile import Profile, StageSpec
    from bts.pipeline.run import Pipeline
    from bts.pipeline.stages import fit_args

    profile = Profile(profile="p", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "r"), stages=[])
    stage = StageSpec(name="x", kind="fit", config=str(ROOT / config))
    assert [a for a in fit_args(Pipeline(profile, 0), stage, Path(stage.config))[0] if "seed" in a and "=" in a] == \
        ["--seed_everything=0"]  # seed 0 runs the config as written
    args = fit_args(Pipeline(profile, 2), stage, Path(stage.config))[0]
    shifted = dict(a[2:].split("=") for a in args if "init_args." in a and "seed=" in a)
    assert "--seed_everything=2" in args and shifted["data.init_args.seed"] == "2"
    # every seed parameter of the module moves too, and a module `seed` equals the data `seed` (Lightning merges
    # the two hparams and refuses differing values)
    assert shifted.get("model.init_args.seed", "2") == "2"
    if "btx" in config:
        assert shifted["model.init_args.router_seed"] == "2"
    if "seed/" in config or "experts/" in config:
        assert "model.init_args.seed" in shifted
