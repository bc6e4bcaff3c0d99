"""The lineage record against a version's tags: which tags a record expects, and every edit named."""
from ftpipe import names as t
from ftpipe.lineage.record import tag_problems

FACTS = {t.GIT_COMMIT: "abc", t.CONFIG_HASH: "c0ffee", t.SPLITS: "d1.dir", t.DVC + "collect:data/collected": "d2.dir",
         t.SOURCE + "data/sources/dates.jsonl": "sha256:00 rows:3", t.METHOD: "lora", t.CANDIDATE: "train-1",
         t.TEST_SET: "5e7", t.METRIC + "exact_match": "0.9", t.METRIC + "eval_loss": "0.1"}


def test_a_new_record_expects_only_the_few_version_tags():
    tags = t.version_tags(FACTS, "exact_match")
    assert set(tags) == {t.CONFIG_HASH, t.SPLITS, t.METHOD, t.CANDIDATE, t.TEST_SET, t.METRIC + "exact_match"}
    doc = FACTS | {t.RECORD_TAGGED: sorted(tags)}
    gate = {t.DECISION: "promote", t.CHAMPION_COMPARED: "none"}
    assert tag_problems(doc, tags | gate, "m v2") == []
    edited = dict(tags, **{t.SPLITS: "other.dir"})
    del edited[t.CONFIG_HASH]
    edited[t.DVC + "clean:data/cleaned"] = "d3.dir"                # a lineage tag nobody recorded
    edited[t.METRIC + "eval_loss"] = "0.01"                        # recorded, not a tag, now claimed otherwise
    assert tag_problems(doc, edited, "m v2") == [
        "tag ftpipe.config_hash on m v2 was removed: recorded 'c0ffee'",
        "tag ftpipe.dvc.clean:data/cleaned on m v2 was added after registration: 'd3.dir'",
        "tag ftpipe.dvc.split:data/splits on m v2 was rewritten: recorded 'd1.dir', now 'other.dir'",
        "tag ftpipe.metric.eval_loss on m v2 was rewritten: recorded '0.1', now '0.01'"]


def test_an_older_record_expects_every_lineage_fact_as_a_tag():
    """Versions registered before the record listed its tags wrote all lineage as tags."""
    old = {k: v for k, v in FACTS.items() if k in t.LINEAGE_KEYS or k.startswith((t.DVC, t.SOURCE))}
    tags = FACTS | {t.DECISION: "refuse", t.DECISION_SUMMARY: "refuse: ..."}
    assert tag_problems(old, tags, "m v1") == []
    del tags[t.SOURCE + "data/sources/dates.jsonl"]
    assert tag_problems(old, tags, "m v1") == [
        "tag ftpipe.source.data/sources/dates.jsonl on m v1 was removed: recorded 'sha256:00 rows:3'"]
