"""Static merges (soup, task arithmetic, TIES), their registry, λ selection and the ``bts merge`` command."""

from __future__ import annotations

import json
import re

import pytest
import torch

from baselines.merge import (
    MergedModel,
    get_merge_method,
    load_merged,
    merge_method_names,
    merge_models,
    select_lambda,
    validation_loss,
)
from baselines.task_arithmetic import TaskArithmetic, elect_sign_mask, trim_magnitude
from bts.cli.main import main as bts_main
from bts.core.io import BTSError, state_dict_sha256
from bts.core.params import ParamCounts, count_params
from conftest import tiny_llama


def merge_main(argv: list[str]) -> int:
    return bts_main(["merge", *argv])


def sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_errors():
    assert {"soup", "task_arithmetic", "ties"} <= set(merge_method_names())
    with pytest.raises(BTSError, match=r"unknown merge method 'nope' \(known: soup, task_arithmetic, ties"):
        get_merge_method("nope")
    with pytest.raises(BTSError, match="does not take option 'lambda'"):
        get_merge_method("soup", **{"lambda": 0.5})
    with pytest.raises(BTSError, match="density must be in"):
        get_merge_method("ties", density=0.0)
    ties = get_merge_method("ties", **{"lambda": 0.7})
    assert isinstance(ties, TaskArithmetic) and ties.name == "ties"
    assert ties.hyperparameters() == {"lambda": 0.7, "density": 0.5, "sign_election": True, "normalize": True}
    ta = get_merge_method("task_arithmetic")
    assert type(ta) is TaskArithmetic
    assert ta.hyperparameters() == {"lambda": 1.0, "density": 1.0, "sign_election": False, "normalize": False}


# ----------------------------------------------------------------------------------------------------------
# Soup


def test_soup_of_identical_models_is_that_model(llama_family):
    seed, _ = llama_family
    base = sd(seed)
    out = get_merge_method("soup").merge(base, [sd(seed), sd(seed), sd(seed)])
    assert out.keys() == base.keys()
    for k in base:
        assert torch.equal(out[k], base[k]), k


def test_soup_weights_hand_computed():
    soup = get_merge_method("soup")
    base, a, b = {"w": t(0.0, 3.0)}, {"w": t(3.0, 0.0)}, {"w": t(6.0, 6.0)}
    torch.testing.assert_close(soup.merge(base, [a, b])["w"], t(3.0, 3.0), atol=1e-6, rtol=0)
    # weights over seed + experts, seed first, normalised: (1*0 + 2*3 + 0*6) / 3 = 2 ; (1*3 + 0 + 0) / 3 = 1
    torch.testing.assert_close(soup.merge(base, [a, b], [1.0, 2.0, 0.0])["w"], t(2.0, 1.0), atol=1e-6, rtol=0)
    # scale invariance of the weights
    torch.testing.assert_close(
        soup.merge(base, [a, b], [2.0, 4.0, 0.0])["w"], soup.merge(base, [a, b], [1.0, 2.0, 0.0])["w"]
    )
    with pytest.raises(BTSError, match="expected 3 weights"):
        soup.merge(base, [a, b], [1.0, 1.0])
    with pytest.raises(BTSError, match="positive sum"):
        soup.merge(base, [a, b], [0.0, 0.0, 0.0])
    with pytest.raises(BTSError, match=">= 0"):
        soup.merge(base, [a, b], [1.0, -1.0, 1.0])


