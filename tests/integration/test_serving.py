"""Serving that remembers, on a real HTTP server (uvicorn), a real tiny model and a real SQLite
store: each answer recorded with PII scrubbed, feedback validated with a clear 4xx, nothing
lost under concurrent posts, a full queue answered 503 with Retry-After, concurrent prompts
generated as one batch, a token required when one is set, and the export that turns feedback
into a training drop that collection reads."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from ftpipe.serving.app import Loaded, create_app
from ftpipe.serving.records import Records
from ftpipe.serving.versions import prompt_text
from tests.helpers import PG, free_port, needs_postgres

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    from ftpipe.evaluation.generation import generate, load_for_eval

    model, tok = load_for_eval(str(tiny_base))
    return lambda rows, n: generate(model, tok, [prompt_text(r, tok) for r in rows], n), tok


def _serve(tmp_path, tiny_model, versions=("1",), store: str | None = None, capture: bool = True, **options):
    """The app on a uvicorn server in this process; returns (url, records, app, stop)."""
    import uvicorn

    predict, tok = tiny_model
    loaded = {v: Loaded(f"models:/m/{v}", v, predict, lambda row: prompt_text(row, tok)) for v in versions}

    def resolve(model: str) -> Loaded:
        version = {"champion": "1", "challenger": versions[-1]}.get(model, model)
        if version not in loaded:
            raise LookupError(f"{model!r} is not a version or alias of m in the registry")
        return loaded[version]

    records = Records.open(store or f"sqlite:///{tmp_path / 'requests.db'}") if capture else None
    app = create_app(resolve, records, version_exists=lambda v: v in loaded, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", records, app, stop


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} | (headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), {k.lower(): v for k, v in e.headers.items()}


def test_requests_are_recorded_scrubbed_and_feedback_is_validated(tmp_path, tiny_model):
    url, records, _, stop = _serve(tmp_path, tiny_model, versions=("1", "2"))
    try:
        code, got, _ = post(f"{url}/v1/generate", {"instruction": "Convert 1948-03-21 to words. Reply to ann@example.com",
                                                   "max_new_tokens": 8})
        assert code == 200 and got["version"] == "1" and got["request_id"], got
        saved = records.request(got["request_id"])
        assert "ann@example.com" not in json.dumps(saved) and "<EMAIL>" in saved["row"], saved
        assert saved["answer"] == records.scrub(got["answer"]) and saved["latency_ms"] > 0
        ours = got["request_id"]
        # another version's answer to the same prompt, by alias; a chat; the MLflow protocol
        code, other, _ = post(f"{url}/v1/generate", {"instruction": "Convert 1948-03-21 to words. Reply to ann@example.com",
                                                     "model": "challenger", "max_new_tokens": 4})
        assert code == 200 and other["version"] == "2"
        code, inv, _ = post(f"{url}/invocations", {"dataframe_records": [{"instruction": "Hi"}, {"prompt": "P:"}]})
        assert code == 200 and len(inv["predictions"]) == 2 and all(inv["request_ids"])

        # bad requests, each with a clear 4xx naming the field
        assert post(f"{url}/v1/generate", {"model": "7", "instruction": "x"})[:2] == \
            (404, {"error": "model: '7' is not a version or alias of m in the registry"})
        assert post(f"{url}/v1/generate", {"messages": [{"role": "assistant", "content": "x"}]})[1]["error"] == \
            "messages: the conversation must end with a user turn"
        assert post(f"{url}/v1/generate", b"not json")[0] == 400
        assert post(f"{url}/v1/generate", {"instruction": "x", "max_new_tokens": 0})[0] == 422
        assert post(f"{url}/invocations", {"dataframe_records": [{"prompt": "P:"}], "params": {"max_new_tokens": 10**6}}
                    )[:2] == (422, {"error": "params.max_new_tokens: an integer from 1 to 4096"})
        assert post(f"{url}/invocations", {"dataframe_records": [{"prompt": "P:"}] * 65})[0] == 413
        # a cross-site form or text/plain post (no CORS preflight) is refused before it is read
        assert post(f"{url}/v1/feedback", {"request_id": "x"}, {"Content-Type": "text/plain"})[:2] == \
            (415, {"error": "Content-Type must be application/json"})

        fb = f"{url}/v1/feedback"
        assert post(fb, {"request_id": ours, "kind": "rating", "rating": "up"})[0] == 200
        assert post(fb, {"request_id": "nope", "kind": "rating", "rating": "up"})[:2] == \
            (404, {"error": "request_id: no recorded request 'nope'"})
        assert post(fb, {"request_id": ours, "kind": "correction", "correction": "  "})[:2] == \
            (422, {"error": "correction: empty; write the answer the model should have given"})
        assert post(fb, {"request_id": ours, "kind": "rating", "rating": "sideways"})[0] == 422
        assert post(fb, {"request_id": ours, "kind": "rating", "rating": ["up"]})[:2] == (422, {"error": "rating: up or down"})
        assert post(fb, {"request_id": ours, "kind": "correction", "correction": {"x": 1}})[:2] == \
            (422, {"error": "correction: text"})
        assert post(fb, {"request_id": ours, "kind": "preference", "rejected_id": inv["request_ids"][0]})[1] == \
            {"error": f"rejected_id: {inv['request_ids'][0]} answered another prompt than {ours}"}
        if got["answer"] != other["answer"]:
            assert post(fb, {"request_id": other["request_id"], "kind": "preference", "rejected_id": ours})[0] == 200
        # a request answered by a version the registry no longer holds
        with records.engine.begin() as db:
            db.exec_driver_sql("UPDATE requests SET version = '9' WHERE id = ?", (inv["request_ids"][1],))
        assert post(fb, {"request_id": inv["request_ids"][1], "kind": "rating", "rating": "down"})[:2] == \
            (409, {"error": f"request_id: {inv['request_ids'][1]} was answered by version 9, which the registry "
                            "no longer holds"})

        # concurrent posts: none lost
        before = records.counts().get("correction", 0)
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: post(fb, {"request_id": ours, "kind": "correction",
                                                      "correction": f"March 21, 1948 ({i})"})[0], range(80)))
        assert codes == [200] * 80 and records.counts()["correction"] == before + 80
    finally:
        stop()

    # the export: corrections as SFT rows, preferences as pairs, each with its request ids, one
    # file per format as collection reads them; exported once
    paths, counts = records.export(tmp_path / "incoming")
    rows = {p.name.rsplit("-", 1)[1]: [json.loads(x) for x in p.read_text().splitlines()] for p in paths}
    assert counts["corrections"] == 80 and len(rows["alpaca.jsonl"]) == 80
    assert len(rows.get("preference.jsonl", [])) == counts["preferences"]
    assert {r["output"] for r in rows["alpaca.jsonl"]} == {f"March 21, 1948 ({i})" for i in range(80)}
    fix = rows["alpaca.jsonl"][0]
    assert fix["request_ids"] == [ours]
    assert "<EMAIL>" in fix["instruction"] and not any("ann@example.com" in p.read_text() for p in paths)
    assert records.export(tmp_path / "incoming") == ([], {"corrections": 0, "preferences": 0})
    assert ours in records.requests_in(paths[0].name)
    from ftpipe.data.collection import _rows_of_file
    from ftpipe.data.params import SourceConfig

    for p in paths:   # the drop is data like any other: each file one format, no row in error
        fmt, read = _rows_of_file(p, p.name, SourceConfig(name="incoming", path="data/incoming"), "jsonl")
        read = list(read)
        assert fmt == p.name.rsplit("-", 1)[1].removesuffix(".jsonl") and not any("_error" in r for r in read)


@needs_postgres
def test_a_team_store_on_postgresql_keeps_every_concurrent_post(tmp_path, tiny_model):
    import psycopg

    db = f"ftpipe_serve_{os.getpid()}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {db}")
        con.execute(f"CREATE DATABASE {db}")
    try:
        url, records, _, stop = _serve(tmp_path, tiny_model, store=f"{PG}/{db}")
        try:
            body = {"instruction": "Convert 2001-01-01 to words. Call 555-867-5309", "max_new_tokens": 4}
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda _: post(f"{url}/v1/generate", body), range(16)))
            assert [c for c, _, _ in got] == [200] * 16
            ids = [g["request_id"] for _, g, _ in got]
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lambda i: post(f"{url}/v1/feedback", {
                    "request_id": ids[i % 16], "kind": "correction", "correction": f"January 1, 2001 ({i})"})[0],
                    range(48)))
            assert codes == [200] * 48
        finally:
            stop()
        with psycopg.connect(f"{PG}/{db}") as con:            # in PostgreSQL, scrubbed
            assert con.execute("SELECT count(*) FROM feedback").fetchone()[0] == 48
            rows = [r[0] for r in con.execute("SELECT row FROM requests").fetchall()]
        assert len(rows) == 16 and not any("867-5309" in r for r in rows)
        paths, counts = records.export(tmp_path / "incoming")
        assert counts["corrections"] == 48 and sum(len(p.read_text().splitlines()) for p in paths) == 48
        records.engine.dispose()
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_with_capture_off_nothing_is_recorded_and_feedback_says_why(tmp_path, tiny_model):
    url, _, _, stop = _serve(tmp_path, tiny_model, capture=False)
    try:
        code, got, _ = post(f"{url}/v1/generate", {"instruction": "Convert 2001-01-01 to words.", "max_new_tokens": 4})
        assert code == 200 and got["request_id"] is None and got["version"] == "1"
        assert post(f"{url}/v1/feedback", {"request_id": "x", "kind": "rating", "rating": "up"})[:2] == \
            (409, {"error": "serve.capture is off: no request is recorded to take feedback on"})
        assert "capture is off" in urllib.request.urlopen(f"{url}/").read().decode()
    finally:
        stop()
    assert not (tmp_path / "requests.db").exists()


def test_a_full_queue_answers_503_and_waiting_prompts_share_a_batch(tmp_path, tiny_model):
    url, _, app, stop = _serve(tmp_path, tiny_model, queue_size=2, max_batch=8, batch_wait_ms=400)
    try:
        body = {"instruction": "Convert 2001-01-01 to words.", "max_new_tokens": 4}
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: post(f"{url}/v1/generate", body), range(8)))
        codes = sorted(code for code, _, _ in got)
        assert 503 in codes and 200 in codes, codes
        busy = next(h for code, _, h in got if code == 503)
        assert busy.get("retry-after") == "1"
        health = json.loads(urllib.request.urlopen(f"{url}/health").read())
        assert health["largest_batch"] >= 2, health                 # the first job waited and took company
        assert app.state.batcher.generated == codes.count(200)      # every accepted prompt generated once
    finally:
        stop()


def test_a_token_is_required_when_set(tmp_path, tiny_model):
    url, _, _, stop = _serve(tmp_path, tiny_model, token="s3cret")
    try:
        assert post(f"{url}/v1/generate", {"instruction": "x"})[0] == 401
        assert post(f"{url}/v1/generate", {"instruction": "x"}, {"Authorization": "Bearer wrong"})[0] == 401
        assert post(f"{url}/v1/generate", {"instruction": "x", "max_new_tokens": 2},
                    {"Authorization": "Bearer s3cret"})[0] == 200
        assert post(f"{url}/v1/generate", {"instruction": "x", "max_new_tokens": 2},
                    {"Cookie": "ftpipe_token=s3cret"})[0] == 200
        assert post(f"{url}/v1/feedback", {"request_id": "x", "kind": "rating", "rating": "up"})[0] == 401
        # the page too; its link with ?token= sets the cookie and leaves the address bar
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{url}/")
        assert denied.value.code == 401

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args):
                return None

        with pytest.raises(urllib.error.HTTPError) as moved:
            urllib.request.build_opener(NoRedirect).open(f"{url}/?token=s3cret")
        assert moved.value.code == 303 and moved.value.headers["location"] == "/"
        assert "ftpipe_token=s3cret" in moved.value.headers["set-cookie"]
        assert "httponly" in moved.value.headers["set-cookie"].lower()
        page = urllib.request.urlopen(urllib.request.Request(f"{url}/", headers={"Cookie": "ftpipe_token=s3cret"}))
        assert page.status == 200 and "Compare champion and challenger" in page.read().decode()
        # an oversized body: 413, whether it says its length or streams it
        auth = {"Authorization": "Bearer s3cret"}
        big = {"instruction": "x" * 70000}
        assert post(f"{url}/v1/generate", big, auth)[:2] == \
            (413, {"error": "the body is over 65536 bytes (serve.max_body_bytes)"})

        def chunks():
            data = json.dumps(big).encode()
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        streamed = urllib.request.Request(f"{url}/v1/feedback", data=chunks(), method="POST",
                                          headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"} | auth)
        with pytest.raises(urllib.error.HTTPError) as too_big:
            urllib.request.urlopen(streamed)
        assert too_big.value.code == 413
    finally:
        stop()


def test_serve_refuses_another_interface_without_a_token(tmp_path):
    from tests.helpers import make_project, run_cli

    project = make_project(tmp_path / "p")
    out = run_cli(["serve", "--host", "0.0.0.0"], project)
    assert out.returncode == 2
    assert "--host 0.0.0.0 lets other machines in: set serve.token to ${VAR}" in out.stderr.replace("\n", " ")
    with socket.socket() as s:      # nothing was bound
        assert s.connect_ex(("127.0.0.1", 5001)) != 0


sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second real tiny model (another seed, 60 pretraining steps): its answers differ from tiny_model's."""
    from ftpipe.config import BuildConfig
    from ftpipe.evaluation.generation import generate, load_for_eval
    from ftpipe.training.basemodel import build_base_model
    from tests.helpers import REPO

    dest = tmp_path_factory.mktemp("other") / "base"
    build_base_model(REPO / "data/corpus/corpus.jsonl", dest, BuildConfig(
        seed=1, vocab_size=320, hidden_size=64, layers=2, heads=2, intermediate_size=128, pretrain_steps=60,
        block_size=64, pretrain_batch_size=16, pretrain_lr=0.003),
        log=lambda m: None)
    model, tok = load_for_eval(str(dest))
    return lambda rows, n: generate(model, tok, [prompt_text(r, tok) for r in rows], n), tok


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser on PATH (apt-get install chromium)")
def test_the_page_chats_compares_and_its_feedback_lands_in_the_store(tmp_path, tiny_model, other_model):
    """Headless Chromium with no network: chat by keyboard, rate and correct; compare champion
    and challenger (two different models) and pick one; the rows are in the store. A prompt
    holding markup is shown as text and runs nothing; so is a gate reason holding markup."""
    import uvicorn

    script = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
    loaded = {"1": Loaded("models:/m/1", "1", tiny_model[0], lambda row: prompt_text(row, tiny_model[1])),
              "2": Loaded("models:/m/2", "2", other_model[0], lambda row: prompt_text(row, other_model[1]))}
    records = Records.open(f"sqlite:///{tmp_path / 'requests.db'}")
    status = {"model": "m", "aliases": {"champion": "1", "challenger": "2"}, "link": "http://127.0.0.1:5000/#/models/m/versions/2",
              "decision": {"version": "2", "verdict": "refuse",
                           "reasons": [{"rule": "beats_champion", "passed": False, "detail": script}]}}
    app = create_app(lambda m: loaded[{"champion": "1", "challenger": "2"}.get(m, m)], records,
                     max_new_tokens=8, status=lambda: status)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/"
    refused, errors = [], []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                       else (refused.append(route.request.url), route.abort()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="load")
            expect = sync_api.expect
            expect(page.locator("#versions")).to_contain_text("champion: v1 · challenger: v2")
            expect(page.locator("td", has_text="window.pwned")).to_have_count(1)    # the reason, as text

            # chat, by keyboard only: type, Tab to Send, Enter
            page.locator("#prompt").fill(f"{script} Convert 1948-03-21 to words.")
            page.locator("#prompt").focus()
            page.keyboard.press("Tab")
            page.keyboard.press("Enter")
            expect(page.locator("#status")).to_contain_text("answered by v1")
            expect(page.locator("#chat-question")).to_have_text(f"{script} Convert 1948-03-21 to words.")
            page.get_by_role("button", name="Good answer").click()
            expect(page.locator("#status")).to_have_text("Thank you: feedback recorded.")
            page.locator("#chat-fix").fill("March 21, 1948")
            page.locator("#status").evaluate("e => e.textContent = ''")
            page.get_by_role("button", name="Send correction").first.click()
            expect(page.locator("#status")).to_have_text("Thank you: feedback recorded.")

            # compare: both versions answer the same prompt, in random order; pick A, then correct
            page.locator("#compare-prompt").fill("How is 2077-10-16 written in words?")
            page.get_by_role("button", name="Compare (Alt+C)").click()
            expect(page.locator("#pick-left")).to_be_enabled()
            answers = {page.locator("#left").text_content(), page.locator("#right").text_content()}
            page.locator("#status").evaluate("e => e.textContent = ''")
            page.locator("#pick-left").click()
            expect(page.locator("#revealed")).to_contain_text("v1")
            expect(page.locator("#revealed")).to_contain_text("v2")
            expect(page.locator("#status")).to_have_text("Thank you: feedback recorded.")
            page.locator("#compare-fix").fill("October 16, 2077")
            page.locator("#status").evaluate("e => e.textContent = ''")
            page.locator("#compare-fix-send").click()
            expect(page.locator("#status")).to_have_text("Thank you: feedback recorded.")
            assert page.evaluate("window.pwned") is None
            assert page.locator("#chat-question img, #chat-question script").count() == 0
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    assert refused == [] and errors == []
    assert len(answers) == 2                                # two versions, two different answers
    assert records.counts() == {"requests": 3, "rating": 1, "correction": 2, "preference": 1}
    with records.engine.connect() as db:
        kept = db.exec_driver_sql("SELECT row FROM requests").scalars().all()
        prefs = db.exec_driver_sql("SELECT request_id, rejected_id FROM feedback WHERE kind = 'preference'").all()
    assert any("<script>window.pwned = 1</script>" in row for row in kept)   # stored as the user typed it
    winner, loser = (records.request(i) for i in prefs[0])
    assert winner["prompt"] == loser["prompt"] and {winner["version"], loser["version"]} == {"1", "2"}
