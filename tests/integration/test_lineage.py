"""Lineage audits on a real project (git, DVC with a local remote, MLflow, Prefect, GX):
three data versions (the default source; + a drop; the drop swapped for another), then
`ftpipe lineage` verifies each link and names every broken one, `ftpipe data restore`
writes the exact bytes of the first version, and the reverse queries find exactly the
versions that used a source file or a row."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.helpers import ok, ok_json, REPO, make_project, mlflow_client, run_cli

MODEL = "ftpipe-dates"
SPLITS = ("train", "validation", "test")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()



@pytest.fixture(scope="module")
def lp(tmp_path_factory, prefect_server):
    """The project after three runs, and the bytes of the first version's splits."""
    project = make_project(tmp_path_factory.mktemp("lineage"), shared_cache=False)   # it corrupts cache objects
    drops = (REPO / "data/drops/drop-0002.jsonl").read_text().splitlines(keepends=True)
    # 30 steps (seconds): the model answers at all, so the gate has a champion to compare with
    ok(run_cli(["run", "train.max_steps=30"], project, prefect_server))
    first = {n: _sha(project / f"data/splits/{n}.jsonl") for n in SPLITS}
    (project / "data/incoming/drop-a.jsonl").write_text("".join(drops[:150]))
    ok(run_cli(["run", "train.max_steps=30"], project, prefect_server))
    (project / "data/incoming/drop-a.jsonl").unlink()
    (project / "data/incoming/drop-b.jsonl").write_text("".join(drops[150:300]))
    ok(run_cli(["run", "train.max_steps=30"], project, prefect_server))
    return {"project": project, "first": first, "env": prefect_server}


def _lineage(lp, *args):
    return run_cli(["lineage", *args], lp["project"], lp["env"])


def test_whole_chain_verifies_as_tree_json_and_report(lp):
    project = lp["project"]
    out = ok(_lineage(lp, f"models:/{MODEL}/3"))
    for part in ("git ", "config: ", "collect:data/collected", "clean:data/cleaned", "split:data/splits",
                 "raw_validation", "cleaned_validation", "data/incoming/drop-b.jsonl", "data/sources/dates.jsonl",
                 "quarantine:", "Prefect flow run", "lineage verified"):
        assert part in out, part
    assert "BROKEN" not in out

    doc = ok_json(_lineage(lp, f"models:/{MODEL}@challenger", "--json"))
    assert doc["ok"] and doc["broken"] == [] and doc["model"]["version"] == "3"
    assert doc["record"] == "immutable run record"
    lock = __import__("yaml").safe_load((project / "dvc.lock").read_text())["stages"]
    assert {d["key"]: d["md5"] for d in doc["data"]} == {
        f"{s}:{lock[s]['outs'][0]['path']}": lock[s]["outs"][0]["md5"] for s in ("collect", "clean", "split")}
    assert all(d["in_cache"] == d["objects"] == d["in_remote"] for d in doc["data"])
    assert {s["path"] for s in doc["sources"]} == {"data/sources/dates.jsonl", "data/incoming/drop-b.jsonl"}
    assert doc["gx"]["raw_validation"]["success"] and doc["gx"]["cleaned_validation"]["success"]
    assert doc["quarantine"]["read"] == doc["quarantine"]["kept"] + doc["quarantine"]["quarantined"]
    assert doc["prefect_flow_run"]["found"] is True and "Completed" in doc["prefect_flow_run"]["state"]

    run_id = mlflow_client(project).get_model_version(MODEL, "1").run_id
    by_run = ok_json(_lineage(lp, run_id, "--json", "--report", str(project / "audit.html")))
    assert by_run["model"]["version"] == "1" and by_run["ok"]
    page = (project / "audit.html").read_text()
    assert "Chain whole" in page and run_id in page and "dates.jsonl" in page
    assert "<script" not in page and "<link" not in page and "src=" not in page   # self-contained

    bad = _lineage(lp, f"models:/{MODEL}/99")
    assert bad.returncode == 2 and f"{MODEL}" in bad.stderr


