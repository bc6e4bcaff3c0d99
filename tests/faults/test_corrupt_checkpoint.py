"""A corrupt checkpoint is detected (checksums), named in the log, and the previous one is
used: the resumed run still ends on the uninterrupted run's loss curve."""
from __future__ import annotations

import json
import signal
import time

import pytest

from ftpipe.launch import write_spec
from ftpipe.training import fine_tune
from tests.integration.test_training_engine import QUIET, _cfg, _losses, _run_spec, tiny  # noqa: F401


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(tiny, tmp_path, damage):  # noqa: F811
    m, lo, t = _cfg(tiny, max_steps=30, checkpoint_every=5, log_every=5, keep_checkpoints=3)
    reference = fine_tune(m, lo, t, tiny / "train.jsonl", tiny / "val.jsonl", tmp_path / "ref", **QUIET)
    out = tmp_path / "run"
    out.mkdir()
    spec = write_spec(out / "spec.json", m, lo, t, str(tiny / "train.jsonl"), str(tiny / "val.jsonl"), str(out))
    proc = _run_spec(spec)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-0000015").is_dir():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    weights = newest / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flipped":          # one byte of one tensor: still loads, silently wrong without a checksum
        data[-9] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:                            # a write cut short
        weights.write_bytes(bytes(data[: len(data) // 2]))
    again = _run_spec(spec)
    text = again.communicate(timeout=300)[0]
    assert again.returncode == 0, text
    assert f"checkpoint {newest} is corrupt (trainable.safetensors does not match its checksum)" in text
    assert not (out / "checkpoints").exists()                   # finished: cleaned up
    res = json.loads((out / "train_result.json").read_text())
    assert res["resumed_from"] == int(newest.name.split("-")[1]) - 5   # the one before the corrupt one
    used = newest.parent / f"step-{res['resumed_from']:07d}"
    assert f"resuming from {used} (step {res['resumed_from']}/30)" in text
    assert [l for _, l in res["loss_history"]] == pytest.approx(_losses(reference), rel=1e-5)