def test_soup_uniform_mean_of_real_models(llama_family):
    seed, experts = llama_family
    out = get_merge_method("soup").merge(sd(seed), [sd(e) for e in experts])
    for k, v in seed.state_dict().items():
        mean = torch.stack([v] + [e.state_dict()[k] for e in experts]).mean(0)
        torch.testing.assert_close(out[k], mean, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Task arithmetic


def test_task_arithmetic_lambda_zero_is_seed(llama_family):
    seed, experts = llama_family
    base = sd(seed)
    out = get_merge_method("task_arithmetic", **{"lambda": 0.0}).merge(base, [sd(e) for e in experts])
    for k in base:
        assert torch.equal(out[k], base[k]), k


def test_task_arithmetic_hand_computed():
    base, e1, e2 = {"w": t(1, 2, 3)}, {"w": t(2, 2, 2)}, {"w": t(0, 4, 3)}
    # τ1 = [1, 0, -1], τ2 = [-1, 2, 0]
    ta = get_merge_method("task_arithmetic", **{"lambda": 0.5})
    torch.testing.assert_close(ta.merge(base, [e1, e2])["w"], t(1, 3, 2.5))  # 1 + .5*[0, 2, -1]
    torch.testing.assert_close(ta.merge(base, [e1, e2], [2.0, 1.0])["w"], t(1.5, 3, 2))  # 2τ1+τ2 = [1, 2, -2]
    norm = TaskArithmetic(lam=0.5, normalize=True)
    torch.testing.assert_close(
        norm.merge(base, [e1, e2], [2.0, 1.0])["w"], t(1 + 0.5 / 3, 2 + 1 / 3, 3 - 1 / 3)
    )
    with pytest.raises(BTSError, match="expected 2 weights"):
        ta.merge(base, [e1, e2], [1.0, 1.0, 1.0])


def test_one_model_merges_equal_that_model(llama_family):
    seed, experts = llama_family
    base, e = sd(seed), sd(experts[0])
    soup = get_merge_method("soup").merge(base, [])
    for k in base:
        assert torch.equal(soup[k], base[k])
    for method in (
        get_merge_method("task_arithmetic"),
        get_merge_method("ties", density=1.0),
    ):
        out = method.merge(base, [e])
        for k in base:
            torch.testing.assert_close(out[k], e[k], atol=1e-6, rtol=0)
    # soup of the expert alone (seed weight 0)
    out = get_merge_method("soup").merge(base, [e], [0.0, 1.0])
    for k in base:
        torch.testing.assert_close(out[k], e[k], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# TIES on hand-written tensors


def test_trim_magnitude_ties_and_rounding():
    tau = t(3, -1, 1, -1, 0.5)
    # k = int(0.4 * 5) = 2: keep 3 and, of the three |1| ties, the lowest index (1)
    assert torch.equal(trim_magnitude(tau, 0.4), t(3, -1, 0, 0, 0))
    # k = int(0.5 * 5) = int(2.5) = 2 (truncation)
    assert torch.equal(trim_magnitude(tau, 0.5), t(3, -1, 0, 0, 0))
    # k = int(0.8 * 5) = 4: all three ties kept, 0.5 dropped
    assert torch.equal(trim_magnitude(tau, 0.8), t(3, -1, 1, -1, 0))
    # k = max(1, int(0.01 * 5)) = 1
    assert torch.equal(trim_magnitude(tau, 0.01), t(3, 0, 0, 0, 0))
    assert torch.equal(trim_magnitude(tau, 1.0), tau)
    assert trim_magnitude(torch.zeros(0), 0.5).numel() == 0


@pytest.mark.parametrize("density", [0.001, 0.1, 0.3, 0.35, 0.5, 0.7, 0.999])
@pytest.mark.parametrize("shape", [(7,), (10, 7), (3, 5, 11)])
def test_trim_keeps_exactly_k_nonzeros(density, shape):
    g = torch.Generator().manual_seed(0)
    n = torch.Size(shape).numel()
    k = max(1, int(density * n))
    cont = torch.randn(shape, generator=g)
    kept = trim_magnitude(cont, density)
    assert int((kept != 0).sum()) == k
    # the kept entries are the k largest magnitudes, unchanged
    thr = cont.abs().flatten().sort(descending=True).values[k - 1]
    assert torch.equal(kept != 0, cont.abs() >= thr)
    assert torch.equal(kept[kept != 0], cont[kept != 0])
    # many exact ties (integer magnitudes): still exactly k
    ints = torch.randint(-3, 4, shape, generator=g).float()
    ints[ints == 0] = 1.0
    assert int((trim_magnitude(ints, density) != 0).sum()) == k


def test_ties_density_per_task_vector_in_a_merge():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, 10, generator=g)
    experts = [base + torch.randn(20, 10, generator=g) for _ in range(3)]
    ties = get_merge_method("ties", density=0.3)
    k = int(0.3 * 200)
    for e in experts:
        assert int((trim_magnitude(e - base, ties.density) != 0).sum()) == k
    # a single expert with weight 1: the merged Δ is exactly its trimmed task vector
    delta = ties.delta_tensor(base, [experts[0]], [1.0])
    assert int((delta != 0).sum()) == k


def test_ties_hand_computed():
    base = torch.ones(6)
    tau1 = t(4, -3, 2, -1, 0.5, 6)
    tau2 = t(-2, -5, 1, 3, 0.25, -6)
    # density 0.5 -> k = 3:  trim1 = [4,-3,0,0,0,6]   trim2 = [0,-5,0,3,0,-6]
    # weights [1, 2]:        t̂1 = [4,-3,0,0,0,6]       t̂2 = [0,-10,0,6,0,-12]
    # mass = [4,-13,0,6,0,-6] -> sign [+,-,+,+,+,-] (0 counts +)
    # agree1 = [1,1,0,0,0,0]  agree2 = [0,1,0,1,0,1]
    # Σ agree·t̂ = [4,-13,0,6,0,-12] ; Σ agree·w = [1,3,0->1,2,0->1,2]
    # Δ = [4,-13/3,0,3,0,-6] ; λ = 0.5
    ties = get_merge_method("ties", density=0.5, **{"lambda": 0.5})
    out = ties.merge({"w": base}, [{"w": base + tau1}, {"w": base + tau2}], [1.0, 2.0])["w"]
    expected = base + 0.5 * t(4, -13 / 3, 0, 3, 0, -6)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # entries 2 and 4 are trimmed in every task vector -> exactly the base
    assert out[2] == base[2] and out[4] == base[4]
    # normalize=False: the sum over agreeing entries, not the mean
    raw = TaskArithmetic(lam=0.5, density=0.5, sign_election=True, normalize=False)
    out = raw.merge({"w": base}, [{"w": base + tau1}, {"w": base + tau2}], [1.0, 2.0])["w"]
    torch.testing.assert_close(out, base + 0.5 * t(4, -13, 0, 6, 0, -12), atol=1e-6, rtol=0)


def test_ties_sign_election_zero_mass_counts_positive():
    d = torch.stack([t(2, 1, -3), t(-2, -1, 1)])
    # masses 0, 0, -2 -> signs +, +, -
    assert torch.equal(elect_sign_mask(d), torch.stack([t(1, 1, 1), t(0, 0, 0)]))
    ties = get_merge_method("ties", density=1.0)
    base = torch.zeros(3)
    out = ties.merge({"w": base}, [{"w": t(2, 1, -3)}, {"w": t(-2, -1, 1)}])["w"]
    assert torch.equal(out, t(2, 1, -3))
    # weighted mass exactly zero: 1*2 + 2*(-1) = 0 -> '+' wins -> Δ = 2 / 1
    out = ties.merge({"w": torch.zeros(1)}, [{"w": t(2)}, {"w": t(-1)}], [1.0, 2.0])["w"]
    assert torch.equal(out, t(2))


def test_ties_all_disagreeing_entries():
    ties = get_merge_method("ties", density=1.0)
    base = torch.zeros(2)
    # entry 0: +3 vs -1 vs -1 -> mass +1 -> only +3 agrees -> 3
    # entry 1: +1 vs -3      -> mass -2 -> only -3 agrees -> -3
    out = ties.merge({"w": base}, [{"w": t(3, 1)}, {"w": t(-1, -3)}, {"w": t(-1, 0)}])["w"]
    assert torch.equal(out, t(3, -3))
    # entries where no task vector has mass (all zero / unchanged) stay the base
    out = ties.merge({"w": t(5.0)}, [{"w": t(5.0)}, {"w": t(5.0)}])["w"]
    assert torch.equal(out, t(5.0))


def test_mismatched_state_dicts_are_user_errors():
    ties = get_merge_method("ties")
    with pytest.raises(BTSError, match=r"shape mismatch for w: seed \(2,\) vs model 1 \(3,\)"):
        ties.merge({"w": torch.zeros(2)}, [{"w": torch.zeros(3)}])
    with pytest.raises(BTSError, match="model 1 lacks parameter v"):
        ties.merge({"w": torch.zeros(2), "v": torch.zeros(1)}, [{"w": torch.zeros(2)}])
    with pytest.raises(BTSError, match="model 1 has parameter z that the seed lacks"):
        ties.merge({"w": torch.zeros(2)}, [{"w": torch.zeros(2), "z": torch.zeros(1)}])


# ----------------------------------------------------------------------------------------------------------
# Against mergekit 0.1.5's merge functions in process (a dev dependency; end to end: test_mergekit_parity.py)


def _mergekit():
    import importlib.metadata as md

    from mergekit.merge_methods.api import merge_state_dicts, merge_tensors

    assert md.version("mergekit") == "0.1.5", "conventions are pinned to mergekit 0.1.5"
    return merge_tensors, merge_state_dicts


@pytest.mark.parametrize(
    "method,kw",
    [
        ("ties", {"density": 0.3, "lam": 0.7, "normalize": True}),
        ("ties", {"density": 0.5, "lam": 1.0, "normalize": True}),
        ("ties", {"density": 0.9, "lam": 1.3, "normalize": False}),
        ("ties", {"density": 1.0, "lam": 0.5, "normalize": True}),
        ("task_arithmetic", {"lam": 0.5, "normalize": False}),
        ("task_arithmetic", {"lam": 1.0, "normalize": True}),
    ],
)
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]])
def test_matches_mergekit_tensors(method, kw, weights):
    merge_tensors, _ = _mergekit()
    g = torch.Generator().manual_seed(3)
    ours = get_merge_method(method, **kw)
    params = {"weight": weights, "lambda": kw["lam"], "normalize": kw["normalize"]}
    if "density" in kw:
        params["density"] = kw["density"]
    for shape in [(5,), (37, 11), (4, 6, 8)]:
        base = torch.randn(shape, generator=g)
        experts = [base + torch.randn(shape, generator=g) for _ in range(3)]
        # entries with exactly zero sign mass and unchanged entries
        flat = [e.view(-1) for e in experts]
        flat[1][:2] = 2 * base.view(-1)[:2] - flat[0][:2]
        flat[2][:2] = base.view(-1)[:2]
        flat[0][2] = flat[1][2] = flat[2][2] = base.view(-1)[2]
        got = ours.merge_tensor(base, experts, weights)
        ref = merge_tensors([base, *experts], method, parameters=params, base_index=0)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_matches_mergekit_state_dicts(llama_family):
    _, merge_state_dicts = _mergekit()
    seed, experts = llama_family
    base, exps = sd(seed), [sd(e) for e in experts]
    weights = [1.0, 0.5, 2.0]
    ours = get_merge_method("ties", density=0.4, **{"lambda": 0.8}).merge(base, exps, weights)
    ref = merge_state_dicts(
        [base, *exps],
        "ties",
        base=0,
        parameters={"weight": weights, "density": 0.4, "lambda": 0.8},
    )
    assert ours.keys() == ref.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# λ selection