def test_restore_writes_the_first_versions_bytes_after_two_later_versions(lp, tmp_path):
    project = lp["project"]
    now = {n: _sha(project / f"data/splits/{n}.jsonl") for n in SPLITS}
    assert now != lp["first"]                                  # data/ has moved on
    out = ok(run_cli(["data", "restore", f"models:/{MODEL}/1", "--to", str(tmp_path / "v1")], project))
    assert "re-hashed" in out
    assert {n: _sha(tmp_path / "v1" / f"{n}.jsonl") for n in SPLITS} == lp["first"]
    ok(run_cli(["data", "restore", f"models:/{MODEL}/2", "--to", str(tmp_path / "v2all"), "--all"], project))
    assert (tmp_path / "v2all/data/collected/snapshot.jsonl").is_file()
    assert (tmp_path / "v2all/data/splits/train.jsonl").is_file()
    refused = run_cli(["data", "restore", f"models:/{MODEL}/1", "--to", str(tmp_path / "v1")], project)
    assert refused.returncode == 2 and "not empty" in refused.stderr


def test_reverse_queries_find_exactly_the_versions_that_used_a_source_or_row(lp, tmp_path):
    from ftpipe.lineage import queries

    project = lp["project"]
    client = mlflow_client(project)
    doc = ok_json(_lineage(lp, "--source", "data/incoming/drop-a.jsonl", "--json"))
    assert [h["version"] for h in doc["versions"]] == ["2"]                # gone from disk: by recorded path

    def by_source(path):
        return sorted(h["version"] for h in queries.versions_with_source(client, project, path))

    assert by_source("data/incoming/drop-b.jsonl") == ["3"]
    assert by_source("data/sources/dates.jsonl") == ["1", "2", "3"]
    copy = tmp_path / "renamed.jsonl"                                      # the same bytes elsewhere: by content
    shutil.copy(project / "data/incoming/drop-b.jsonl", copy)
    assert by_source(str(copy)) == ["3"]
    assert by_source("data/incoming/never-there.jsonl") == []

    ok(run_cli(["data", "restore", f"models:/{MODEL}/2", "--to", str(tmp_path / "v2")], project))
    rows = [json.loads(x) | {"__split": n} for n in SPLITS
            for x in (tmp_path / "v2" / f"{n}.jsonl").read_text().splitlines()]
    from_drop = next(r for r in rows if r["_source"] == "data/incoming/drop-a.jsonl")
    from_dates = next(r for r in rows if r["_source"] == "data/sources/dates.jsonl")
    by_row = lambda h: sorted(x["version"] for x in queries.versions_with_row(client, project, h))  # noqa: E731
    assert by_row(from_dates["_hash"]) == ["1", "2", "3"]
    assert by_row("0" * 64) == []
    text = ok(_lineage(lp, "--row-hash", from_drop["_hash"]))
    assert f"1 model version(s) saw row {from_drop['_hash']}:\n  {MODEL} v2" in text
    assert ("trained on it" if from_drop["__split"] == "train" else "evaluated on, not trained on") in text


def test_a_version_carries_few_tags_and_the_record_holds_the_rest(lp):
    """The registry page stays readable: a version's tags are the few people filter on (and
    the code queries); every other fact of its registration is in its immutable record."""
    from ftpipe.lineage import record as lrec

    client = mlflow_client(lp["project"])
    tags = client.get_model_version(MODEL, "3").tags
    assert {k for k in tags if not k.startswith(("ftpipe.decision", "ftpipe.champion", "ftpipe.forgetting"))} == {
        "ftpipe.method", "ftpipe.candidate", "ftpipe.config_hash", "ftpipe.dvc.split:data/splits",
        "ftpipe.base_model", "ftpipe.base_model_revision", "ftpipe.start_from", "ftpipe.test_set",
        "ftpipe.metric.eval_loss"}                                         # eval_loss: the primary metric
    assert len(tags) <= 15, sorted(tags)
    record = lrec.recorded_lineage(client, lrec.resolve(client, f"models:/{MODEL}/3"))[0]
    assert {k: record[k] for k in tags if k in record} == {k: v for k, v in tags.items() if k in record}
    assert {"ftpipe.git_commit", "ftpipe.gx_verdict", "ftpipe.prefect_flow_run", "ftpipe.dvc.collect:data/collected",
            "ftpipe.dvc.clean:data/cleaned", "ftpipe.source.data/incoming/drop-b.jsonl",
            "ftpipe.metric.exact_match"} <= set(record)


