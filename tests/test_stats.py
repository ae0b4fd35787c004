"""The ablation report's statistics (experiments/stats.py) and its paired verdicts, against
closed forms and published sample sizes; the runner's tiered order. No training: < 5 s."""

import math

import numpy as np
import pytest

from experiments import ablations, report, stats


def test_paired_t_test_matches_the_closed_form_for_two_degrees_of_freedom():
    # differences (1, 2, 0.5): mean 7/6, SD sqrt(7/12); with df = 2 the two-sided p-value is
    # 1 - t / sqrt(t^2 + 2) exactly
    out = stats.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 4.0, 2: 3.5})
    t = (7 / 6) / (math.sqrt(7 / 12) / math.sqrt(3))
    assert out["n"] == 3 and out["seeds"] == [0, 1, 2]
    assert out["mean"] == pytest.approx(7 / 6) and out["sd"] == pytest.approx(math.sqrt(7 / 12))
    assert out["t"] == pytest.approx(t) and out["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
    half = 4.302652729911275 * math.sqrt(7 / 12) / math.sqrt(3)  # t_{0.975, 2}
    assert out["ci95"] == pytest.approx((7 / 6 - half, 7 / 6 + half))


def test_effect_excluded_is_the_one_sided_paired_t_test_against_delta():
    # differences (1, 2, 0.5) against delta = 2: t = (7/6 - 2) / (sqrt(7/12) / sqrt(3)); with
    # df = 2 the t CDF is 1/2 + t / (2 sqrt(t^2 + 2)) exactly
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 4.0, 2: 3.5}
    out = stats.effect_excluded(a, b, 2.0)
    t = (7 / 6 - 2) / (math.sqrt(7 / 12) / math.sqrt(3))
    assert out["t"] == pytest.approx(t) and out["n"] == 3
    assert out["p"] == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)))
    upper = 7 / 6 + 2.919985580355516 * math.sqrt(7 / 12) / math.sqrt(3)  # t_{0.95, 2}
    assert out["upper95"] == pytest.approx(upper)
    assert (out["p"] < 0.05) == (upper < 2.0)
    # a delta the differences reach is not excluded: p above 1/2
    assert stats.effect_excluded(a, b, 1.0)["p"] > 0.5
    assert stats.effect_excluded({0: 0.0}, {0: 1.0}, 1.0) is None


def test_paired_uses_only_the_seeds_both_arms_have():
    out = stats.paired({0: 0.0, 1: 0.0, 5: 100.0}, {0: 1.0, 1: 3.0, 7: -50.0})
    assert out["seeds"] == [0, 1] and out["mean"] == pytest.approx(2.0)
    assert stats.paired({0: 1.0}, {0: 2.0, 1: 3.0}) is None  # one shared seed: no test


def test_seeds_needed_equals_the_published_paired_t_test_sample_sizes():
    # G*Power, paired t-test, two-sided alpha 0.05, power 0.8: d_z = 0.5 -> 34, 0.8 -> 15
    assert stats.seeds_needed(0.5, 1.0) == 34
    assert stats.seeds_needed(8.0, 10.0) == 15
    assert stats.power_of(34, 0.5, 1.0) >= 0.8 > stats.power_of(33, 0.5, 1.0)
    assert stats.power_of(6, 0.0, 1.0) == pytest.approx(0.05)  # no effect: the test's level


def test_pooled_sd_pools_squared_deviations_over_degrees_of_freedom():
    # groups (1, 3) and (2, 2, 5): SS 2 and 6 over 1 + 2 degrees of freedom
    assert stats.pooled_sd([[1.0, 3.0], [2.0, 2.0, 5.0], [7.0]]) == pytest.approx(
        math.sqrt(8 / 3))
    assert stats.pooled_sd([[4.0]]) is None


def test_a_consistent_paired_gap_resolves_where_the_seed_ranges_overlap():
    rng = np.random.default_rng(0)
    a = {s: float(x) for s, x in enumerate([100.0, 200.0, 300.0, 400.0])}
    b = {s: a[s] + 20.0 + float(rng.normal(0, 1)) for s in a}  # b worse by ~20 every seed
    assert report.compare(list(a.values()), list(b.values())) == "within spread"
    assert report.compare_paired(a, b) == "better"  # lower FD is better: a beats b
    assert report.compare_paired(b, a) == "worse"
    noisy = {s: a[s] + float(x) for s, x in zip(a, [30.0, -25.0, 20.0, -28.0])}
    assert report.compare_paired(a, noisy) == "within spread"


def test_runs_go_tier_by_tier_and_seed_by_seed_within_a_tier():
    grid = {"variants": {"a": {}, "b": {}, "c": {}}, "seeds": (0, 1),
            "order": (("a", "b"), ("c",))}
    assert ablations.runs_of(grid) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("c", 0),
                                       ("c", 1)]
    del grid["order"]
    assert ablations.runs_of(grid)[:3] == [("a", 0), ("b", 0), ("c", 0)]


def _run(variant, seed, fd10, repeat, probe=None):
    out = {"variant": variant, "seed": seed, "step": 600, "latent_dim": 16,
           "fd": {"ancestral": {"10": fd10, "20": fd10 - 100.0},
                  "repeats": {"10": [fd10, fd10 + repeat]}},
           "eval_seconds": 1.0, "hardware": "test"}
    if probe is not None:
        out["probe_infodiffusion"] = {"split": "train", "examples": 10000,
                                      "accuracy": probe, "accuracy_std": 0.01,
                                      "accuracy_at_init": probe - 0.1,
                                      "accuracy_at_init_std": 0.01}
    return out


