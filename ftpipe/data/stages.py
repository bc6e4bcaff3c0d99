"""Entry points of the DVC stages in dvc.yaml (run from the project root by `dvc repro`).

    python -m ftpipe.data.stages base-model | collect | clean | split

Each reads params.yaml (DVC tracks the params it lists per stage) and writes only its
declared outputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ftpipe.config import load_config

ROOT = Path.cwd()
COLLECTED, CLEANED, SPLITS = Path("data/collected"), Path("data/cleaned"), Path("data/splits")
BASE_MODEL_DIR = Path("models/base")


def tokenizer_path(base: str) -> str:
    """The tokenizer the token limits use: the base model's (a local folder or a hub id)."""
    local = ROOT / base
    if local.resolve() == (ROOT / BASE_MODEL_DIR).resolve() and not (local / "tokenizer.json").is_file():
        raise SystemExit(f"the default base model's tokenizer is not built yet ({BASE_MODEL_DIR}); "
                         "run `dvc repro base_model` (ftpipe run does it first)")
    return str(local) if local.exists() else base


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    cfg = load_config(ROOT / "params.yaml")
    stage = argv[0]
    if stage == "base-model":
        from ftpipe.training.basemodel import build_base_model
        r = build_base_model(ROOT / "data/corpus/corpus.jsonl", ROOT / BASE_MODEL_DIR, cfg.model.build)
        print(f"built {r.path}: {r.parameters:,} parameters, pretrain loss {r.pretrain_loss}, "
              f"{r.seconds:.0f}s")
    elif stage == "collect":
        from ftpipe.data.collection import collect
        r = collect(ROOT, list(cfg.data.sources), ROOT / COLLECTED)
        print(f"collected {r.rows} rows from {len(r.files)} file(s), {r.parse_errors} unparseable")
    elif stage == "clean":
        from ftpipe.data.cleaning import clean
        r = clean(ROOT / COLLECTED / "snapshot.jsonl", cfg.data.clean, ROOT / CLEANED,
                  tokenizer=tokenizer_path(cfg.model.base), revision=cfg.model.revision,
                  trust_remote_code=cfg.model.trust_remote_code)
        print(f"cleaned: read {r.read} = kept {r.kept} + quarantined {r.quarantined} {r.reasons}")
    elif stage == "split":
        from ftpipe.data.splitting import split_examples
        r = split_examples(ROOT / CLEANED / "clean.jsonl", cfg.data.split, ROOT / SPLITS,
                           list(cfg.data.sources))
        print(f"split: {r.counts}")
    else:
        print(f"unknown stage {stage!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str]) -> int:
    """main(), with a known data error reported as one clear line (and handed to the
    caller through $FTPIPE_STAGE_ERROR) instead of a traceback."""
    from ftpipe.config import ConfigError
    from ftpipe.data.records import FormatError
    from ftpipe.data.sources import SourceError

    try:
        return main(argv)
    except (SourceError, FormatError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        err = os.environ.get("FTPIPE_STAGE_ERROR")
        if err:
            Path(err).write_text(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
