"""Curation at prepare time: exact and near deduplication, the blocklist, PII scrubbing, and how each
shows up in the split, the manifest and the summary."""

import random
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gptforge.cli import build_parser
from gptforge.data.curate import Blocklist, Deduplicator, scrub_pii
from gptforge.data.datadir import load_data_dir
from gptforge.data.prepare import prepare, run_prepare
from gptforge.data.split import doc_hash
from gptforge.data.shards import open_shard
from gptforge.errors import ConfigError, DataError

TOPIC = ("the bread dough rises slowly when the kitchen is warm and the yeast is fresh so bakers knead it "
         "gently fold butter into flour add salt rest overnight shape loaves score crust bake oven steam").split()
INTRO = "Preheat the oven and dust the counter with flour before you start."


def write_docs(folder: Path, texts: list[str]) -> list[str]:
    """One file per text; returns their locations as prepare reports them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"doc{i:03d}.txt" for i in range(len(texts))]
    for path, text in zip(paths, texts):
        path.write_text(text, encoding="utf-8")
    return [str(path) for path in paths]


def stored(data_dir: Path) -> dict[str, list[str]]:
    """The documents of each split, decoded (prepared with the bytes tokenizer)."""
    data = load_data_dir(data_dir)
    splits = {}
    for split in ("train", "val"):
        tokens = np.concatenate([open_shard(info.path) for info in getattr(data, split)]).tolist()
        texts, start = [], 0
        for i, token in enumerate(tokens):
            if token == data.tokenizer.eot_id:
                texts.append(data.tokenizer.decode(tokens[start:i]))
                start = i + 1
        splits[split] = texts
    return splits


def run(folder: Path, out: Path, **options) -> dict:
    """prepare with bytes; the split (data/split.py) is tested on its own, so by default it keeps these small
    corpora's documents whole: no val share asked, one document moved to val."""
    return prepare([str(folder)], out, tokenizer="bytes", progress=False, **{"val_fraction": 0.0, **options})


def recipe(seed: int, words: int = 300) -> str:
    """A document about baking: the shared opening line, then words of the same topic in its own order."""
    rng = random.Random(seed)
    return INTRO + " " + " ".join(rng.choice(TOPIC) for _ in range(words)) + "."


def with_words_changed(text: str, n: int) -> str:
    words = text.split()
    for i in random.Random(0).sample(range(len(words)), n):
        words[i] = "zucchini"
    return " ".join(words)


def jaccard(a: str, b: str) -> float:
    """Exact Jaccard similarity of word 5-gram shingles, the quantity MinHash estimates."""
    def shingles(text):
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}

    a, b = shingles(a), shingles(b)
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------- deduplication


def test_exact_duplicates_up_to_whitespace_are_dropped_and_counted(tmp_path):
    texts = ["alpha beta gamma\n", "  alpha   beta\tgamma  ", "alpha beta\n\ngamma", "Alpha beta gamma", "delta"]
    locations = write_docs(tmp_path / "in", texts)
    manifest = run(tmp_path / "in", tmp_path / "out", dedup="exact")
    assert manifest["skipped"]["duplicate"] == 2
    assert manifest["skipped_examples"]["duplicate"] == locations[1:3]
    kept = stored(tmp_path / "out")
    assert sorted(kept["train"] + kept["val"]) == sorted([texts[0], texts[3], texts[4]])  # case matters


def test_deduplicator_modes():
    exact, near, none = Deduplicator("exact"), Deduplicator("near"), Deduplicator("none")
    assert [exact.seen(t) for t in ("a b", " a  b ", "a c")] == [None, "duplicate", None]
    assert [near.seen(t) for t in ("a b", "a\tb")] == [None, "duplicate"]  # near implies exact
    assert [none.seen(t) for t in ("a b", "a b")] == [None, None]
    assert (exact.reasons, near.reasons, none.reasons) == (("duplicate",), ("duplicate", "near_duplicate"), ())


def test_near_duplicates_are_dropped_while_same_topic_documents_survive(tmp_path):
    original = recipe(1)
    edited = with_words_changed(original, 3)
    others = [recipe(seed) for seed in range(2, 30)]
    assert jaccard(original, edited) > 0.9
    assert max(jaccard(original, other) for other in others) < 0.1  # same topic and first line, other text
    locations = write_docs(tmp_path / "in", [original, *others, edited])
    manifest = run(tmp_path / "in", tmp_path / "out", dedup="near")
    assert manifest["skipped"]["near_duplicate"] == 1 and manifest["skipped"]["duplicate"] == 0
    assert manifest["skipped_examples"]["near_duplicate"] == [locations[-1]]
    kept = stored(tmp_path / "out")
    assert sorted(kept["train"] + kept["val"]) == sorted([original, *others])
    exact_only = run(tmp_path / "in", tmp_path / "exact", dedup="exact")
    assert exact_only["skipped"]["duplicate"] == 0 and "near_duplicate" not in exact_only["skipped"]