def test_report_renders_the_power_analysis_and_the_paired_rows(tmp_path):
    fd = {"dmz": (1000.0, 1100.0, 900.0), "no_z": (1200.0, 1280.0, 1130.0),
          "gaussian": (990.0, 1120.0, 880.0)}
    results = {(v, s): _run(v, s, fd[v][s], repeat=10.0 * (s + 1),
                            probe=None if v == "no_z" else 0.7 + 0.01 * s)
               for v in fd for s in range(3)}
    grid = {"name": "t", "path": "grid.py", "base": "b.py", "common": {}, "seeds": (0, 1, 2),
            "variants": {"dmz": {}, "no_z": {}, "gaussian": {}},
            "protocol": {"fd_steps": (10, 20), "fd_num_samples": 8, "nll_examples": 0},
            "power": {"pilot_seeds": (0, 1),
                      "effects": {1: ("dmz", "no_z", 0.25, "25%"),
                                  2: ("dmz", "gaussian", 0.5, "50%")}}}
    path = tmp_path / "results.md"
    report.write_report(grid, results, str(path), "cmd")
    text = path.read_text()
    # pilot (seeds 0, 1): dmz's repeats differ by 10 and 20 -> pooled SD sqrt((50+200)/2)
    assert f"| `dmz` | 1050 ± 71 | {report._num(math.sqrt(125), 2)} |" in text
    # claim 1's pilot gaps: 200 and 180 -> mean 190, SD 14; delta = 0.25 x 1240 = 310
    n1 = stats.seeds_needed(310.0, float(np.std([200.0, 180.0], ddof=1)))
    assert f"| 1 | `no_z` - `dmz` | 190 ± 14 | 25% | 310 | {n1} |" in text
    # all three seeds: gaps 200, 180, 230 at both K, overlapping ranges, paired p < 0.05
    test = stats.paired({s: fd["dmz"][s] for s in range(3)}, {s: fd["no_z"][s] for s in range(3)})
    assert test["p"] < 0.05 and f"{test['p']:.2g} (n=3)" in text
    # the paper's effects: claim 1's gaps (mean 203) exclude delta 310, claim 2's (-3.3 ± 21)
    # exclude 0.5 x 1055 = 528: claim 1 holds by less, claim 2's sign is not resolved
    one_sided = stats.effect_excluded({s: fd["dmz"][s] for s in range(3)},
                                      {s: fd["no_z"][s] for s in range(3)}, 310.0)
    assert one_sided["p"] < 0.05 and f"p = {one_sided['p']:.2g} (n=3)" in text
    assert "| 1. Few-step generation | holds, by less than the paper's effect |" in text
    assert f"| 2. Binary beats Gaussian | {report.SMALLER} |" in text
    assert "| `dmz` | 16 | ? x 32 | 0.71 ± 0.01 | 0.61 ± 0.01 |" in text
    # claim 5 without a curve: the end of training is one checkpoint; better there is not
    # "better along training"
    assert "| 5. Faster convergence | not resolved at this budget |" in text
    assert "| 600 | 1000 ± 100 | 1203 ± 75 |" in text

    # the reverse: dmz worse at the end of training -> "lower FD along training" fails
    swapped = {(v, s): _run(v, s, fd[{"dmz": "no_z", "no_z": "dmz"}.get(v, v)][s], 10.0)
               for v in fd for s in range(3)}
    report.write_report(grid, swapped, str(path), "cmd")
    assert "| 5. Faster convergence | does not hold |" in path.read_text()


def test_the_report_only_keys_leave_stored_runs_valid():
    """protocol.sweep_variants chooses what claim 4 reads: adding it to a grid keeps the
    stored runs (their protocol is compared with the grid's) instead of rerunning them."""
    grid = {"protocol": {"fd_steps": (10,)}, "common": {"seed": 0}, "base": "b.py"}
    with_sweep = dict(grid, protocol={"fd_steps": (10,), "sweep_variants": ("dmz", "z64")})
    assert ablations.protocol_of(with_sweep) == ablations.protocol_of(grid)
    other = dict(grid, protocol={"fd_steps": (10,), "ddim_variants": ("dmz",)})
    assert ablations.protocol_of(other) != ablations.protocol_of(grid)


def test_a_seed_initialises_the_shared_modules_of_every_arm_alike():
    """The pairing the report relies on: at one seed, every parameter `no_z`, `gaussian` and
    `time_embedding` share with `dmz` (same path, same shape) starts equal."""
    import jax
    from flax import traverse_util
    from conftest import tiny_config
    from dmz_jax.model import create_model, image_shape, init_variables

    def params(**overrides):
        config = tiny_config()
        config.update_from_flattened_dict(overrides)
        rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # as create_train_state
        init = jax.jit(lambda: init_variables(create_model(config), rng, image_shape(config)))
        return traverse_util.flatten_dict(jax.device_get(init()["params"]), sep="/")

    dmz = params()
    for overrides in ({"model.latent_type": "none"}, {"model.latent_type": "gaussian"},
                      {"model.conditioning": "time_embedding"}):
        other = params(**overrides)
        shared = [k for k in other if k in dmz and other[k].shape == dmz[k].shape]
        assert len(shared) >= 0.9 * len(other), overrides  # nearly all of them are shared
        for k in shared:
            np.testing.assert_array_equal(other[k], dmz[k], err_msg=f"{overrides}: {k}")
