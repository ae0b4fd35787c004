"""The ablation runner (experiments/): verdict rules on hand-made results, grid errors, and
the tiny grid end to end, with a rerun that must skip every run and rewrite the same report."""

import json
import os

import pytest

from experiments import ablations, report

TINY_GRID = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                         "experiments", "grids", "tiny.py")


def _result(variant, seed, fd, **extra):
    """A stored result with ancestral FD `fd` {K: value}."""
    return {"variant": variant, "seed": seed, "step": 10, "latent_dim": 16,
            "fd": {"ancestral": {str(k): v for k, v in fd.items()}},
            "eval_seconds": 1.0, "hardware": "test", **extra}


def _results(a: dict, b: dict, names=("dmz", "gaussian")) -> dict:
    """Two variants, seeds 0 and 1: a/b map K -> (seed 0 FD, seed 1 FD)."""
    out = {}
    for name, fds in zip(names, (a, b)):
        for seed in (0, 1):
            out[name, seed] = _result(name, seed, {k: v[seed] for k, v in fds.items()})
    return out


def test_compare_resolves_only_non_overlapping_seed_ranges_unlikely_by_chance():
    four, higher = [1.0, 2.0, 1.5, 1.2], [3.0, 4.0, 3.5, 3.2]
    assert report.compare(four, higher) == "better"
    assert report.compare(higher, four) == "worse"
    assert report.compare([1.0, 3.5, 1.5, 1.2], higher) == "within spread"
    assert report.compare([0.9, 0.8, 0.85, 0.95], [0.5, 0.6, 0.55, 0.4],
                          lower_is_better=False) == "better"
    # 2 against 2 seeds: non-overlapping by chance one time in 3 (2 / C(4, 2)): not resolved
    assert report.range_rule_p(2, 2) == pytest.approx(1 / 3)
    assert report.range_rule_p(4, 4) == pytest.approx(2 / 70)
    assert report.range_rule_p(3, 5) == pytest.approx(2 / 56)
    assert report.compare([1.0, 2.0], [3.0, 4.0]) == "within spread"
    assert report.compare([1.0, 2.0, 1.5], [3.0, 4.0, 3.5]) == "within spread"  # 2/20
    assert report.compare([1.0], [3.0]) == "within spread"  # one seed: no spread to judge
    assert report.compare([], [1.0, 2.0]) == "-"


def test_versus_claim_verdicts():
    steps = [10, 20]
    holds = _results({10: (1, 2), 20: (1, 2)}, {10: (3, 4), 20: (3, 4)})
    fails = _results({10: (3, 4), 20: (3, 4)}, {10: (1, 2), 20: (1, 2)})
    unresolved = _results({10: (1, 3.5), 20: (1, 3.5)}, {10: (3, 4), 20: (3, 4)})
    partly = _results({10: (1, 2), 20: (1, 3.5)}, {10: (3, 4), 20: (3, 4)})
    verdict = {name: report.claim_versus(r, steps, "dmz", "gaussian", "Gaussian")[1]
               for name, r in (("holds", holds), ("fails", fails), ("open", unresolved),
                               ("partly", partly))}
    assert verdict["holds"] == report.HOLDS
    assert verdict["fails"] == report.FAILS
    assert verdict["open"] == report.OPEN
    assert verdict["partly"].startswith("partly holds (1 of 2 points)")
    lines, missing = report.claim_versus(holds, steps, "dmz", "time_embedding", "time")
    assert missing == report.NOT_RUN


def test_few_step_claim_needs_the_gap_to_narrow():
    steps = [10, 20, 100]
    narrowing = _results({10: (10, 11), 20: (8, 9), 100: (5, 6)},
                         {10: (20, 21), 20: (15, 16), 100: (6, 7)}, ("dmz", "no_z"))
    widening = _results({10: (10, 11), 20: (8, 9), 100: (5, 6)},
                        {10: (12, 13), 20: (15, 16), 100: (26, 27)}, ("dmz", "no_z"))
    lines, verdict = report.claim_few_steps(narrowing, steps)
    assert verdict == report.HOLDS
    assert "narrows from 10 at K=10 to 1 at K=100" in "\n".join(lines)
    assert report.claim_few_steps(widening, steps)[1].startswith(report.OPEN)


