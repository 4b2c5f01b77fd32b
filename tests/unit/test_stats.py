import math

import pytest
from scipy import stats as sps

from hetero_testnet.experiments.stats import holm, mean_ci, paired, welch


def test_mean_ci_against_hand_values():
    # [1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.302653 (any t table), half = 4.302653 / sqrt(3)
    m = mean_ci([1.0, 2.0, 3.0])
    assert m.n == 3
    assert m.mean == pytest.approx(2.0)
    assert m.std == pytest.approx(1.0)
    assert m.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (m.low, m.high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), rel=1e-6)


def test_mean_ci_two_values_uses_t_with_one_df():
    # t(0.975, 1) = 12.706205; s of [7.9, 8.1] = 0.141421; half = 12.706205 * 0.141421 / sqrt(2) = 1.270620
    m = mean_ci([7.9, 8.1])
    assert m.half_width == pytest.approx(1.2706205, rel=1e-6)


def test_mean_ci_n1_has_no_interval_and_n0_no_mean():
    one = mean_ci([8.1])
    assert (one.n, one.mean, one.std, one.half_width, one.low) == (1, 8.1, None, None, None)
    none = mean_ci([None, None])
    assert (none.n, none.mean, none.half_width) == (0, None, None)


def test_mean_ci_drops_missing_but_keeps_nan():
    assert mean_ci([1.0, None, 3.0]).n == 2
    m = mean_ci([1.0, float("nan"), 3.0])
    assert m.n == 3 and math.isnan(m.mean)
    assert m.to_dict()["mean"] is None  # JSON-safe


def test_welch_matches_scipy():
    x = [7.97, 8.02, 7.91]
    base = [8.10, 8.14, 8.05, 8.12]
    c = welch(x, base)
    ref = sps.ttest_ind(x, base, equal_var=False)
    assert c.t == pytest.approx(ref.statistic, rel=1e-9)
    assert c.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert c.df == pytest.approx(ref.df, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert c.diff == pytest.approx(sum(x) / 3 - sum(base) / 4)
    assert c.significant() is True


def test_welch_hand_computed_df():
    # x: mean 2, var 1, n 3 -> 1/3; y: mean 5, var 4, n 3 -> 4/3; se^2 = 5/3
    # df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = (25/9) / (17/18) = 50/17
    c = welch([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert c.df == pytest.approx(50 / 17)
    assert c.t == pytest.approx(-3.0 / math.sqrt(5 / 3))
    assert c.p == pytest.approx(2 * sps.t.sf(3.0 / math.sqrt(5 / 3), 50 / 17))


def test_welch_not_applicable_cases():
    c = welch([8.0], [8.1, 8.2])
    assert c.p is None and c.significant() is None and "n >= 2" in c.reason
    assert c.diff == pytest.approx(8.0 - 8.15)  # the difference itself is still reported
    same = welch([1.0, 1.0], [2.0, 2.0])
    assert same.p is None and "spread" in same.reason
    nan = welch([1.0, float("nan")], [2.0, 2.5])
    assert nan.p is None and "NaN" in nan.reason


def test_welch_identical_groups_not_significant():
    c = welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert c.p == pytest.approx(1.0) and c.significant() is False


def test_holm():
    # p = [0.01, 0.04, 0.03] -> sorted 0.01*3=0.03, 0.03*2=0.06, max(0.06, 0.04*1)=0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([None, 0.5]) == [None, 0.5]
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_paired_matches_scipy_and_uses_only_common_seeds():
    x = {1: 7.02, 2: 6.98, 3: 6.99, 9: 5.0}          # seed 9 has no partner: left out
    base = {1: 6.96, 2: 6.95, 3: 6.95, 4: 1.0}
    c = paired(x, base)
    ref = sps.ttest_rel([7.02, 6.98, 6.99], [6.96, 6.95, 6.95])
    assert c.n_x == c.n_baseline == 3 and c.df == 2
    assert c.t == pytest.approx(ref.statistic, rel=1e-9) and c.p == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert c.diff == pytest.approx((0.06 + 0.03 + 0.04) / 3)


def test_paired_is_more_powerful_than_welch_when_seeds_share_variation():
    base = {1: 6.0, 2: 7.0, 3: 8.0}
    x = {s: v + 0.1 + 0.01 * s for s, v in base.items()}   # a small shift on top of a large seed effect
    assert paired(x, base).p < 0.05
    assert welch(list(x.values()), list(base.values())).p > 0.5


def test_paired_not_applicable_cases():
    assert "have 1 in common" in paired({1: 1.0, 2: 2.0}, {1: 1.5, 3: 2.0}).reason
    assert paired({1: 1.0, 2: None}, {1: 1.5, 2: 2.0}).p is None
    assert "same amount" in paired({1: 2.0, 2: 3.0}, {1: 1.0, 2: 2.0}).reason
    assert "NaN" in paired({1: float("nan"), 2: 3.0}, {1: 1.0, 2: 2.0}).reason