def test_select_lambda():
    losses = {0.3: 2.0, 0.5: 1.5, 0.7: 1.5, 1.0: float("nan")}
    best, scores = select_lambda([0.3, 0.5, 0.7, 1.0], losses.__getitem__)
    assert best == 0.5  # equal losses: the earlier λ
    assert list(scores) == [0.3, 0.5, 0.7, 1.0] and scores[0.3] == 2.0
    with pytest.raises(BTSError, match="empty"):
        select_lambda([], lambda lam: 0.0)
    with pytest.raises(BTSError, match="non-finite"):
        select_lambda([0.1], lambda lam: float("inf"))


def test_merge_models_lambda_grid(saved_llama_family, tmp_path):
    seed_dir, expert_dirs = saved_llama_family
    tokens = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    grid = [0.0, 0.5, 1.0]
    calls = []

    def evaluate(lm):
        calls.append(lm)
        return validation_loss(lm, tokens, batch_size=3)

    out = tmp_path / "ta"
    rec = merge_models("task_arithmetic", seed_dir, expert_dirs, out, lambda_grid=grid, evaluate=evaluate)
    sel = rec["lambda_selection"]
    assert sel["grid"] == grid and len(sel["val_loss"]) == 3 and len(calls) == 3
    assert sel["best_lambda"] == grid[min(range(3), key=lambda i: sel["val_loss"][i])]
    assert rec["hyperparameters"]["lambda"] == sel["best_lambda"]
    assert json.loads((out / "merge.json").read_text())["lambda_selection"] == sel
    # the written model is the merge at the chosen λ, and its loss is the recorded score
    merged = load_merged(out)
    best = sel["best_lambda"]
    i = grid.index(best)
    assert validation_loss(merged, tokens) == pytest.approx(sel["val_loss"][i], abs=1e-5)
    direct = merge_models("task_arithmetic", seed_dir, expert_dirs, tmp_path / "direct", **{"lambda": best})
    assert direct["output_state_dict_sha256"] == rec["output_state_dict_sha256"]
    with pytest.raises(BTSError, match="no lambda"):
        merge_models("soup", seed_dir, expert_dirs, tmp_path / "x", lambda_grid=grid, evaluate=evaluate)
    assert not (tmp_path / "x").exists()