def test_latent_size_trend():
    results = {}
    # 4 seeds each: every seed of the largest |z| beats every seed of the smallest
    for dim, probe, fd in ((8, (0.50, 0.52, 0.51, 0.53), (10, 11, 12, 13)),
                           (64, (0.60, 0.62, 0.61, 0.63), (20, 21, 22, 23)),
                           (256, (0.70, 0.71, 0.72, 0.73), (30, 31, 32, 33))):
        for seed in range(4):
            results[f"z{dim}", seed] = _result(
                f"z{dim}", seed, {100: fd[seed]}, latent_dim=dim,
                probe_accuracy=probe[seed], probe_accuracy_at_init=0.3,
                distinct_codes_train=100)
            results[f"z{dim}", seed]["fd"]["learned"] = {"100": fd[seed] - 5}
            results[f"z{dim}", seed]["prior"] = {"learned_bits_per_code": dim / 2}
    lines, verdict = report.claim_latent_size(results, [100], ("z8", "z64", "z256"))
    assert verdict == report.HOLDS, lines
    # one |z| evaluated so far: not yet, when the grid holds the others; else not in the grid
    only_z8 = {k: r for k, r in results.items() if k[0] == "z8"}
    assert report.claim_latent_size(only_z8, [100], ("z8", "z64"))[1] == report.NOT_YET
    assert report.claim_latent_size(only_z8, [100], ("z8",))[1] == report.NOT_RUN
    assert report._trend([[0.5, 0.6, 0.55, 0.52], [0.4, 0.45, 0.42, 0.41]],
                         increasing=True) == report.FAILS


def test_grid_errors_before_any_training(tmp_path):
    path = tmp_path / "grid.py"
    path.write_text("def get_grid():\n    return {'name': 'x', 'base': "
                    "'configs/fashion_mnist.py:tiny', 'common': {}, 'seeds': (0,), "
                    "'variants': {'dmz': {'model.latent_dimension': 4}}, "
                    "'protocol': {'ddim_variants': ('dmz',)}}\n")
    grid = ablations.load_grid(str(path))
    with pytest.raises(ablations.GridError, match="latent_dimension"):
        ablations.run_config(grid, "dmz", 0)
    path.write_text(path.read_text().replace("'ddim_variants'", "'ddim_variant'"))
    with pytest.raises(ablations.GridError, match="ddim_variant"):
        ablations.load_grid(str(path))
    with pytest.raises(ablations.GridError, match="no grid file"):
        ablations.load_grid(str(tmp_path / "absent.py"))


@pytest.mark.slow  # trains and evaluates 2 tiny runs (about a minute)
def test_tiny_grid_end_to_end_and_rerun_skips(tmp_path, monkeypatch):
    grid = ablations.load_grid(TINY_GRID)
    root, out = str(tmp_path / "runs"), str(tmp_path / "docs" / "results.md")
    command = ablations.command_of(TINY_GRID, root, out)
    results = ablations.run_grid(grid, root)
    assert sorted(results) == [("dmz", 0), ("no_z", 0)]
    report.write_report(grid, ablations.stored_results(grid, root), out, command)

    dmz = results["dmz", 0]
    assert set(dmz["fd"]) == {"ancestral", "ddim", "learned"}  # ddim and prior variants
    assert set(results["no_z", 0]["fd"]) == {"ancestral"}
    assert [c["step"] for c in dmz["curve"]] == [2, 4]  # checkpoints every 2 steps
    assert dmz["curve"][-1]["nll_bpd_bound"] == pytest.approx(
        dmz["curve"][-1]["nll_bpd_given_z"] + 8 / (32 * 32))  # |z| = 8 bits over 32x32x1
    assert dmz["prior"]["bernoulli_bits_per_code"] == 8
    assert 0 < dmz["fd"]["ancestral"]["2"] < 1e4
    text = open(out).read()
    for n in range(1, 7):
        assert f"## Claim {n}" in text
    assert command in text and "2 of 2 evaluated" in text
    assets = os.path.join(str(tmp_path / "docs"), "results")
    pictures = {name: open(os.path.join(assets, name), "rb").read()
                for name in sorted(os.listdir(assets))}
    assert {"fd_vs_k.png", "training.png", "samples_dmz.png", "samples_no_z.png"} <= set(
        pictures)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")
    monkeypatch.setattr(ablations, "train_run", must_not_run)
    monkeypatch.setattr(ablations, "evaluate_run", must_not_run)
    again = ablations.run_grid(grid, root)
    assert ({k: json.dumps(v, sort_keys=True) for k, v in again.items()}
            == {k: json.dumps(v, sort_keys=True) for k, v in results.items()})
    os.remove(out)
    report.write_report(grid, ablations.stored_results(grid, root), out, command)
    assert open(out).read() == text
    assert {name: open(os.path.join(assets, name), "rb").read()
            for name in sorted(os.listdir(assets))} == pictures


def test_results_store_counts_as_done_when_the_workdir_is_gone(tmp_path):
    grid = ablations.load_grid(TINY_GRID)
    store = tmp_path / "store"
    store.mkdir()
    result = _result("dmz", 0, {2: 5.0}, protocol=ablations.protocol_of(grid))
    (store / "dmz-seed0.json").write_text(json.dumps(result))
    stale = dict(result, protocol={"another": "protocol"})
    (store / "no_z-seed0.json").write_text(json.dumps(stale))
    found = ablations.stored_results(grid, str(tmp_path / "runs"), str(store))
    assert list(found) == [("dmz", 0)]  # the other protocol's result does not count
    assert ablations.stored_results(grid, str(tmp_path / "runs")) == {}