def test_near_dedup_without_datasketch_says_how_to_install(tmp_path, monkeypatch):
    write_docs(tmp_path / "in", ["one"])
    monkeypatch.setitem(sys.modules, "datasketch", None)
    with pytest.raises(DataError, match=r"pip install gptforge\[curate\]"):
        run(tmp_path / "in", tmp_path / "out", dedup="near")
    assert not (tmp_path / "out").exists()


def test_a_duplicate_never_lands_in_both_train_and_val(tmp_path):
    texts = [f"document {i} about one thing" for i in range(60)]
    variants = [text.replace(" ", "  ") + "\n" for text in texts]  # same text, another hash for the split
    write_docs(tmp_path / "in", texts + variants)

    def normalized(split):
        return [" ".join(text.split()) for text in split]

    run(tmp_path / "in", tmp_path / "none", dedup="none", val_fraction=0.3)
    kept = stored(tmp_path / "none")
    assert set(normalized(kept["train"])) & set(normalized(kept["val"]))  # without dedup they straddle
    run(tmp_path / "in", tmp_path / "exact", dedup="exact", val_fraction=0.3)
    kept = stored(tmp_path / "exact")
    assert sorted(normalized(kept["train"] + kept["val"])) == sorted(texts)


def test_split_is_decided_on_the_scrubbed_text(tmp_path):
    texts = [f"write to user{i}@example.com about item {i}" for i in range(40)]
    write_docs(tmp_path / "in", texts)
    manifest = run(tmp_path / "in", tmp_path / "out", scrub_pii=True, val_fraction=0.3)
    scrubbed = [f"write to <EMAIL> about item {i}" for i in range(40)]
    assert manifest["split"]["method"] == "documents"
    threshold = manifest["split"]["threshold"]
    assert [doc_hash(t) < threshold for t in texts] != [doc_hash(t) < threshold for t in scrubbed]  # it matters
    kept = stored(tmp_path / "out")
    assert sorted(kept["val"]) == sorted(t for t in scrubbed if doc_hash(t) < threshold)
    assert manifest["pii_scrubbed"] == {"email": 40, "phone": 0, "secret": 0}


# ---------------------------------------------------------------- blocklist


def test_blocklist_drops_and_counts_with_locations(tmp_path):
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("# banned words\n\nforbidden\n  bad phrase  \nC++\n")
    texts = [
        "this is Forbidden text",  # any case
        "unforbiddenness is fine",  # whole words only
        "a bad\n   phrase across lines",  # any whitespace inside a phrase
        "I write c++ at work",  # terms ending in punctuation
        "clean document",
    ]
    locations = write_docs(tmp_path / "in", texts)
    manifest = run(tmp_path / "in", tmp_path / "out", blocklist=blocklist)
    assert manifest["skipped"]["blocklisted"] == 3
    assert manifest["skipped_examples"]["blocklisted"] == [locations[0], locations[2], locations[3]]
    kept = stored(tmp_path / "out")
    assert sorted(kept["train"] + kept["val"]) == [texts[4], texts[1]]
    assert Blocklist.from_file(blocklist).match("so FORBIDDEN.") == "FORBIDDEN"


@pytest.mark.parametrize("text, found", [
    ("FOO!", "FOO"), ("foobar", "foobar"), ("foo bar", "foo"), ("foo  bar\tbaz", "foo  bar\tbaz"),
    ("foob", None), ("foobarx", None), ("a x b", "x"), ("xx", None),
])
def test_blocklist_terms_sharing_a_prefix(text, found):
    assert Blocklist(["foo", "foobar", "foo bar baz", "x"]).match(text) == found


def test_blocklist_file_problems_are_named(tmp_path):
    write_docs(tmp_path / "in", ["one"])
    with pytest.raises(DataError, match=r"--blocklist .*nope\.txt: no such file"):
        run(tmp_path / "in", tmp_path / "out", blocklist=tmp_path / "nope.txt")
    (tmp_path / "comments.txt").write_text("# only a comment\n\n")
    with pytest.raises(DataError, match=r"comments\.txt: no terms; expected one term or phrase per line"):
        run(tmp_path / "in", tmp_path / "out", blocklist=tmp_path / "comments.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comments.txt", "in"]


# ---------------------------------------------------------------- PII


@pytest.mark.parametrize("text, scrubbed, kind", [
    ("Write to jane.doe@example.com today.", "Write to <EMAIL> today.", "email"),
    ("Contact: J.Smith+news@mail.example.co.uk", "Contact: <EMAIL>", "email"),
    ("Call +1 (415) 555-2671 now", "Call <PHONE> now", "phone"),
    ("London office: +44 20 7946 0958.", "London office: <PHONE>.", "phone"),
    ("US: 415-555-2671 or (415) 555 2671", "US: <PHONE> or <PHONE>", "phone"),
    ("UK mobile 07700 900123, Paris 01 23 45 67 89, Munich 089/12345678", "UK mobile <PHONE>, Paris <PHONE>, "
     "Munich <PHONE>", "phone"),
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "aws_access_key_id = <SECRET>", "secret"),
    ("OPENAI_API_KEY=sk-proj-4f9Qa7Lw2Zx8Rt6Yp1Mn3Bv5", "OPENAI_API_KEY=<SECRET>", "secret"),
    ("token ghp_" + "a1B2" * 9 + " leaked", "token <SECRET> leaked", "secret"),
    ('api_key = "f3a9c2e7d1b8"', 'api_key = "<SECRET>"', "secret"),
    ('DB_PASSWORD: "correct-horse-battery"', 'DB_PASSWORD: "<SECRET>"', "secret"),
    ("key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2Kx\n"
     "bTn+9oE2wVnDk8xZ1Y0=\n-----END RSA PRIVATE KEY-----\nend", "key:\n<SECRET>\nend", "secret"),
])
def test_scrub_pii_replaces_each_kind_in_prose(text, scrubbed, kind):
    result, counts = scrub_pii(text)
    assert result == scrubbed
    assert set(counts) == {kind} and counts[kind] == scrubbed.count(f"<{kind.upper()}>")