def test_validation_loss_matches_hf_loss(llama_family):
    seed, _ = llama_family
    tokens = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = seed(input_ids=tokens, labels=tokens).loss.item()
    assert validation_loss(MergedModel(seed), tokens, batch_size=2) == pytest.approx(ref, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# merge_models / bts merge


def test_merge_models_writes_loadable_dir(saved_llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    seed_dir, expert_dirs = saved_llama_family
    (seed_dir / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "ties"
    rec = merge_models("ties", seed_dir, expert_dirs, out, density=0.5, weights=[1.0, 1.0, 2.0])
    model = AutoModelForCausalLM.from_pretrained(out)
    state = {k: v.float() for k, v in model.state_dict().items()}
    assert state_dict_sha256(state) == rec["output_state_dict_sha256"]
    info = json.loads((out / "merge.json").read_text())
    assert (
        info["method"] == "ties"
        and info["hyperparameters"]["density"] == 0.5
        and info["weights"] == [1.0, 1.0, 2.0]
    )
    assert info["tokenizer_files"] == ["tokenizer_config.json"] and (out / "tokenizer_config.json").is_file()
    seed = AutoModelForCausalLM.from_pretrained(seed_dir)
    assert info["seed"]["state_dict_sha256"] == state_dict_sha256(seed.state_dict())
    assert info["seed"]["path"] == str(seed_dir.resolve()) and len(info["experts"]) == 3
    n = count_params(model)
    assert info["params"] == {"trained": 0, "total": n, "active": n}
    assert load_merged(out).param_counts() == ParamCounts(0, n, n)
    # the merged weights equal the in-memory merge
    mem = get_merge_method("ties", density=0.5).merge(
        sd(seed), [sd(AutoModelForCausalLM.from_pretrained(d)) for d in expert_dirs], [1.0, 1.0, 2.0]
    )
    for k in mem:
        assert torch.equal(mem[k], state[k]), k


def _no_partial(parent, name):
    return not (parent / name).exists() and not [
        p for p in parent.iterdir() if p.name.startswith(f".{name}.")
    ]


def test_command_writes_dir_from_config(saved_llama_family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    seed_dir, expert_dirs = saved_llama_family
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        f"method: soup\nseed: {seed_dir}\nexperts:\n"
        + "".join(f"  - {d}\n" for d in expert_dirs)
        + f"out: {tmp_path / 'from_cfg'}\nweights: [1, 1, 1, 1]\n"
    )
    # command-line options override the config
    assert merge_main(["--config", str(cfg), "--out", str(tmp_path / "soup")]) == 0
    assert "wrote soup merge of 4 models" in capsys.readouterr().out
    assert not (tmp_path / "from_cfg").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "soup")
    assert json.loads((tmp_path / "soup" / "merge.json").read_text())["method"] == "soup"
    # rerunning onto a previous merge output replaces it
    assert merge_main(["--config", str(cfg), "--out", str(tmp_path / "soup")]) == 0

    args = ["--method", "ties", "--seed", str(seed_dir), "--experts", *map(str, expert_dirs)]
    assert merge_main([*args, "--out", str(tmp_path / "ties"), "--density", "0.3", "--lambda", "0.5"]) == 0
    info = json.loads((tmp_path / "ties" / "merge.json").read_text())
    assert info["hyperparameters"] == {
        "lambda": 0.5,
        "density": 0.3,
        "sign_election": True,
        "normalize": True,
    }

    # a λ grid chosen on validation tokens
    tokens = tmp_path / "val.pt"
    torch.save(torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0)), tokens)
    assert (
        merge_main(
            [*args, "--out", str(tmp_path / "grid"), "--lambda", "0.5", "1.0", "--val-tokens", str(tokens)]
        )
        == 0
    )
    sel = json.loads((tmp_path / "grid" / "merge.json").read_text())["lambda_selection"]
    assert sel["grid"] == [0.5, 1.0] and sel["best_lambda"] == sel["grid"][sel["val_loss"].index(min(sel["val_loss"]))]
    # the written model is the one scored best: its loss, recomputed, is the recorded minimum
    loss = validation_loss(load_merged(tmp_path / "grid"), torch.load(tokens, weights_only=True))
    assert loss == pytest.approx(min(sel["val_loss"]), abs=1e-5)


