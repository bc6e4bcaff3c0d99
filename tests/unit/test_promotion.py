import math

from ftpipe.config import PromotionConfig
from ftpipe.promotion import decide

POLICY = PromotionConfig(primary_metric="exact_match", min_improvement=0.01,
                         thresholds={"exact_match": 0.5}, min_gain_over_base=0.0)
OK = {"data_gate": True}


def rules(decision):
    return {r.rule: r for r in decision.reasons}


def test_first_model_is_promoted_when_thresholds_hold():
    d = decide({"exact_match": 0.9, "eval_loss": 0.2}, None, {"exact_match": 0.0}, POLICY, OK)
    assert d.promote
    assert rules(d)["beats_champion"].detail == "no champion yet: first model"


def test_refused_when_not_better_than_champion_by_margin():
    d = decide({"exact_match": 0.905}, {"exact_match": 0.9}, {"exact_match": 0.0}, POLICY, OK)
    assert not d.promote
    r = rules(d)["beats_champion"]
    assert not r.passed and "+0.0050" in r.detail and "0.01" in r.detail
    assert d.summary().startswith("refuse: exact_match 0.9050 vs champion 0.9000")


def test_promoted_when_better_by_margin():
    assert decide({"exact_match": 0.95}, {"exact_match": 0.9}, None, POLICY, OK).promote


def test_threshold_and_base_rules():
    d = decide({"exact_match": 0.4}, None, {"exact_match": 0.45}, POLICY, OK)
    r = rules(d)
    assert not d.promote
    assert not r["threshold:exact_match"].passed
    assert not r["beats_base"].passed


def test_lower_is_better_metrics():
    policy = PromotionConfig(primary_metric="eval_loss", min_improvement=0.05,
                             thresholds={"perplexity": 3.0})
    good = decide({"eval_loss": 0.5, "perplexity": 1.6}, {"eval_loss": 0.6}, {"eval_loss": 2.0}, policy, OK)
    assert good.promote, good.summary()
    worse = decide({"eval_loss": 0.7, "perplexity": 2.0}, {"eval_loss": 0.6}, None, policy, OK)
    assert not worse.promote
    too_perplexed = decide({"eval_loss": 0.1, "perplexity": 3.5}, None, None, policy, OK)
    assert not rules(too_perplexed)["threshold:perplexity"].passed


def test_nan_and_failed_data_gate_refuse():
    d = decide({"exact_match": math.nan}, None, None, POLICY, OK)
    assert not rules(d)["finite_metrics"].passed and not d.promote
    d = decide({"exact_match": 0.9}, None, None, POLICY, {"data_gate": False})
    assert not rules(d)["data_gate"].passed and not d.promote


def test_missing_threshold_metric_refuses():
    policy = PromotionConfig(thresholds={"rouge_l": 0.3})
    d = decide({"exact_match": 0.9}, None, None, policy, OK)
    assert not d.promote and "not measured" in rules(d)["threshold:rouge_l"].detail


def test_every_check_becomes_a_rule():
    d = decide({"exact_match": 0.9}, None, None, POLICY,
               {"data_gate": True, "train_loss_finite": False})
    assert not d.promote
    assert rules(d)["check:train_loss_finite"].detail == "train_loss_finite: FAILED"
