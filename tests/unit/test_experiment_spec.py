"""The experiment file: what it expands to, and the one-line errors for every kind of bad input."""

from pathlib import Path

import pytest

from hetero_testnet.errors import ConfigError
from hetero_testnet.experiments.derived import build_derived_config
from hetero_testnet.experiments.spec import DEFAULT_REPORT, expand, load_experiment, load_report_notes

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"

GOOD = f"""
name: demo
base_config: {TINY}
steps: 6
eval_every: 3
eval_tiers: [1]
seeds: [1, 2]
deadlines: {{max_round_train_time: 30}}
report: {{last_k: 2, baseline: a}}
configurations:
  - {{label: a, tiers: [0, 0]}}
  - {{label: b, tiers: [0, 1, 1], helper_fractions: [0.5], sync: none, seeds: [7]}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_a_good_file_expands_to_every_configuration_and_seed(tmp_path):
    spec = load_experiment(_write(tmp_path, GOOD))
    runs = expand(spec)
    assert [r.name for r in runs] == ["a-seed1", "a-seed2", "b-seed7"]
    b = spec.configuration("b")
    assert b.helper_fractions == (0.5, 0.5, 0.5) and b.sync == "none" and b.num_clients == 3
    assert [r.name for r in expand(spec, only=["*-seed2", "b"])] == ["a-seed2", "b-seed7"]
    assert spec.base_config == TINY
    cfg = build_derived_config(spec)
    assert cfg.timing.total_steps == 6 and cfg.timing.max_round_train_time == 30
    assert cfg.data.eval_every == 3 and 1 in cfg.data.eval_tiers


@pytest.mark.parametrize("change, needle", [
    (("label: a,", "label: ../a,"), "must be letters, digits"),
    (("label: b,", "label: a,"), "labels must be unique (repeated: a)"),
    (("baseline: a", "baseline: zzz"), "report.baseline 'zzz' is not a configuration label"),
    (("tiers: [0, 0]", "tiers: [0, 12]"), "uses tier 12, which leaves no FFN neurons"),
    (("tiers: [0, 0]", "tiers: []"), "tiers must be a non-empty list"),
    (("helper_fractions: [0.5]", "helper_fractions: [1.5]"), "helper_fractions must be numbers in [0, 1]"),
    (("sync: none", "sync: sometimes"), "sync must be one of allreduce, none"),
    (("steps: 6", "steps: 0"), "steps must be >= 1"),
    (("max_round_train_time: 30", "round_timeout: 30"), "deadlines"),
    (("name: demo", "name: a/b"), "name 'a/b' must be letters"),
    (("report: {last_k: 2", "report: {last_k: 0"), "report.last_k must be >= 1"),
    (("report: {last_k: 2", "report: {notes: [1, 2], last_k: 2"), "notes must be a list of non-empty strings"),
])
def test_bad_input_is_one_clear_error(tmp_path, change, needle):
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, GOOD.replace(old, new)))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read experiment file"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="malformed experiment file"):
        load_experiment(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_experiment(_write(tmp_path, "- just\n- a list\n"))


def test_only_that_matches_nothing_is_an_error(tmp_path):
    spec = load_experiment(_write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match="matches no run"):
        expand(spec, only=["nope-*"])


def test_the_committed_experiment_files_load():
    for path in sorted((ROOT / "configs" / "experiments").glob("*.yaml")):
        assert expand(load_experiment(path)), path


def test_report_notes_are_statements_and_defaults_are_the_reports(tmp_path):
    text = GOOD.replace("report: {last_k: 2, baseline: a}", """report:
  baseline: a
  notes:
    - >-
      The published number was
      a single run.
    - "  Second.  "
""")
    spec = load_experiment(_write(tmp_path, text))
    assert spec.report.notes == ("The published number was a single run.", "Second.")
    assert (spec.report.last_k, spec.report.grad_norm_threshold) == (DEFAULT_REPORT.last_k,
                                                                     DEFAULT_REPORT.grad_norm_threshold)
    assert load_report_notes(tmp_path / "exp.yaml") == spec.report.notes
    assert load_report_notes(tmp_path / "missing.yaml") == ()
    assert load_experiment(_write(tmp_path, GOOD)).report.notes == ()


def test_global_batch_order_and_analysis(tmp_path):
    text = GOOD.replace("  - {label: a, tiers: [0, 0]}", "  - {label: a, tiers: [0, 0], global_batch: 5}").replace(
        "seeds: [7]", "seeds: [1]") + \
        "order: seed\nanalysis:\n  delta: 0.02\n  comparisons: [{name: a-b, a: a, b: b}]\n" \
        "  verdicts: [{verdict: v, any: [a-b worse]}]\n"
    spec = load_experiment(_write(tmp_path, text))
    runs = expand(spec)
    assert spec.order == "seed" and [r.name for r in runs] == ["a-seed1", "b-seed1", "a-seed2"]
    a = next(r for r in runs if r.label == "a")
    assert a.global_batch == 5 and a.to_dict()["global_batch"] == 5
    b = next(r for r in runs if r.label == "b")
    assert "global_batch" not in b.to_dict()            # identities recorded before the field still match
    assert spec.analysis.comparisons[0].a == "a" and spec.analysis.metric == "val_loss_tier0"
    from hetero_testnet.experiments.derived import with_global_batch
    cfg = with_global_batch(build_derived_config(spec), 5)
    assert (cfg.timing.global_batch_size_start, cfg.timing.global_batch_size_end) == (5, 5)


@pytest.mark.parametrize("extra, needle", [
    ("order: random\n", "order must be configuration or seed"),
    ("analysis:\n  delta: 0.02\n  comparisons: [{name: x, a: a, b: zz}]\n  verdicts: [{verdict: v, any: [x worse]}]\n",
     "analysis.comparisons[0]: 'zz' is not a configuration label"),
])
def test_bad_order_and_analysis_are_one_line(tmp_path, extra, needle):
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, GOOD + extra))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_global_batch_below_the_client_count_is_an_error(tmp_path):
    text = GOOD.replace("  - {label: a, tiers: [0, 0]}", "  - {label: a, tiers: [0, 0], global_batch: 1}")
    with pytest.raises(ConfigError, match="global_batch must be >= the number of clients"):
        load_experiment(_write(tmp_path, text))
