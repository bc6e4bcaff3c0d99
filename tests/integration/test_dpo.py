"""Preference tuning end to end on the tiny model: an SFT champion (month-first dates), then a
drop of preference pairs (asked for day first: chosen "21 March 1948", rejected "March 21,
1948") and a DPO run from the champion's adapter. The reward accuracy on held-out pairs rises
to at least 0.9, the chosen answers gain log-prob over the rejected ones and the candidate wins
the pairs against the champion; the forgetting rule still guards the SFT test set (the tiny
model unlearns month-first answers there too, and is refused for it) until the team accepts
that, and then the gate promotes it. The reference model is never a second copy of the weights."""
from __future__ import annotations

import gc
import re
import pytest
import yaml

from ftpipe.config import LoraConfig, ModelConfig, TrainConfig
from ftpipe.training.recipe import fine_tune
from tests.helpers import TINY, copy_project, dates_rows, make_project, mlflow_client, ok, run_cli, write_rows

pytestmark = pytest.mark.integration
MODEL = "ftpipe-dates"


def day_first_pairs(rows: list[dict]) -> list[dict]:
    """Date questions asked for a day-first answer: chosen "21 March 1948", rejected "March 21, 1948"."""
    out = []
    for r in rows:
        month, day, year = r["output"].replace(",", "").split()
        iso = re.search(r"\d{4}-\d{2}-\d{2}", r["instruction"] + " " + r.get("input", "")).group()
        out.append({"prompt": f"Write {iso} day first.", "chosen": f" {day} {month} {year}",
                    "rejected": f" {month} {day}, {year}"})
    return out