def test_command_help():
    assert merge_main(["--help"]) == 0


@pytest.mark.parametrize(
    "case,match",
    [
        (
            "unknown_method",
            r"^error: unknown merge method 'bogus' \(known: soup, task_arithmetic, ties, btm\)$",
        ),
        ("mismatch", r"^error: shape mismatch for "),
        ("missing_dir", r"^error: model directory not found: .*nowhere$"),
        ("unknown_key", r"^error: unknown key 'lamda' in config "),
        ("bad_option", r"^error: merge method 'soup' does not take option 'density'"),
        ("grid_without_data", r"^error: a lambda grid needs --val-tokens"),
        ("missing_out", r"^error: missing option --out$"),
        ("bad_weights", r"^error: ties: expected 3 weights"),
    ],
)
def test_command_errors_leave_no_output(saved_llama_family, tmp_path, capsys, case, match):
    seed_dir, expert_dirs = saved_llama_family
    out = tmp_path / "out"
    experts = [str(d) for d in expert_dirs]
    method = "ties"
    extra: list[str] = []
    if case == "unknown_method":
        method = "bogus"
    elif case == "mismatch":
        other = tmp_path / "wide"
        tiny_llama(0, d=48).save_pretrained(other)
        experts = [str(other), *experts[1:]]
    elif case == "missing_dir":
        experts = [str(tmp_path / "nowhere")]
    elif case == "unknown_key":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("method: ties\nlamda: 0.5\n")
        extra = ["--config", str(cfg)]
    elif case == "bad_option":
        method, extra = "soup", ["--density", "0.5"]
    elif case == "grid_without_data":
        extra = ["--lambda", "0.3", "0.5"]
    elif case == "bad_weights":
        extra = ["--weights", "1", "2"]
    argv = ["--method", method, "--seed", str(seed_dir), "--experts", *experts, *extra]
    if case != "missing_out":
        argv += ["--out", str(out)]
    capsys.readouterr()
    assert merge_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert _no_partial(tmp_path, "out")


def test_command_refuses_to_overwrite_inputs_or_foreign_dirs(saved_llama_family, tmp_path, capsys):
    seed_dir, expert_dirs = saved_llama_family
    base = ["--method", "soup", "--seed", str(seed_dir), "--experts", *map(str, expert_dirs)]
    assert merge_main([*base, "--out", str(expert_dirs[0])]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert merge_main([*base, "--out", str(foreign)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "x"


def _save_tiny_tokenizer(path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_eval_loader_reads_merge_output(saved_llama_family, tmp_path):
    from bts.eval.loading import load_for_eval

    seed_dir, expert_dirs = saved_llama_family
    _save_tiny_tokenizer(seed_dir)
    out = tmp_path / "soup"
    rec = merge_models("soup", seed_dir, expert_dirs, out)
    assert "tokenizer.json" in rec["tokenizer_files"]
    model, tokenizer, params = load_for_eval(out)
    assert params == rec["params"] == load_merged(out).param_counts().to_dict()
    assert params["trained"] == 0 and params["total"] == params["active"] == count_params(model.model)
    assert tokenizer.convert_tokens_to_ids("a") == 1