@pytest.mark.parametrize("code", [
    'version = "1.2.3"',
    "mask = 0xDEADBEEF",
    "x = 5551234 + y * 3",
    "big = +4294967296",  # a signed integer, not a phone number
    'ip, day, clock = "192.168.1.100", "2023-10-05", "01:23:45"',
    "when = '01-01-1980 00:00:00'",
    "uuid = '123e4567-e89b-12d3-a456-426614174000'",
    "row = 123 456 7890 1234",  # a table of numbers
    "y = x@w.weight + q@k.mT",  # matrix products, not addresses
    "@dataclass\nclass Config:\n    token = 'abc'",
    'password = "short"',  # too short to be a real secret
    "password = os.environ['DB_PASSWORD']",
    'PEM_HEADER = "-----BEGIN PRIVATE KEY-----"',  # no key material
    "sk-learn and sk-image-processing",
])
def test_scrub_pii_leaves_ordinary_code_alone(code):
    assert scrub_pii(code) == (code, Counter())


def test_scrubbed_documents_are_kept_and_counted(tmp_path):
    texts = ["mail a@example.org or b@example.org", "phone +44 20 7946 0958", 'password = "hunter2hunter2"', "plain",
             "mail c@example.org or d@example.org"]  # the same text once scrubbed: a duplicate, not counted
    write_docs(tmp_path / "in", texts)
    manifest = run(tmp_path / "in", tmp_path / "out", scrub_pii=True, dedup="exact")
    assert manifest["skipped"]["duplicate"] == 1
    assert manifest["pii_scrubbed"] == {"email": 2, "phone": 1, "secret": 1}
    kept = stored(tmp_path / "out")
    assert sorted(kept["train"] + kept["val"]) == sorted(
        ["mail <EMAIL> or <EMAIL>", "phone <PHONE>", 'password = "<SECRET>"', "plain"]
    )


# ---------------------------------------------------------------- manifest, options, command line


def test_manifest_records_the_switches(tmp_path):
    write_docs(tmp_path / "in", ["one document", "another document"])
    (tmp_path / "block.txt").write_text("nothing\n")
    manifest = run(tmp_path / "in", tmp_path / "all", dedup="near", near_dup_threshold=0.9,
                   blocklist=tmp_path / "block.txt", scrub_pii=True)
    assert manifest["curation"] == {"dedup": "near", "near_dup_threshold": 0.9,
                                    "blocklist": str(tmp_path / "block.txt"), "scrub_pii": True}
    assert {"duplicate", "near_duplicate", "blocklisted"} <= set(manifest["skipped"])
    assert manifest["pii_scrubbed"] == {"email": 0, "phone": 0, "secret": 0}
    plain = run(tmp_path / "in", tmp_path / "plain")  # the library's default: no curation
    assert plain["curation"] == {"dedup": "none", "near_dup_threshold": None, "blocklist": None, "scrub_pii": False}
    assert plain["pii_scrubbed"] is None
    assert not {"duplicate", "near_duplicate", "blocklisted"} & set(plain["skipped"])


@pytest.mark.parametrize("options, message", [
    ({"dedup": "fuzzy"}, "--dedup must be one of none, exact, near"),
    ({"near_dup_threshold": 1.5}, r"--near-dup-threshold must be in \(0, 1\)"),
])
def test_bad_curation_options_are_config_errors(tmp_path, options, message):
    write_docs(tmp_path / "in", ["one"])
    with pytest.raises(ConfigError, match=message):
        run(tmp_path / "in", tmp_path / "out", **options)


def test_cli_deduplicates_by_default_and_summarizes_curation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    write_docs(tmp_path / "in", ["same text", "same  text", "mail me: a@example.org", "other text"])
    args = build_parser().parse_args(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--tokenizer", "bytes",
                              "--scrub-pii"])
    assert (args.dedup, args.near_dup_threshold, args.blocklist) == ("exact", 0.85, None)
    assert run_prepare(args) == 0
    out = capsys.readouterr().out
    assert "dedup exact, blocklist none, PII scrubbing on" in out
    assert "1 email, 0 phone, 0 secret" in out
    assert "skipped: duplicate" in out and "doc001.txt" in out