def test_models_names_each_test_set_and_the_rule_that_decided(lp):
    """`ftpipe models` after three data versions: each score on its named test set beside the
    champion's on the same set, "why" the deciding rule."""
    from ftpipe.registry.promotion import Decision

    project = lp["project"]
    doc = ok_json(run_cli(["models", "--json"], project))
    rows = {r["version"]: r for r in doc["versions"]}
    assert sorted(rows) == ["1", "2", "3"]
    assert rows["1"]["test_set"] == f"v1:{lp['first']['test'][:12]}"      # data/splits/test.jsonl of run 1
    for v, r in rows.items():                                              # a new data version, a new test set
        assert r["test_set"] == f"v{v}:{r['test_set_sha256'][:12]}" and isinstance(r["eval_loss"], float)
    assert rows["1"]["why"] == "no champion yet: first model" and rows["1"]["champion_compared"] is None
    assert "all metrics finite" in rows["1"]["summary"]                    # --json keeps the whole decision
    for r in (rows["2"], rows["3"]):
        decision = Decision.from_dict({"promote": r["decision"] == "promote", "reasons": r["reasons"]})
        beats = next(x for x in decision.reasons if x.rule == "beats_champion")
        assert r["champion_compared"] in ("1", "2")                        # the champion then, on the same set:
        assert f"vs champion {r['champion_eval_loss']:.4f}" in beats.detail
        assert r["why"] == (beats.detail if decision.promote else
                            "; ".join(x.detail for x in decision.reasons if not x.passed))

    wide = ok(run_cli(["models"], project))                               # COLUMNS=200
    for part in ("test set", "vs champion", rows["2"]["test_set"], f"v1 {rows['2']['champion_eval_loss']:.4f}",
                 "no champion yet: first model", rows["3"]["why"][:40]):
        assert part in wide, part
    narrow = ok(run_cli(["models"], project, {"COLUMNS": "100"}))
    assert max(len(line) for line in narrow.splitlines()) <= 100
    assert rows["3"]["test_set"] in narrow and "v1 why: no champion yet: first model" in narrow


def test_promote_refuses_an_unknown_version_or_a_non_number_in_one_line(lp):
    project = lp["project"]
    unknown = run_cli(["promote", "999", "--reason", "x"], project)
    assert unknown.returncode == 1 and unknown.stderr.strip() == f"error: {MODEL} has no version 999 (versions: 1, 2, 3)"
    bad = run_cli(["promote", "abc", "--reason", "x"], project)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: 'abc' is not a version number (e.g. 3 or v3; `ftpipe models` lists them)")


