"""A corrupt checkpoint is detected (checksums), named in the log, and the previous one is
used: the resumed run still ends on the uninterrupted run's loss curve."""
from __future__ import annotations

import json

import pytest

from ftpipe.training.recipe import fine_tune
from tests.helpers import QUIET, engine_cfg, killed_after_step, losses, run_spec


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(tiny, tmp_path, damage):
    m, lo, t = engine_cfg(tiny, max_steps=30, checkpoint_every=5, log_every=5, keep_checkpoints=3)
    reference = fine_tune(m, lo, t, tiny / "train.jsonl", tiny / "val.jsonl", tmp_path / "ref", **QUIET)
    out, spec = killed_after_step(tiny, tmp_path / "run", m, lo, t)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    weights = newest / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flipped":          # one byte of one tensor: still loads, silently wrong without a checksum
        data[-9] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:                            # a write cut short
        weights.write_bytes(bytes(data[: len(data) // 2]))
    again = run_spec(spec)
    text = again.communicate(timeout=300)[0]
    assert again.returncode == 0, text
    assert f"checkpoint {newest} is corrupt (trainable.safetensors does not match its checksum)" in text
    assert not (out / "checkpoints").exists()                   # finished: cleaned up
    res = json.loads((out / "train_result.json").read_text())
    assert res["resumed_from"] == int(newest.name.split("-")[1]) - 5   # the one before the corrupt one
    used = newest.parent / f"step-{res['resumed_from']:07d}"
    assert f"resuming from {used} (step {res['resumed_from']}/30)" in text
    assert [l for _, l in res["loss_history"]] == pytest.approx(losses(reference), rel=1e-5)
