"""The promotion decision: a pure function, one reason per rule."""
import math

import pytest

from ftpipe.config import PromotionConfig
from ftpipe.evaluation.metrics import rouge_l, score_predictions, token_f1
from ftpipe.registry.promotion import decide, forgetting

POLICY = PromotionConfig(primary_metric="exact_match", min_improvement=0.01,
                         thresholds={"exact_match": 0.5}, min_gain_over_base=0.0)
OK = {"data_gate": True}
CLEAN = {"non_empty": 1.0, "pii_outputs": 0.0}


def rules(decision):
    return {r.rule: r for r in decision.reasons}


def test_first_model_is_promoted_when_thresholds_hold():
    d = decide({"exact_match": 0.9, "eval_loss": 0.2} | CLEAN, None, {"exact_match": 0.0}, POLICY, OK)
    assert d.promote, d.summary()
    assert rules(d)["beats_champion"].detail == "no champion yet: first model"


def test_refused_when_not_better_than_champion_by_margin():
    d = decide({"exact_match": 0.905} | CLEAN, {"exact_match": 0.9}, {"exact_match": 0.0}, POLICY, OK)
    assert not d.promote
    r = rules(d)["beats_champion"]
    assert not r.passed and "+0.0050" in r.detail and "0.01" in r.detail
    assert d.summary().startswith("refuse: exact_match 0.9050 vs champion 0.9000")


def test_promoted_when_better_by_margin():
    assert decide({"exact_match": 0.95} | CLEAN, {"exact_match": 0.9}, None, POLICY, OK).promote


def test_threshold_and_base_rules():
    d = decide({"exact_match": 0.4} | CLEAN, None, {"exact_match": 0.45}, POLICY, OK)
    r = rules(d)
    assert not d.promote
    assert not r["threshold:exact_match"].passed
    assert not r["beats_base"].passed


def test_lower_is_better_metrics_and_explicit_direction():
    policy = PromotionConfig(primary_metric="eval_loss", min_improvement=0.05, thresholds={"perplexity": 3.0})
    good = decide({"eval_loss": 0.5, "perplexity": 1.6} | CLEAN, {"eval_loss": 0.6}, {"eval_loss": 2.0}, policy, OK)
    assert good.promote, good.summary()
    worse = decide({"eval_loss": 0.7, "perplexity": 2.0} | CLEAN, {"eval_loss": 0.6}, None, policy, OK)
    assert not worse.promote
    too_perplexed = decide({"eval_loss": 0.1, "perplexity": 3.5} | CLEAN, None, None, policy, OK)
    assert not rules(too_perplexed)["threshold:perplexity"].passed
    # a direction set by hand wins over the built-in one
    flipped = PromotionConfig(primary_metric="token_f1", direction="lower", min_improvement=0.0)
    assert decide({"token_f1": 0.2} | CLEAN, {"token_f1": 0.3}, None, flipped, OK).promote


def test_nan_failed_data_gate_and_diverged_training_refuse():
    d = decide({"exact_match": math.nan} | CLEAN, None, None, POLICY, OK)
    assert not rules(d)["check:finite_metrics"].passed and not d.promote
    d = decide({"exact_match": 0.9} | CLEAN, None, None, POLICY, {"data_gate": False})
    assert not rules(d)["check:data_gate"].passed and not d.promote
    d = decide({"exact_match": 0.9} | CLEAN, None, None, POLICY, {"data_gate": True, "train_loss_finite": False})
    assert not d.promote and "train_loss_finite" in rules(d)["check:finite_metrics"].detail


def test_generation_checks_refuse_empty_outputs_and_leaked_pii():
    d = decide({"exact_match": 0.9, "non_empty": 0.97, "pii_outputs": 0.0}, None, None, POLICY, OK)
    assert not d.promote and "97.0% of generations non-empty" in rules(d)["check:non_empty_outputs"].detail
    d = decide({"exact_match": 0.9, "non_empty": 1.0, "pii_outputs": 2.0}, None, None, POLICY, OK)
    assert not d.promote and "2 generations hold PII" in rules(d)["check:no_pii_in_outputs"].detail
    lenient = POLICY.model_copy(update={"required_checks": ["data_gate"]})
    d = decide({"exact_match": 0.9, "non_empty": 1.0, "pii_outputs": 2.0}, None, None, lenient, OK)
    assert d.promote and rules(d)["check:no_pii_in_outputs"].detail.endswith("(not required)")


