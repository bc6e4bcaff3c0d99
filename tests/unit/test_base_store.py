"""Registering a version hashes its base's files; a base that has not changed since this
machine last hashed it is not read again (a 16 GB base took ~6 s of each registration)."""
from __future__ import annotations

import json
import os
import time

from ftpipe.files import sha256_path
from ftpipe.registry import bases


def test_registration_remembers_an_unchanged_bases_hashes_and_rehashes_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FTPIPE_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(os.urandom(1 << 16))
    (base / "config.json").write_text("{}")
    want = bases.base_files(base)
    assert bases.base_files(base, remembered=True) == want
    memo_file = tmp_path / "cache" / "bases" / "hashes.json"
    memo = json.loads(memo_file.read_text())
    assert sorted(v[3] for v in memo.values()) == sorted(want.values())

    # an unchanged file is answered from the memo, not read (the memo's word is taken)
    key = str((base / "config.json").resolve())
    memo[key][3] = "f" * 64
    memo_file.write_text(json.dumps(memo))
    assert bases.base_files(base, remembered=True)["config.json"] == "f" * 64
    assert bases.base_files(base)["config.json"] == want["config.json"]   # checks never trust it

    # a file rewritten with other bytes of the same size is hashed again
    time.sleep(0.05)
    (base / "model.safetensors").write_bytes(os.urandom(1 << 16))
    got = bases.base_files(base, remembered=True)
    assert got["model.safetensors"] == sha256_path(base / "model.safetensors") != want["model.safetensors"]
