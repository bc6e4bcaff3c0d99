"""The feedback loop end to end on the tiny model, every piece real: `ftpipe run` makes v1;
`ftpipe serve` answers and records; corrections and preferences posted over HTTP; `ftpipe
feedback export` writes the corrections as a drop; the served scheduled deployment (Prefect)
exports the preferences itself before collecting, retrains from the champion on them and the
gate decides; lineage links the new version to each request, both ways."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
import yaml

from tests.helpers import copy_project, free_port, mlflow_client, ok, ok_json, run_cli, start_cli, stop, wait_http
from tests.integration.test_incremental import serving
from tests.integration.test_serving import post

pytestmark = pytest.mark.integration
MODEL = "ftpipe-dates"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained):
    """The session's trained project (v1, the champion), copied, with this loop's settings."""
    return copy_project(trained.project, tmp_path_factory.mktemp("loop") / "p", {
        "incremental": {"start_from": "champion", "replay_ratio": 0.5, "max_steps": 40},
        "schedule": {"min_new_rows": 10}, "serve": {"max_new_tokens": 12}})


def test_served_feedback_trains_the_next_scheduled_version_with_lineage_to_each_request(project, prefect_server):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    served = start_cli(["serve", "--port", str(port)], project, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 180, served)
        # 16 questions the data never held, each corrected with the right answer
        corrected = []
        for i in range(16):
            year, month, day = 2101 + i, 1 + i % 9, 10 + i
            code, got, _ = post(f"{url}/v1/generate", {"instruction": f"Convert {year}-{month:02d}-{day} to words."})
            assert code == 200 and got["version"] == "1", got
            code, _, _ = post(f"{url}/v1/feedback", {"request_id": got["request_id"], "kind": "correction",
                                                     "correction": f"{MONTHS[month - 1]} {day}, {year}"})
            assert code == 200
            corrected.append(got["request_id"])
        out = ok(run_cli(["feedback", "export"], project))
        assert "16 corrections (SFT rows), 0 preferences" in out
        drops = sorted((project / "data/incoming").glob("feedback-*-alpaca.jsonl"))
        assert len(drops) == 1
        rows = [json.loads(x) for x in drops[0].read_text().splitlines()]
        assert [r["request_ids"] for r in rows] == [[r] for r in corrected]
        assert "no feedback to export" in ok(run_cli(["feedback", "export"], project))

        # preferences: the full answer over a cut one, to the same prompt; not exported by hand
        preferred = []
        for i in range(8):
            body = {"instruction": f"How is 2201-0{1 + i}-2{i} written in words?"}
            code, full, _ = post(f"{url}/v1/generate", body)
            code2, cut, _ = post(f"{url}/v1/generate", body | {"max_new_tokens": 2})
            assert code == code2 == 200
            if full["answer"] != cut["answer"]:
                assert post(f"{url}/v1/feedback", {"request_id": full["request_id"], "kind": "preference",
                                                   "rejected_id": cut["request_id"]})[0] == 200
                preferred.append((full["request_id"], cut["request_id"]))
        assert len(preferred) >= 4, preferred

        # the nightly run: the served deployment exports the preferences, then collects both drops
        with serving(project, prefect_server) as trigger:
            fr, run = trigger(stop=True)
        pairs = sorted((project / "data/incoming").glob("feedback-*-preference.jsonl"))
        assert len(pairs) == 1 and len(pairs[0].read_text().splitlines()) == len(preferred)
        c = mlflow_client(project)
        v2 = c.get_model_version(MODEL, "2")
        assert v2.run_id == run.info.run_id
        assert v2.tags["ftpipe.decision"] in ("promote", "refuse")          # the gate decided
        assert v2.tags["ftpipe.start_from"].startswith(f"champion models:/{MODEL}/1")

        # the page shows the new decision; version 2 answers when asked for
        page = urllib.request.urlopen(f"{url}/").read().decode()
        assert f"v2: <strong>{v2.tags['ftpipe.decision']}</strong>" in page
        assert f"#/models/{MODEL}/versions/2" in page
        code, got, _ = post(f"{url}/v1/generate", {"instruction": "Convert 2101-01-10 to words.", "model": "2"})
        assert code == 200 and got["version"] == "2"
        answered_by_v2 = got["request_id"]
    finally:
        stop(served)

    # lineage, both ways: which versions learned from a request, which requests fed a version
    for rid in (corrected[0], preferred[0][1]):
        out = ok(run_cli(["lineage", "--request", rid], project, prefect_server))
        assert f"{MODEL} v2" in out and f"{MODEL} v1" not in out, out
    fed = ok_json(run_cli(["lineage", f"models:/{MODEL}/2", "--requests", "--json"], project, prefect_server))
    ids = {r for d in fed["drops"] for r in d["request_ids"]}
    assert ids == set(corrected) | {r for pair in preferred for r in pair}
    assert {d["read_from"] for d in fed["drops"]} == {"the drop file"}
    assert "no served feedback fed it" in ok(run_cli(["lineage", f"models:/{MODEL}/1", "--requests"], project))
    unknown = run_cli(["lineage", "--request", "0" * 32], project)
    assert unknown.returncode == 2 and "no such request in the serving store" in unknown.stderr
    ok(run_cli(["lineage", f"models:/{MODEL}/2"], project, prefect_server))   # the audit holds with the drops

    # bound beyond localhost, with a token from the environment: nothing answers without it; and
    # feedback on an answer of a version deleted since is refused, naming it (the registry asked)
    c.delete_model_version(MODEL, "2")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["serve"]["token"] = "${FTPIPE_SERVE_TOKEN}"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    served = start_cli(["serve", "--host", "0.0.0.0", "--port", str(port), "--model", "1"], project,
                       env=env | {"FTPIPE_SERVE_TOKEN": "s3cret-loop"})
    try:
        wait_http(f"{url}/health", 180, served)
        auth = {"Authorization": "Bearer s3cret-loop"}
        assert post(f"{url}/v1/generate", {"instruction": "Convert 2101-01-10 to words."})[0] == 401
        assert post(f"{url}/v1/feedback", {"request_id": corrected[1], "kind": "rating", "rating": "up"})[0] == 401
        with pytest.raises(urllib.error.HTTPError) as page:
            urllib.request.urlopen(f"{url}/")
        assert page.value.code == 401
        assert post(f"{url}/v1/feedback", {"request_id": answered_by_v2, "kind": "rating", "rating": "down"}, auth)[:2] \
            == (409, {"error": f"request_id: {answered_by_v2} was answered by version 2, which the registry no longer holds"})
        assert post(f"{url}/v1/feedback", {"request_id": corrected[1], "kind": "rating", "rating": "up"}, auth)[0] == 200
    finally:
        stop(served)