def test_forgetting_refuses_past_the_limit_and_names_the_set():
    cand = {"v1:aaa": {"exact_match": 0.70}, "v3:bbb": {"exact_match": 0.91}}
    champ = {"v1:aaa": {"exact_match": 0.90}, "v3:bbb": {"exact_match": 0.90}}
    forgot = forgetting(cand, champ, POLICY)
    assert forgot == pytest.approx({"v1:aaa": 0.20, "v3:bbb": 0.0})
    d = decide({"exact_match": 0.95} | CLEAN, {"exact_match": 0.9}, None, POLICY, OK, forgot)
    r = rules(d)["forgetting"]
    assert not d.promote and not r.passed
    assert "0.2000 on v1:aaa (2 sets) > allowed 0.05" in r.detail
    ok = decide({"exact_match": 0.95} | CLEAN, {"exact_match": 0.9}, None, POLICY, OK, {"v1:aaa": 0.01})
    assert ok.promote


def test_why_names_the_deciding_rule_not_the_rules_every_candidate_passes():
    """`ftpipe models` shows why(): the first model, the improvement, or each failed rule."""
    first = decide({"exact_match": 0.9} | CLEAN, None, {"exact_match": 0.0}, POLICY, OK)
    assert first.why() == "no champion yet: first model"
    better = decide({"exact_match": 0.95} | CLEAN, {"exact_match": 0.9}, None, POLICY, OK)
    assert better.why() == "exact_match 0.9500 vs champion 0.9000: improvement +0.0500 >= required 0.01"
    assert len(better.summary()) > 200 and better.why() in better.summary()
    refused = decide({"exact_match": 0.4} | CLEAN, {"exact_match": 0.9}, None, POLICY, OK)
    assert refused.why() == ("exact_match 0.4000 >= 0.5 fails; exact_match 0.4000 vs champion 0.9000: "
                             "improvement -0.5000 < required 0.01")
    assert type(refused).from_dict(refused.as_dict()).why() == refused.why() == refused.as_dict()["why"]


def test_missing_threshold_metric_refuses_and_unknown_metric_is_a_config_error():
    policy = PromotionConfig(thresholds={"slice.dates.rouge_l": 0.3})
    d = decide({"exact_match": 0.9} | CLEAN, None, None, policy, OK)
    assert not d.promote and "not measured" in rules(d)["threshold:slice.dates.rouge_l"].detail
    with pytest.raises(ValueError, match="unknown metric.*bleu"):
        PromotionConfig(thresholds={"bleu": 0.3})


def test_text_metrics():
    assert token_f1("March 21, 1948", "march 21 1948") == 1.0
    assert token_f1("March 21", "March 21, 1948") == pytest.approx(0.8)
    assert token_f1("", "x") == 0.0
    assert rouge_l("March 21 1949", "March 21, 1948") == pytest.approx(2 / 3)
    rows = [{"instruction": "a", "output": "x y", "slice": "s1"}, {"instruction": "b", "output": "z", "slice": "s2"},
            {"instruction": "c", "output": "w", "slice": "s2"}]
    s = score_predictions(rows, ["a", "b", "mail me"], ["x y", "", "write to bob@example.com"],
                          [(2.0, 2), (1.0, 1), (3.0, 1)], "m")
    m = s.metrics()
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["eval_loss"] == pytest.approx(6.0 / 4)            # token-weighted
    assert m["non_empty"] == pytest.approx(2 / 3) and m["pii_outputs"] == 1.0
    assert m["slice.s1.exact_match"] == 1.0 and m["slice.s2.exact_match"] == 0.0
    assert m["slice.s2.eval_loss"] == pytest.approx(2.0) and m["slice.s2.n"] == 2


def test_preference_rules_win_rate_and_reward_thresholds():
    from ftpipe.evaluation.metrics import preference_metrics

    base, champ = [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 2.0]
    cand = [2.0, -0.5, 0.5, 1.0]
    m = preference_metrics(cand, base, champ)
    assert m == {"reward_accuracy": 0.75, "reward_margin": 0.75, "win_rate": (1 + 1 + 0.5 + 0) / 4}
    policy = PromotionConfig(primary_metric="reward_accuracy", min_improvement=0.0, max_forgetting=None,
                             thresholds={"reward_accuracy": 0.9}, min_win_rate=0.6)
    d = decide(m | CLEAN, {"reward_accuracy": 0.75} | CLEAN, None, policy, OK)
    r = rules(d)
    assert not d.promote
    assert not r["threshold:reward_accuracy"].passed and "0.7500 >= 0.9 fails" in r["threshold:reward_accuracy"].detail
    assert r["win_rate"].passed and "62.5% of preference pairs >= required 60%" in r["win_rate"].detail
    d = decide({"exact_match": 1.0} | CLEAN, {"exact_match": 0.5}, None,
               PromotionConfig(min_win_rate=0.5, max_forgetting=None), OK)
    assert not d.promote and "holds no preference pairs" in rules(d)["win_rate"].detail
