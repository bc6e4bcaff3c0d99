"""The code link of a version's lineage: dirty only when tracked code differs from the commit,
not when DVC-versioned data, dvc.lock or the config (hashed and logged on its own) changed."""
import subprocess

from ftpipe.lineage.record import git_commit


def test_a_drop_and_a_new_dvc_lock_leave_the_code_clean(tmp_path):
    for rel, text in {"flow.py": "print(1)\n", "dvc.lock": "a\n", "params.yaml": "x: 1\n",
                      "data/incoming/README.md": "drops\n", "data/sources/a.jsonl": "{}\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(git + ["add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "data/incoming/drop-0003.jsonl").write_text("{}\n")        # a new drop
    (tmp_path / "data/sources/a.jsonl").write_text("{}\n{}\n")             # a source grew
    (tmp_path / "dvc.lock").write_text("b\n")                              # the run updated the lock
    (tmp_path / "params.yaml").write_text("x: 2\n")                        # the config link covers it
    assert git_commit(tmp_path) == (head, False)
    (tmp_path / "flow.py").write_text("print(2)\n")
    assert git_commit(tmp_path) == (head, True)
