"""The pre-registered analysis: parsing `analysis:` (prereg.py), TOST (stats.py), outcomes and verdicts (analysis.py)."""

from __future__ import annotations

import pytest
from scipy import stats as sps

from hetero_testnet.errors import ConfigError
from hetero_testnet.experiments.analysis import FIELDS, run_analysis
from hetero_testnet.experiments.prereg import analysis_from_dict, parse_analysis
from hetero_testnet.experiments.stats import holm, paired, tost_paired

LABELS = {"HET", "CM", "SMALL", "DROP", "ORACLE"}
RAW = {
    "metric": "val_loss_widest", "delta": 0.02,
    "comparisons": [{"name": "HET-CM", "a": "HET", "b": "CM"}, {"name": "HET-SMALL", "a": "HET", "b": "SMALL"},
                    {"name": "HET-DROP", "a": "HET", "b": "DROP"}],
    "checks": [{"name": "ORACLE-SMALL", "a": "ORACLE", "b": "SMALL", "max_diff": -0.05}],
    "verdicts": [{"verdict": "helps", "all": ["HET-SMALL better", "HET-DROP better", "HET-CM non_inferior"]},
                 {"verdict": "hurts", "any": ["HET-DROP worse", "HET-CM worse"]},
                 {"verdict": "neutral", "all": ["HET-CM equivalent", "HET-SMALL equivalent", "HET-DROP equivalent"]}],
    "failed_check": "inconclusive: capacity",
}
BASE = {1: 5.00, 2: 5.03, 3: 4.98, 4: 5.01, 5: 5.02}
JITTER = {1: 0.002, 2: -0.001, 3: 0.0015, 4: -0.002, 5: 0.0005}


def arms(**offsets: float):
    """by_seed for configurations at BASE + offset + a small per-seed jitter (different per label)."""
    def by_seed(label: str):
        k = sorted(LABELS).index(label) + 1
        return {s: BASE[s] + offsets.get(label, 0.0) + JITTER[s] * k for s in BASE}
    return by_seed


def test_parse_defaults_and_round_trip() -> None:
    a = parse_analysis(dict(RAW), "x.yaml: analysis", LABELS)
    assert (a.test, a.correction, a.alpha, a.equivalence, a.otherwise) == ("paired_t", "holm", 0.05, "tost",
                                                                           "inconclusive")
    assert [c.name for c in a.comparisons] == ["HET-CM", "HET-SMALL", "HET-DROP"]
    assert analysis_from_dict(a.to_dict()) == a


@pytest.mark.parametrize("change, message", [
    ({"comparisons": [{"name": "X", "a": "HET", "b": "NOPE"}]}, "'NOPE' is not a configuration label"),
    ({"test": "welch"}, "test must be one of paired_t"),
    ({"correction": "bonferroni"}, "correction must be one of holm"),
    ({"delta": 0}, "delta > 0"),
    ({"verdicts": [{"verdict": "v", "all": ["HET-CM faster"]}]}, "'<comparison> <outcome>'"),
    ({"verdicts": [{"verdict": "v"}]}, "needs `all` or `any`"),
    ({"extra": 1}, "unknown field 'extra'"),
    ({"metric": "loss"}, "metric must be"),
])
def test_parse_errors_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_analysis({**RAW, **change}, "x.yaml: analysis", LABELS)


def test_tost_matches_two_one_sided_scipy_tests() -> None:
    x = {1: 5.01, 2: 5.00, 3: 5.015, 4: 4.995, 5: 5.005}
    b = {1: 5.00, 2: 5.005, 3: 5.01, 4: 5.00, 5: 5.0}
    eq = tost_paired(x, b, 0.02)
    d = [x[s] - b[s] for s in x]
    p_low = sps.ttest_1samp(d, -0.02, alternative="greater").pvalue
    p_high = sps.ttest_1samp(d, 0.02, alternative="less").pvalue
    assert eq.p == pytest.approx(max(p_low, p_high), rel=1e-9) and eq.equivalent()
    half = sps.t.ppf(0.95, 4) * sps.sem(d)
    assert (eq.ci90_low, eq.ci90_high) == pytest.approx((sum(d) / 5 - half, sum(d) / 5 + half))
    assert tost_paired({1: 1.0}, {1: 1.0}, 0.02).p is None


def _analysis():
    return parse_analysis(dict(RAW), "x", LABELS)


