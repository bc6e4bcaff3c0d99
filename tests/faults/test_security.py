"""Hostile input and secrets: planted secrets never leave a real run (every output grepped);
servers the project launches bind to 127.0.0.1; remote code and pickled weights are refused
unless allowed per model; paths from config or a DVC listing cannot escape."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import PG, needs_postgres, BIN, REPO, free_port, make_project, mlflow_client, run_cli, start_cli, wait_http

PLANTED = {"FTPIPE_DB_PASSWORD": "pw-planted-7f3a9c51", "HF_TOKEN": "hf_planted_token_8d2e1b44",
           "AWS_SECRET_ACCESS_KEY": "aws-planted-secret-5c6d7e8f"}


def _files(*roots: Path):
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                yield p


# Personal data planted in a source: in a row the policy scrubs or drops, in a malformed
# (truncated) line and in a wrong-typed row, both quarantined whatever the policy.
PII = {"email": "planted.person@example.org", "card": "4111 1111 1111 1111", "phone": "+44 20 7946 0958"}


def _people_source(project: Path) -> None:
    lines = [json.dumps({"instruction": f"Spell the number {n} in words.", "input": "", "output": f"number {n}"})
             for n in range(11, 21)]
    lines += [json.dumps({"instruction": "Who wrote to us?", "input": "", "output": f"It was {PII['email']}."}),
              json.dumps({"instruction": "Call back", "input": f"at {PII['phone']}", "output": "Done."}),
              '{"instruction": "Charge card ' + PII["card"] + '", "output": "charg',          # truncated
              json.dumps({"instruction": f"Mail {PII['email']} a copy", "output": 42})]     # wrong type
    (project / "data/sources/people.jsonl").write_text("\n".join(lines) + "\n")


@needs_postgres
@pytest.mark.parametrize("pii", ["scrub", "drop"])
def test_planted_secrets_and_pii_never_leave_a_run(tmp_path_factory, prefect_server, pii):
    """A SQL source whose password comes from ${FTPIPE_DB_PASSWORD}, tokens in the environment,
    and personal data in a source file (a row the policy scrubs or drops, a malformed line, a
    wrong-typed row): after a whole run, no output holds any of them — stdout, stderr, MLflow
    (params, tags, artifacts, its database file), runs/, the cleaned data, splits and reports,
    the DVC cache and remote, git, and the Prefect server's database and logs. The only copies
    of the PII are the source file itself and the raw snapshot that DVC versions (the data
    before the policy applies, in data/collected and its DVC objects)."""
    import psycopg

    table = f"ftpipe_rows_{os.getpid()}"
    rows = [json.loads(x) for x in (REPO / "data/sources/dates.jsonl").read_text().splitlines()[:300]]
    with psycopg.connect(f"{PG}/test", autocommit=True) as con:
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"CREATE TABLE {table} (instruction text, input text, output text)")
        with con.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s, %s)",
                            [(r["instruction"], r.get("input", ""), r["output"]) for r in rows])
    project = make_project(tmp_path_factory.mktemp("secrets"), {"train": {"max_steps": 5}},
                           shared_cache=False)   # its DVC cache is one of the outputs grepped
    import yaml

    _people_source(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["clean"]["pii"] = pii
    params["data"]["sources"].append({"name": "people", "path": "data/sources/people.jsonl"})
    params["data"]["sources"].append({
        "name": "db", "type": "sql", "format": "alpaca",
        "url": "postgresql+psycopg://postgres:${FTPIPE_DB_PASSWORD}@127.0.0.1:5432/test",
        "query": f"SELECT instruction, input, output FROM {table}"})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = run_cli(["run"], project, prefect_server | PLANTED)
    finally:
        with psycopg.connect(f"{PG}/test", autocommit=True) as con:
            con.execute(f"DROP TABLE IF EXISTS {table}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export = project / "data/sources/sql/db.jsonl"
    assert len(export.read_text().splitlines()) == 300          # the password really was used

    outputs = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    remote = project / "dvc-remote"
    assert remote.is_dir()
    roots = [project, Path(prefect_server["PREFECT_HOME"])]
    n = 0
    for f in _files(*roots):
        outputs[str(f)] = f.read_bytes()
        n += 1
    assert n > 100 and any(k.endswith("mlflow.db") for k in outputs) and any(k.endswith("prefect.db") for k in outputs)
    for name, secret in PLANTED.items():
        leaks = [where for where, data in outputs.items() if secret.encode() in data]
        assert not leaks, f"{name} leaked into {leaks}"

    report = json.loads((project / "data/cleaned/report.json").read_text())
    assert report["per_source"]["people"]["quarantined"] == (2 if pii == "scrub" else 4)
    raw = hashlib.md5((project / "data/collected/snapshot.jsonl").read_bytes()).hexdigest()
    raw_copies = {str(project / "data/sources/people.jsonl"), str(project / "data/collected/snapshot.jsonl")}
    for name, value in PII.items():
        leaks = [where for where, data in outputs.items() if value.encode() in data
                 and where not in raw_copies and not where.endswith(f"/{raw[:2]}/{raw[2:]}")]
        assert not leaks, f"planted {name} ({value}) left data/ under pii: {pii}: {leaks}"
    quarantine = mlflow_artifact(project, "data/quarantine.jsonl")
    assert quarantine is not None and b"<EMAIL>" in quarantine and b"<CARD>" in quarantine   # logged, scrubbed


def mlflow_artifact(project: Path, path: str) -> bytes | None:
    """An artifact of the project's newest MLflow run, as bytes."""
    c = mlflow_client(project)
    run = c.search_runs([c.get_experiment_by_name("ftpipe").experiment_id], order_by=["start_time DESC"])[0]
    dest = project.parent / f"dl-{run.info.run_id}"
    try:
        return Path(c.download_artifacts(run.info.run_id, path, str(dest))).read_bytes()
    except Exception:   # noqa: BLE001
        return None