def test_dpo_from_the_champion_learns_the_preference_and_is_promoted(tmp_path, prefect_server, trained):
    project = copy_project(trained.project, tmp_path / "proj")               # v1: the SFT champion
    write_rows(project / "data/incoming/pairs-0001.jsonl", day_first_pairs(dates_rows(900)[300:]))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] |= {"objective": "dpo", "lr": 0.005}
    params["incremental"] |= {"start_from": "champion", "max_steps": 80}
    params["registry"]["promotion"] |= {"primary_metric": "reward_accuracy", "min_improvement": 0.05,
                                        "thresholds": {"reward_accuracy": 0.9}, "min_win_rate": 0.8,
                                        "forgetting_metric": "eval_loss", "max_forgetting": 0.5,
                                        # the tiny model's DPO ends some day-first answers at once (EOS): the
                                        # empty-output check stays on, at a floor this model can meet
                                        "min_non_empty": 0.5}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = ok(run_cli(["run"], project, prefect_server))
    assert "DPO reference: log-probs of" in out and "reward accuracy" in out
    c = mlflow_client(project)
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert "largest eval_loss drop vs champion on an earlier test set" in out, out[-3000:]
    assert "> allowed 0.5" in out
    assert "of preference pairs >= required 80%" in out and "reward_accuracy" in out

    # the new style is what the team wants now: forgetting month-first answers is accepted, and a
    # new candidate (a refused version is never gated again: another beta) goes through the gate
    params["registry"]["promotion"]["max_forgetting"] = None
    params["train"]["dpo"] = {"beta": 0.2, "loss": "sigmoid"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = ok(run_cli(["run"], project, prefect_server))

    champ = c.get_model_version_by_alias(MODEL, "champion")
    assert str(champ.version) == "3", out[-3000:]
    m = c.get_run(champ.run_id).data.metrics
    assert m["candidate_reward_accuracy"] >= 0.9, m
    assert m["candidate_reward_accuracy"] - m["champion_reward_accuracy"] >= 0.3, m
    assert m["candidate_reward_margin"] > m["champion_reward_margin"] + 1.0, m   # log p(chosen) - log p(rejected) rose
    assert m["candidate_pref_accuracy"] >= 0.9 and m["candidate_win_rate"] >= 0.8, m
    assert m["train_reward_accuracy"] >= 0.9
    assert "of preference pairs >= required 80%" in out                       # the win-rate rule


def test_sft_then_dpo_in_one_run_each_stage_logged_and_a_changed_stage_alone_retrains(tmp_path, prefect_server):
    """train.stages: SFT on every row (the pairs' chosen answers too), then DPO on the pairs from
    the SFT stage's adapter, in one run that registers the last stage's weights and gates them.
    Each stage is on the run; changing the DPO stage alone trains only it again."""
    stages = [{"objective": "sft", "max_steps": 120},
              {"objective": "dpo", "max_steps": 60, "lr": 0.005, "dpo": {"beta": 0.2}}]
    project = make_project(tmp_path / "proj", {
        "train.stages": stages,
        "registry.promotion": TINY["registry.promotion"] | {
            "primary_metric": "reward_accuracy", "thresholds": {"reward_accuracy": 0.9}, "min_non_empty": 0.5}})
    write_rows(project / "data/incoming/pairs-0001.jsonl", day_first_pairs(dates_rows(900)[300:]))
    out = ok(run_cli(["run"], project, prefect_server))
    assert "stage 1/2: sft, 120 steps" in out and "stage 2/2: dpo, 60 steps, from stage 1's weights" in out
    assert "continuing the LoRA adapter" in out and "DPO reference: log-probs of" in out
    c = mlflow_client(project)
    champ = c.get_model_version_by_alias(MODEL, "champion")
    run = c.get_run(champ.run_id)
    assert run.data.tags["ftpipe.train_stages"] == "1: sft steps 1-120 -> 2: dpo steps 121-180"
    m = run.data.metrics
    assert m["stage1_steps"] == 120 and m["stage2_steps"] == 60 and m["stage2_val_loss"] < 0.69   # below ln 2
    assert m["candidate_reward_accuracy"] >= 0.9, m
    steps = [p.step for p in c.get_metric_history(run.info.run_id, "train_loss")]
    assert min(steps) <= 20 and max(steps) == 180                           # one step axis, both stages
    assert any(p.step > 120 for p in c.get_metric_history(run.info.run_id, "train_reward_accuracy"))

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["stages"][1]["dpo"]["beta"] = 0.3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = ok(run_cli(["run"], project, prefect_server))
    assert len(re.findall(r"fine-tune-\w+' - Finished in state Cached", out)) == 1, out[-4000:]   # stage 1
    assert "DPO reference: log-probs of" in out                              # stage 2 trained again
    card = c.get_run(c.get_model_version(MODEL, "2").run_id).data.tags["ftpipe.train_stages"]
    assert card == "1: sft steps 1-120 -> 2: dpo steps 121-180"


def test_dpo_continuing_an_adapter_keeps_one_copy_of_the_base_weights(tiny, tmp_path):
    """DPO from a LoRA adapter (the champion's in an incremental run): while it trains, the base
    model's weight matrices exist once in memory (the reference is scored once, before the first
    step, by the same weights)."""
    import torch

    sft = fine_tune(ModelConfig(base=str(tiny / "base")), LoraConfig(r=4, alpha=8),
                    TrainConfig(max_steps=5, batch_size=8, log_every=5, warmup_steps=1, checkpoint_every=0),
                    tiny / "train.jsonl", None, tmp_path / "sft", log=lambda m: None)
    pairs = [p | {"_format": "preference"} for p in day_first_pairs(dates_rows(96))]   # as cleaning writes them
    write_rows(tmp_path / "pairs.jsonl", pairs[:80])
    write_rows(tmp_path / "val.jsonl", pairs[80:])
    seen: list[int] = []

    def mlp_weights() -> set[int]:
        """Storages of the live 128 x 64 matrices: the MLP up/gate projections, 2 per layer, 2 layers."""
        gc.collect()
        return {obj.untyped_storage().data_ptr() for obj in gc.get_objects()
                if isinstance(obj, torch.Tensor) and obj.dim() == 2 and tuple(obj.shape) == (128, 64)}

    before = mlp_weights()       # anything an earlier model left alive in this process

    def copies(step, metrics):
        seen.append(len(mlp_weights() - before))

    res = fine_tune(ModelConfig(base=str(tiny / "base")), LoraConfig(r=4, alpha=8),
                    TrainConfig(objective="dpo", max_steps=6, batch_size=8, log_every=2, warmup_steps=1,
                                lr=0.005, checkpoint_every=0),
                    tmp_path / "pairs.jsonl", tmp_path / "val.jsonl", tmp_path / "dpo", log=(lines := []).append,
                    on_metrics=copies, start_adapter=sft.adapter_dir)
    assert seen and set(seen) == {4}, seen
    assert any("continuing the LoRA adapter" in line for line in lines)
    assert res.steps == 6 and res.val_loss is not None