def test_each_broken_link_is_named_and_nothing_else(lp, tmp_path, monkeypatch):
    from ftpipe.data import versions
    from ftpipe.lineage import audit
    from ftpipe.lineage import record as lrec

    project = lp["project"]
    client = mlflow_client(project)
    for k, v in lp["env"].items():
        monkeypatch.setenv(k, v)

    def _broken(version="1"):   # the audit in-process; the CLI's exit code and stderr checked once, below
        res = audit.audit(client, project, f"models:/{MODEL}/{version}")
        assert not res.ok
        return "\n".join(f"BROKEN {link.name}: {link.detail}" for link in res.broken)

    tags = client.get_model_version(MODEL, "1").tags
    record = lrec.recorded_lineage(client, lrec.resolve(client, f"models:/{MODEL}/1"))[0]
    splits_md5 = tags["ftpipe.dvc.split:data/splits"]
    listing_of = lambda md5: json.loads((project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())  # noqa: E731
    obj = lambda base, md5: project / base / "files/md5" / md5[:2] / md5[2:]  # noqa: E731

    # 1. a tampered cache object
    train_md5 = next(e["md5"] for e in listing_of(splits_md5) if e["relpath"] == "train.jsonl")
    cached = obj(".dvc/cache", train_md5)
    original = cached.read_bytes()
    os.chmod(cached, stat.S_IWUSR | stat.S_IRUSR)
    cached.write_bytes(original.replace(b"March", b"Marhc", 1))
    proc = _lineage(lp, f"models:/{MODEL}/1")
    assert proc.returncode == 1 and "BROKEN data split:data/splits" in proc.stderr
    err = _broken()
    assert "data split:data/splits: cache object for train.jsonl re-hashes to" in err
    assert err.count("BROKEN") == 1
    # the remote still holds the true bytes: restore takes them from there
    ok(run_cli(["data", "restore", f"models:/{MODEL}/1", "--to", str(tmp_path / "r")], project))
    assert _sha(tmp_path / "r/train.jsonl") == lp["first"]["train"]

    # ... and with the remote copy gone too, restore fails naming the file, writing nothing
    remote_train = obj("dvc-remote", train_md5)
    hidden = remote_train.rename(tmp_path / "remote-train")
    failed = run_cli(["data", "restore", f"models:/{MODEL}/1", "--to", str(tmp_path / "half")], project)
    assert failed.returncode == 1 and f"train.jsonl ({train_md5})" in failed.stderr
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half.*"))
    hidden.rename(remote_train)
    cached.write_bytes(original)

    # 2. a deleted remote object
    collect_md5 = record["ftpipe.dvc.collect:data/collected"]       # in the record only, not a tag
    snap_md5 = next(e["md5"] for e in listing_of(collect_md5) if e["relpath"] == "snapshot.jsonl")
    remote = obj("dvc-remote", snap_md5)
    moved = remote.rename(tmp_path / "remote-object")
    err = _broken()
    assert f"data collect:data/collected: snapshot.jsonl ({snap_md5}) is missing from remote 'local'" in err
    assert err.count("BROKEN") == 1
    moved.rename(remote)

    # 3. a changed source file
    src = project / "data/sources/dates.jsonl"
    before = src.read_bytes()
    src.write_bytes(before + b'{"instruction": "Convert 2001-01-01 to words.", "input": "", "output": "January 1, 2001"}\n')
    err = _broken()
    assert "source data/sources/dates.jsonl: changed since training" in err and err.count("BROKEN") == 1
    src.write_bytes(before)

    # 4. a rewritten tag: named, and the audit keeps to the immutable record
    other = client.get_model_version(MODEL, "3").tags["ftpipe.dvc.split:data/splits"]
    client.set_model_version_tag(MODEL, "1", "ftpipe.dvc.split:data/splits", other)
    err = _broken()
    assert (f"tag ftpipe.dvc.split:data/splits on {MODEL} v1 was rewritten: recorded '{splits_md5}', "
            f"now '{other}'") in err and err.count("BROKEN") == 1
    restored = tmp_path / "after-rewrite"
    store = versions.Store(project)
    try:
        versions.restore_output(store, lrec.recorded_lineage(client, lrec.resolve(client, f"models:/{MODEL}/1"))[0]
                             ["ftpipe.dvc.split:data/splits"], restored)
    finally:
        store.close()
    assert _sha(restored / "train.jsonl") == lp["first"]["train"]
    client.set_model_version_tag(MODEL, "1", "ftpipe.dvc.split:data/splits", splits_md5)

    # 5. a removed tag, and a lineage tag added that the record never held
    client.delete_model_version_tag(MODEL, "1", "ftpipe.config_hash")
    client.set_model_version_tag(MODEL, "1", "ftpipe.source.data/sources/other.jsonl", "sha256:00 rows:1")
    err = _broken()
    assert f"tag ftpipe.config_hash on {MODEL} v1 was removed: recorded '{tags['ftpipe.config_hash']}'" in err
    assert f"tag ftpipe.source.data/sources/other.jsonl on {MODEL} v1 was added after registration" in err
    assert err.count("BROKEN") == 1                                       # one link: the record vs the tags
    client.set_model_version_tag(MODEL, "1", "ftpipe.config_hash", tags["ftpipe.config_hash"])
    client.delete_model_version_tag(MODEL, "1", "ftpipe.source.data/sources/other.jsonl")

    assert audit.audit(client, project, f"models:/{MODEL}/1").ok          # every repair: whole again
