"""One 'run' of the gate against a tracking server, as its own process: evaluate a
candidate, register it, wait for the starting gun, then go through the promotion gate.
Used by test_registry_server.py to race two flows against one champion."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ftpipe.registry import gate as gate

from ftpipe.registry import store as registry
from ftpipe.config import EvalConfig, ModelConfig, RegistryConfig
from ftpipe.evaluation.compare import evaluate_all, log_evaluation
from ftpipe.names import TEST_SET as TEST_SET_TAG


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    reg = RegistryConfig(**spec["registry"])
    ev = EvalConfig(**spec["eval"])
    root = Path(spec["root"])
    registry.setup(reg, root)
    c = registry.client()
    exp = c.get_experiment_by_name(reg.experiment).experiment_id
    run_id = c.create_run(exp, run_name=spec["label"]).info.run_id
    report = evaluate_all(ev, ModelConfig(base=spec["base"]), reg, spec["base"], spec["candidate"],
                               spec["test"], 128, root / "regression", log=lambda m: None)
    log_evaluation(run_id, report, root / f"eval-{spec['label']}")
    v = registry.log_model(run_id, spec["candidate"], reg.model_name)
    registry.tag_version(reg.model_name, v.version, {TEST_SET_TAG: report.test_sha} | {
        f"ftpipe.metric.{k}": f"{val:.6g}" for k, val in report.candidate.metrics().items() if "." not in k})
    Path(spec["ready"]).write_text(v.version)
    while not Path(spec["go"]).exists():          # both evaluated against the same champion
        time.sleep(0.05)
    result = gate.gate_and_promote(reg, ev, run_id, v.version, report, {"data_gate": True}, 128,
                                   root / "regression", log=lambda m: print(m, flush=True))
    c.set_terminated(run_id)
    Path(spec["out"]).write_text(json.dumps({
        "version": v.version, "promote": result.decision.promote, "redecided": result.redecided,
        "compared": result.champion_before, "after": result.champion_after,
        "eval_loss": report.candidate.eval_loss, "summary": result.decision.summary()}))


if __name__ == "__main__":
    main(sys.argv[1])