def test_helps_when_het_beats_weak_baselines_and_is_non_inferior_to_cm() -> None:
    r = run_analysis(_analysis(), arms(SMALL=0.10, DROP=0.08, CM=0.0, ORACLE=-0.05))
    assert r.verdict == "helps" and all(c.passed for c in r.checks)
    small = r.comparison("HET-SMALL")
    assert small.significant and small.outcomes[0] == "better" and small.diff == pytest.approx(-0.10, abs=0.01)
    # recompute: paired t and Holm over the three primary p-values
    by_seed = arms(SMALL=0.10, DROP=0.08, CM=0.0, ORACLE=-0.05)
    ps = [paired(by_seed(c.a), by_seed(c.b)).p for c in r.comparisons]
    assert [c.p_holm for c in r.comparisons] == holm(ps)
    assert list(r.comparisons[0].to_dict())[:len(FIELDS)] == list(FIELDS)


def test_hurts_neutral_inconclusive_and_failed_check() -> None:
    assert run_analysis(_analysis(), arms(SMALL=0.10, DROP=-0.08, ORACLE=-0.05)).verdict == "hurts"
    assert run_analysis(_analysis(), arms(ORACLE=-0.2)).verdict == "neutral"      # all within ±delta
    assert run_analysis(_analysis(), arms(SMALL=0.10, DROP=0.0, CM=0.012, ORACLE=-0.05)).verdict == "inconclusive"
    failed = run_analysis(_analysis(), arms(SMALL=0.10, DROP=0.08, ORACLE=0.09))   # ORACLE - SMALL = -0.01
    assert failed.verdict == "inconclusive: capacity" and not failed.checks[0].passed
    assert "ORACLE-SMALL" in failed.verdict_reason


def test_missing_configuration_gives_no_outcome() -> None:
    def by_seed(label: str):
        return {} if label == "DROP" else arms(SMALL=0.1, ORACLE=-0.1)(label)
    r = run_analysis(_analysis(), by_seed)
    drop = r.comparison("HET-DROP")
    assert drop.p is None and drop.outcomes == [] and not drop.significant and drop.reason
    assert r.verdict == "inconclusive"


def test_secondary_comparisons_have_their_own_metric_and_holm_family_and_no_say_in_the_verdict() -> None:
    raw = {**RAW, "secondary": [{"name": "HET-SMALL-tier2", "a": "HET", "b": "SMALL", "metric": "val_loss_tier2"},
                                {"name": "CM-ORACLE-tier0", "a": "CM", "b": "ORACLE", "metric": "val_loss_tier0"}]}
    a = parse_analysis(raw, "x", LABELS)
    assert [(c.name, c.metric) for c in a.secondary] == [("HET-SMALL-tier2", "val_loss_tier2"),
                                                         ("CM-ORACLE-tier0", "val_loss_tier0")]
    assert analysis_from_dict(a.to_dict()) == a and "secondary" not in parse_analysis(dict(RAW), "x", LABELS).to_dict()
    primary = arms(SMALL=0.10, DROP=0.08, CM=0.0, ORACLE=-0.05)
    tier2 = arms(HET=-0.2)   # HET's tier-2 submodel far better than SMALL's model on that metric

    def by_metric(label: str, metric: str):
        return (tier2 if metric == "val_loss_tier2" else primary)(label)

    r = run_analysis(a, primary, by_metric)
    assert r.verdict == run_analysis(parse_analysis(dict(RAW), "x", LABELS), primary).verdict == "helps"
    het_small = next(c for c in r.secondary if c.comparison == "HET-SMALL-tier2")
    assert het_small.diff == pytest.approx(-0.2, abs=0.01) and "better" in het_small.outcomes
    ps = [c.p for c in r.secondary]
    assert [c.p_holm for c in r.secondary] == holm(ps)  # Holm within the secondary family only
    assert set(r.to_dict()) >= {"secondary"} and r.to_dict()["secondary"][0]["comparison"] == "HET-SMALL-tier2"
    with pytest.raises(ConfigError, match="metric must be"):
        parse_analysis({**RAW, "secondary": [{"name": "s", "a": "HET", "b": "SMALL", "metric": "ppl"}]}, "x", LABELS)
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_analysis({**RAW, "secondary": [{"name": "HET-CM", "a": "HET", "b": "SMALL", "metric": "val_loss_tier2"}]},
                       "x", LABELS)