def test_a_literal_password_in_params_is_refused_without_echoing_it():
    from ftpipe.config import ConfigError, parse_config

    src = {"name": "db", "type": "sql", "url": "postgresql://u:hunter2-literal@db/x", "query": "SELECT 1"}
    with pytest.raises(ConfigError) as err:
        parse_config({"data": {"sources": [{"path": "data/sources/dates.jsonl"}, src]},
                      "registry": {"tracking_uri": "postgresql://u:other-literal@db/mlflow"}})
    text = str(err.value)
    assert "data.sources.1.url: holds a literal password: write it as ${DB_PASSWORD}" in text
    assert "registry.tracking_uri: holds a literal password" in text
    assert "hunter2-literal" not in text and "other-literal" not in text


def _listening(pid: int) -> set[str]:
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("server", ["mlflow", "prefect"])
def test_servers_the_project_launches_bind_to_localhost(tmp_path, server):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    if server == "mlflow":
        cmd = [sys.executable, str(REPO / "mlflow/launch.py"), "--backend", f"sqlite:///{tmp_path / 'm.db'}",
               "--artifacts", str(tmp_path / "a"), "--port", str(port), "--workers", "1"]
        health = f"http://127.0.0.1:{port}/health"
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    else:
        health = f"http://127.0.0.1:{port}/api/health"
        proc = start_cli(["prefect-server", "--port", str(port)], make_project(tmp_path / "p"), env=env)
    try:
        wait_http(health, 180, proc)
        assert _listening(proc.pid) == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_remote_code_never_runs_unless_trusted_per_model(tiny_base, tmp_path):
    import shutil

    from ftpipe.config import ModelConfig
    from ftpipe.training.models import load_base

    d = tmp_path / "custom"
    shutil.copytree(tiny_base, d)
    marker = tmp_path / "code-ran"
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "ftpipe-custom"           # an architecture only the repo's code knows
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    for mod in ("configuration_evil", "modeling_evil"):
        (d / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_base(ModelConfig(base=str(d)), None, for_training=False)
    assert not marker.exists()


def test_pickled_weights_are_refused_unless_allowed(tiny_base, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from ftpipe.config import ModelConfig
    from ftpipe.training.models import load_base

    d = tmp_path / "pickled"
    shutil.copytree(tiny_base, d)
    state = load_file(str(d / "model.safetensors"))
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds no safetensors weights, only pytorch_model\.bin .*"
                                         r"model\.allow_pickle_weights: true"):
        load_base(ModelConfig(base=str(d)), torch.float32, for_training=False)
    model, _ = load_base(ModelConfig(base=str(d), allow_pickle_weights=True), torch.float32, for_training=False)
    name, tensor = next(iter(state.items()))
    assert torch.equal(model.state_dict()[name], tensor)


def test_paths_from_config_or_a_data_listing_cannot_escape(tmp_path):
    from ftpipe.lineage.record import AuditError
    from ftpipe.data.versions import Store, restore_output
    from ftpipe.config import ConfigError, parse_config

    for path in ("/etc/passwd", "data/sources/../../../etc/passwd", "../outside.jsonl"):
        with pytest.raises(ConfigError, match=r"data\.sources\.0: .*leaves the project"):
            parse_config({"data": {"sources": [{"path": path}]}})
    # a DVC listing (a .dir object, re-hashing correctly) that names a file outside the target
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=repo, check=True)
    files = repo / ".dvc/cache/files/md5"
    payload = b'{"x": 1}\n'
    h = hashlib.md5(payload).hexdigest()
    (files / h[:2]).mkdir(parents=True, exist_ok=True)
    (files / h[:2] / h[2:]).write_bytes(payload)
    listing = json.dumps([{"md5": h, "relpath": "../../escaped.jsonl"}]).encode()
    d = hashlib.md5(listing).hexdigest()
    (files / d[:2]).mkdir(parents=True, exist_ok=True)
    (files / d[:2] / (d[2:] + ".dir")).write_bytes(listing)
    store = Store(repo)
    try:
        dest = tmp_path / "restore" / "to"
        with pytest.raises(AuditError, match="would land outside"):
            restore_output(store, d + ".dir", dest)
    finally:
        store.close()
    assert not (tmp_path / "escaped.jsonl").exists() and not (tmp_path / "restore" / "escaped.jsonl").exists()
