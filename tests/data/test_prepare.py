"""`prepare`: input discovery, every bad-input case, the train/val split, atomic output,
determinism, the command line, and the built-in corpus."""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gptforge.cli import build_parser
from gptforge.data import corpus
from gptforge.data import prepare as prepare_module
from gptforge.data.datadir import load_data_dir
from gptforge.data.split import doc_hash
from gptforge.data.prepare import (
    OutputExistsError,
    builtin_data_dir,
    prepare,
    run_prepare,
)
from gptforge.data.shards import open_shard
from gptforge.data.tokenizer import EOT, Tokenizer
from gptforge.errors import ConfigError, DataError

GOOD_FILES = {
    "notes.txt": "plain text notes\nwith two lines\n",
    "src/module.py": "def add(a, b):\n\treturn a + b\n",
    "docs/readme.md": "# Title\n\nSome *markdown* with emoji 🙂\r\n",
}
JSONL_GOOD = ["first json document", "second json document"]
PARQUET_GOOD = ["parquet one", "parquet two"]
GOOD_DOCUMENTS = set(GOOD_FILES.values()) | set(JSONL_GOOD) | set(PARQUET_GOOD)


def write_parquet(path: Path, **columns) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path)


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A folder with every supported format and every kind of bad input."""
    root = tmp_path / "corpus"
    for name, text in GOOD_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    (root / "docs.jsonl").write_bytes(b"\n".join([
        json.dumps({"text": JSONL_GOOD[0]}).encode(),  # 1
        b'{"text": 42}',  # 2 non_string_field
        b'{"title": "no text"}',  # 3 missing_field
        b'["not", "an", "object"]',  # 4 missing_field
        b"",  # 5 blank: a separator, not a document
        b'{"text": "   "}',  # 6 empty
        b'{"text": "lone surrogate \\ud800"}',  # 7 invalid_utf8
        json.dumps({"text": JSONL_GOOD[1]}).encode(),  # 8
        b'{"text": "latin-1 \xe9"}',  # 9 invalid_utf8
        b'{"text": "truncated',  # 10 malformed_json
        b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # 11 too_deep: RecursionError in json
    ]))
    (root / "empty.jsonl").write_bytes(b"")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text("  \n\t\n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (root / "latin1.txt").write_bytes(b"caf\xe9")
    (root / "dangling.txt").symlink_to(root / "nowhere")
    os.mkfifo(root / "pipe.txt")  # opening it would block until a writer comes: forever
    (root / "zeros.txt").symlink_to("/dev/zero")  # reading it never ends
    write_parquet(root / "data.parquet", text=["parquet one", None, "", "parquet two"])
    write_parquet(root / "nocol.parquet", body=["text in the wrong column"])
    write_parquet(root / "ints.parquet", text=[1, 2])
    (root / "broken.parquet").write_bytes(b"not parquet at all")
    for ignored in (".git/config", "__pycache__/module.cpython-311.pyc", ".hidden.txt"):
        (root / ignored).parent.mkdir(exist_ok=True)
        (root / ignored).write_text("never read")
    return root


def documents(data_dir: Path, split: str) -> list[str]:
    """The documents of one split, cut at EOT ids (not at the text "<|endoftext|>")."""
    data = load_data_dir(data_dir)
    tokens = np.concatenate([open_shard(info.path) for info in getattr(data, split)]).tolist()
    assert tokens[-1] == data.tokenizer.eot_id
    texts, start = [], 0
    for i, token in enumerate(tokens):
        if token == data.tokenizer.eot_id:
            texts.append(data.tokenizer.decode(tokens[start:i]))
            start = i + 1
    return texts


def write_docs(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return folder


def small(**kwargs) -> dict:
    return {"vocab_size": 300, "progress": False, **kwargs}


def test_mixed_inputs_count_every_skip_with_locations(mixed, tmp_path):
    manifest = prepare([str(mixed)], tmp_path / "out", **small(val_fraction=0.0))  # one val document: the counts stay per document
    assert manifest["skipped"] == {
        "not_regular": 2, "empty": 5, "binary": 1, "invalid_utf8": 3, "malformed_json": 1, "too_long": 0,
        "too_deep": 1, "missing_field": 4, "non_string_field": 3, "unreadable": 2,
    }
    examples = {reason: set(locations) for reason, locations in manifest["skipped_examples"].items()}
    assert examples == {
        "not_regular": {f"{mixed}/pipe.txt", f"{mixed}/zeros.txt"},
        "empty": {f"{mixed}/empty.txt", f"{mixed}/blank.md", f"{mixed}/docs.jsonl:6",
                  f"{mixed}/data.parquet:row 3", f"{mixed}/empty.jsonl"},
        "binary": {f"{mixed}/image.png"},
        "invalid_utf8": {f"{mixed}/latin1.txt", f"{mixed}/docs.jsonl:7", f"{mixed}/docs.jsonl:9"},
        "malformed_json": {f"{mixed}/docs.jsonl:10"},
        "too_long": set(),
        "too_deep": {f"{mixed}/docs.jsonl:11"},
        "missing_field": {f"{mixed}/docs.jsonl:3", f"{mixed}/docs.jsonl:4", f"{mixed}/data.parquet:row 2",
                          f"{mixed}/nocol.parquet"},
        "non_string_field": {f"{mixed}/docs.jsonl:2", f"{mixed}/ints.parquet:row 1", f"{mixed}/ints.parquet:row 2"},
        "unreadable": {f"{mixed}/dangling.txt", f"{mixed}/broken.parquet"},
    }
    assert manifest["stats"]["files"] == 16  # hidden entries and __pycache__ are not read
    assert manifest["stats"]["short_documents"] == len(GOOD_DOCUMENTS)
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(GOOD_DOCUMENTS)
    out = tmp_path / "out"
    assert set(documents(out, "train")) | set(documents(out, "val")) == GOOD_DOCUMENTS
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_manifest_describes_the_output(mixed, tmp_path):
    manifest = prepare([str(mixed)], tmp_path / "out", **small())
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer.json", "train_000000.bin",
                                                     "val_000000.bin"]
    assert (manifest["format"], manifest["format_version"], manifest["inputs"]) == ("gptforge-data", 1, [str(mixed)])
    tok = Tokenizer.load(out / "tokenizer.json")
    assert manifest["tokenizer"] == {"kind": "bpe", "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                                     "eot_id": tok.eot_id}
    for split in ("train", "val"):
        (shard,) = manifest["splits"][split]["shards"]
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
        assert shard["tokens"] == manifest["splits"][split]["tokens"] > 0
    assert manifest["stats"]["bytes"] > 0 and manifest["stats"]["elapsed_s"] >= 0


def test_literal_end_of_text_inside_documents_is_not_a_boundary(tmp_path):
    texts = [f"see {EOT} here", "plain", f"{EOT}"]
    write_docs(tmp_path / "in", texts)
    prepare([str(tmp_path / "in")], tmp_path / "out", **small(val_fraction=0.0))  # documents whole
    assert sorted(documents(tmp_path / "out", "train") + documents(tmp_path / "out", "val")) == sorted(texts)


def test_nothing_usable_is_a_data_error_listing_the_skips(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_text("")
    (tmp_path / "in" / "blob.bin").write_bytes(b"\0\1\2")
    with pytest.raises(DataError, match=r"no usable documents in 2 input files: empty 1 \(e\.g\. .*empty\.txt\); "
                                        r"binary 1"):
        prepare([str(tmp_path / "in")], tmp_path / "out", **small())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["prepare", *argv])


def test_cli_nothing_usable_exits_nonzero_without_traceback(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("   ")
    assert run_prepare(parse([str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")])) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith("gptforge prepare: error: no usable documents")
    assert "Traceback" not in captured.err + captured.out


def test_cli_prints_a_summary(mixed, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line, whatever the path lengths
    args = parse([str(mixed), "--out", str(tmp_path / "out"), "--vocab-size", "300", "--val-fraction", "0.1"])
    assert (args.tokenizer, args.text_field, args.shard_tokens, args.force) == (None, "text", 100_000_000, False)  # None: bpe for text, the base tokenizer for chat
    assert run_prepare(args) == 0
    out = capsys.readouterr().out
    assert "Prepared" in out and "skipped: malformed_json" in out and "docs.jsonl:10" in out
    assert run_prepare(parse([str(mixed), "--out", str(tmp_path / "q"), "--quiet", "--tokenizer", "bytes"])) == 0
    assert capsys.readouterr().out.strip().endswith("val tokens")


def test_progress_is_silent_when_stdout_is_not_a_terminal(tmp_path, capsys):
    write_docs(tmp_path / "in", ["one document", "another"])
    prepare([str(tmp_path / "in")], tmp_path / "out", vocab_size=300, progress=True)
    assert capsys.readouterr().out == ""


def is_val(text: str, manifest: dict) -> bool:
    assert manifest["split"]["method"] == "documents"
    return doc_hash(text) < manifest["split"]["threshold"]


def test_split_follows_content_hash(tmp_path):
    texts = [f"document number {i}\n" * 3 for i in range(40)]
    write_docs(tmp_path / "in", texts + texts)  # every document twice
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", **small(tokenizer="bytes", val_fraction=0.3))
    train, val = documents(tmp_path / "out", "train"), documents(tmp_path / "out", "val")
    assert sorted(val) == sorted(2 * [t for t in texts if is_val(t, manifest)]) and val
    assert not set(train) & set(val)


def test_doc_hash_is_blake2b_of_the_text():
    for text in ["a", "b", "ünïcode", "x" * 1000]:
        assert doc_hash(text) == int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def test_a_few_documents_are_each_cut_at_a_line(tmp_path):
    texts = [f"first line of {name}\nsecond line of {name}\nthird line\n" for name in ("one", "two", "three")]
    write_docs(tmp_path / "in", texts)
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", **small(tokenizer="bytes", val_fraction=0.3))
    assert manifest["split"]["method"] == "inside_documents" and manifest["split"]["boundaries"]["line"] == 3
    train, val = documents(tmp_path / "out", "train"), documents(tmp_path / "out", "val")
    assert sorted(head + tail for head, tail in zip(train, val)) == sorted(texts)  # the cut loses nothing
    assert all(head.endswith("\n") for head in train) and all(tail == "third line\n" for tail in val)


def test_no_val_asked_still_gets_a_val_document(tmp_path):
    texts = ["first small document", "second small document", "third small document"]
    write_docs(tmp_path / "in", texts)
    splits = prepare([str(tmp_path / "in")], tmp_path / "out", **small(val_fraction=0.0))["splits"]
    assert (splits["train"]["documents"], splits["val"]["documents"]) == (2, 1)
    assert documents(tmp_path / "out", "val") == [texts[-1]]


@pytest.mark.parametrize("text, parts", [("abcdefghijklmnopqrst", ("abcdefghijklmnopqr", "st")),
                                         ("two words", ("two", " words"))])
def test_single_document_is_cut_ninety_ten(tmp_path, text, parts):
    (tmp_path / "one.txt").write_text(text)
    manifest = prepare([str(tmp_path / "one.txt")], tmp_path / "out", **small(tokenizer="bytes"))
    assert manifest["split"]["method"] == "inside_documents" and manifest["split"]["target_share"] == 0.1
    data = load_data_dir(tmp_path / "out")
    assert open_shard(data.train[0].path).tolist() == list(parts[0].encode()) + [256]
    assert open_shard(data.val[0].path).tolist() == list(parts[1].encode()) + [256]


def test_a_one_character_document_is_cut_between_its_tokens(tmp_path):
    (tmp_path / "one.txt").write_text("a")
    manifest = prepare([str(tmp_path / "one.txt")], tmp_path / "out", **small(tokenizer="bytes"))
    assert (manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]) == (1, 1)


def test_prepare_is_deterministic(mixed, tmp_path):
    first = prepare([str(mixed)], tmp_path / "a", **small(shard_tokens=40))
    second = prepare([str(mixed)], tmp_path / "b", **small(shard_tokens=40))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for manifest in (first, second):
        del manifest["created"], manifest["stats"]["elapsed_s"]
    assert first == second


def test_shards_are_capped_at_shard_tokens(tmp_path):
    write_docs(tmp_path / "in", [f"document {i} " * 10 for i in range(12)])
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", **small(tokenizer="bytes", shard_tokens=100))
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["tokens"] <= 100 for s in shards)
    assert [s["file"] for s in shards] == [f"train_{i:06d}.bin" for i in range(len(shards))]
    train = load_data_dir(tmp_path / "out").train
    assert sum(info.num_tokens for info in train) == manifest["splits"]["train"]["tokens"]


@pytest.mark.parametrize("target, exception", [("SplitWriter.flush", RuntimeError), ("sha256_file", KeyboardInterrupt)])
def test_interrupted_prepare_leaves_no_data_dir(mixed, tmp_path, monkeypatch, target, exception):
    def fail(*args, **kwargs):
        raise exception("interrupted")

    monkeypatch.setattr(f"gptforge.data.prepare.{target}", fail)
    with pytest.raises(exception):
        prepare([str(mixed)], tmp_path / "out", **small())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_existing_output_is_refused_unless_forced(mixed, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists and is not empty; pass --force"):
        prepare([str(mixed)], out, **small())
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    prepare([str(mixed)], out, **small(force=True))
    assert not (out / "precious.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_existing_empty_output_dir_is_used(mixed, tmp_path):
    (tmp_path / "out").mkdir()
    prepare([str(mixed)], tmp_path / "out", **small())
    assert load_data_dir(tmp_path / "out").train


def test_output_inside_the_input_is_not_read_back(mixed, tmp_path):
    first = prepare([str(mixed)], mixed / "prepared", **small())
    second = prepare([str(mixed)], mixed / "prepared", **small(force=True))
    assert first["stats"]["files"] == second["stats"]["files"] == 16


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file or directory"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "out", **small())
    with pytest.raises(DataError, match=r"nothing/\*\.txt: the pattern matches no files"):
        prepare([str(tmp_path / "nothing" / "*.txt")], tmp_path / "out", **small())


def test_glob_patterns_are_expanded_recursively(mixed, tmp_path):
    manifest = prepare([f"{mixed}/**/*.md", f"{mixed}/src/*.py", f"{mixed}/**/*.py"], tmp_path / "out", **small())
    assert manifest["stats"]["files"] == 3  # blank.md, docs/readme.md, src/module.py (once)
    assert manifest["skipped"]["empty"] == 1


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"pip install gptforge\[parquet\]"):
        prepare([str(tmp_path / "x.parquet")], tmp_path / "out", **small())
    assert not (tmp_path / "out").exists()


def test_text_field_and_column_are_configurable(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "from jsonl"}\n{"body": "again"}\n')
    write_parquet(tmp_path / "b.parquet", content=["from parquet"])
    manifest = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], tmp_path / "out",
                       **small(text_field="body", text_column="content", val_fraction=0.0))
    assert sum(s["documents"] for s in manifest["splits"].values()) == 3


def test_bytes_and_pretrained_tokenizers(mixed, tmp_path):
    assert prepare([str(mixed)], tmp_path / "b", **small(tokenizer="bytes"))["tokenizer"]["kind"] == "bytes"
    saved = tmp_path / "tok"
    saved.mkdir()
    Tokenizer.bytes().save(saved / "tokenizer.json")
    manifest = prepare([str(mixed)], tmp_path / "p", **small(tokenizer=str(saved)))
    assert manifest["tokenizer"]["kind"] == "pretrained"
    assert manifest["tokenizer"]["sha256"] == Tokenizer.bytes().sha256
    assert (tmp_path / "b" / "train_000000.bin").read_bytes() == (tmp_path / "p" / "train_000000.bin").read_bytes()


def test_tokenizer_can_train_on_the_first_documents_only(mixed, tmp_path):
    manifest = prepare([str(mixed)], tmp_path / "out", **small(max_train_docs_for_tokenizer=1))
    assert manifest["tokenizer"]["kind"] == "bpe"
    assert manifest["splits"]["train"]["tokens"] > 0


@pytest.mark.parametrize("options, message", [
    ({"tokenizer": "gpt9"}, "expected 'bpe', 'bytes', or the path"),
    ({"vocab_size": 100}, "at least 257"),
    ({"val_fraction": 1.0}, r"\[0, 1\)"),
    ({"shard_tokens": 0}, "must be positive"),
])
def test_bad_options_are_config_errors(mixed, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        prepare([str(mixed)], tmp_path / "out", **{**small(), **options})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_damaged_shards_are_detected_through_the_manifest(mixed, tmp_path):
    out = tmp_path / "out"
    manifest = prepare([str(mixed)], out, **small())
    shard = out / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_000000\.bin: sha256 differs from manifest\.json"):
        load_data_dir(out)
    assert load_data_dir(out, verify_sha256=False).manifest["splits"] == manifest["splits"]
    manifest["splits"]["val"]["shards"][0]["tokens"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"val_000000\.bin: has \d+ tokens, manifest\.json says"):
        load_data_dir(out, verify_sha256=False)


def test_changed_tokenizer_json_is_detected(mixed, tmp_path):
    out = tmp_path / "out"
    prepare([str(mixed)], out, **small())
    Tokenizer.bytes().save(out / "tokenizer.json")
    with pytest.raises(DataError, match=r"tokenizer\.json: sha256 differs"):
        load_data_dir(out)


def test_stdlib_files_are_many_sorted_python_files():
    files = corpus.stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))
    assert corpus.cache_root() == tmp_path
    monkeypatch.delenv("GPTFORGE_CACHE")
    assert corpus.cache_root() == Path.home() / ".cache" / "gptforge"


def builtin_path(root: Path, suffix: str) -> Path:
    return root / "data" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{suffix}-v2"


def test_builtin_data_dir_prepares_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))
    calls = []

    def fake_prepare(inputs, out, **kwargs):
        calls.append((inputs, kwargs["tokenizer"], kwargs["vocab_size"]))
        Path(out).mkdir()
        (Path(out) / "manifest.json").write_text("{}")

    monkeypatch.setattr(prepare_module, "prepare", fake_prepare)
    assert builtin_data_dir(vocab_size=512, progress=False) == builtin_path(tmp_path, "bpe512")
    assert builtin_data_dir(vocab_size=512, progress=False) == builtin_path(tmp_path, "bpe512")
    assert builtin_data_dir("bytes", progress=False) == builtin_path(tmp_path, "bytes")
    assert calls == [([], "bpe", 512), ([], "bytes", 8192)]
    with pytest.raises(ConfigError, match="'bpe' or 'bytes'"):
        builtin_data_dir("gpt2")


def test_builtin_data_dir_uses_the_winner_of_a_race(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path))

    def lose_the_race(inputs, out, **kwargs):
        Path(out).mkdir()
        (Path(out) / "manifest.json").write_text("{}")  # another process finished first
        raise OutputExistsError(f"{out}: was created by someone else while preparing")

    monkeypatch.setattr(prepare_module, "prepare", lose_the_race)
    assert builtin_data_dir(progress=False) == builtin_path(tmp_path, "bpe8192")
    assert os.listdir(builtin_path(tmp_path, "bpe8192")) == ["manifest.json"]


# ---------------------------------------------------------------- what one document may cost


@pytest.fixture
def tiny_limits(monkeypatch):
    """Pieces of at most 100 characters, read 37 bytes at a time, JSONL lines of at most 200 bytes."""
    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 100)
    monkeypatch.setattr(corpus, "READ_BYTES", 37)
    monkeypatch.setattr(corpus, "MAX_LINE_BYTES", 200)


def read_all(path: Path, **kwargs) -> tuple[list[tuple[str, str]], corpus.Reader]:
    reader = corpus.Reader([path], **kwargs)
    return list(reader.documents()), reader


def test_a_long_text_file_is_cut_after_newlines_then_before_spaces_then_anywhere(tiny_limits, tmp_path):
    lines = "".join(f"line {i} of a file that goes on\n" for i in range(8))  # 30 characters a line
    words = " ".join(["word"] * 40)  # no newline: cut before a space
    run = "x" * 250  # no whitespace at all: cut at the limit
    text = lines + words + run + "\n"
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    docs, reader = read_all(path)
    pieces = [piece for piece, _ in docs]
    assert "".join(pieces) == text  # nothing lost, nothing added, in order
    assert all(0 < len(piece) <= 100 for piece in pieces)
    assert pieces[:2] == [lines[:90], lines[90:180]]  # three whole lines each
    assert [location for _, location in docs] == [str(path)] + [f"{path} part {i}" for i in range(2, len(docs) + 1)]
    assert any(piece.startswith(" word") for piece in pieces)
    assert "x" * 100 in pieces  # the run, cut where it had to be
    assert (reader.split_documents, reader.split_pieces, reader.split_examples) == (1, len(pieces), [str(path)])
    assert reader.bytes_done == len(text)


def test_only_the_first_piece_when_asked(tiny_limits, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("y" * 1000, encoding="utf-8")
    assert read_all(path, first_piece_only=True)[0] == [("y" * 100, str(path))]


def test_a_long_text_file_is_skipped_whole_when_any_part_is_bad(tiny_limits, tmp_path):
    (tmp_path / "late_latin1.txt").write_bytes("é".encode() * 300 + b"caf\xe9")
    (tmp_path / "nul.txt").write_bytes(b"\0" + b"a" * 500)
    (tmp_path / "spaces.txt").write_text(" \n\t" * 200)
    reader = corpus.Reader(sorted(tmp_path.iterdir()))
    assert list(reader.documents()) == []
    assert reader.skipped == {"invalid_utf8": 1, "binary": 1, "empty": 1}


def test_a_long_jsonl_or_parquet_text_is_cut_into_pieces(tiny_limits, tmp_path):
    text = "sentence after sentence. " * 6  # 150 characters
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": text}) + "\n")
    docs, reader = read_all(tmp_path / "docs.jsonl")
    assert "".join(piece for piece, _ in docs) == text and len(docs) == 2
    assert [location for _, location in docs] == [f"{tmp_path}/docs.jsonl:1", f"{tmp_path}/docs.jsonl:1 part 2"]
    write_parquet(tmp_path / "rows.parquet", text=[text, "short"])
    docs, reader = read_all(tmp_path / "rows.parquet")
    assert [piece for piece, _ in docs] == [*(piece for piece in corpus.pieces([text])), "short"]
    assert reader.split_documents == 1


def test_an_overlong_jsonl_line_is_skipped_and_counted_and_the_next_one_read(tiny_limits, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "before"}',
        json.dumps({"text": "z" * 5000}).encode(),  # 2: over 200 bytes, read past in chunks
        b'{"text": "after"}',
        b"not json",  # 4: line numbers still right after the skip
    ]) + b"\n")
    docs, reader = read_all(path)
    assert [piece for piece, _ in docs] == ["before", "after"]
    assert reader.skipped == {"too_long": 1, "malformed_json": 1}
    assert reader.examples == {"too_long": [f"{path}:2"], "malformed_json": [f"{path}:4"]}
    assert reader.bytes_done == path.stat().st_size


def test_non_regular_inputs_named_directly_are_skipped_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match=r"no usable documents in 2 input files: not_regular 2 \(e\.g\. .*pipe"):
        prepare([str(tmp_path / "pipe"), "/dev/zero"], tmp_path / "out", **small())


def test_the_manifest_and_summary_count_cut_documents(tiny_limits, tmp_path, capsys):
    write_docs(tmp_path / "in", ["short one", "long document " * 30])
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", **small(tokenizer="bytes", val_fraction=0.0))
    stats = manifest["stats"]
    assert (stats["split_documents"], stats["split_pieces"]) == (1, 5)
    assert stats["split_examples"] == [str(tmp_path / "in" / "doc001.txt")]
    texts = documents(tmp_path / "out", "train") + documents(tmp_path / "out", "val")
    assert sorted(texts) == sorted(["short one", *corpus.pieces(["long document " * 30])])
    prepare_module.Console(width=200).print(prepare_module.summary_table(manifest, tmp_path / "out"))
    assert "1 cut into 5 pieces" in capsys.readouterr().out


PEAK_RSS_CHILD = """
import resource, sys
from gptforge.data.prepare import prepare
prepare([sys.argv[1]], sys.argv[2], vocab_size=512, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_the_length_of_one_line(tmp_path):
    """One line of 2 MB and one of 8 MB (random words) cost the same memory; before pieces, the
    8 MB line took a gigabyte more. benchmarks/prepare_memory.py measures the 50 MB target."""
    import random
    import subprocess

    rng = random.Random(0)
    vocabulary = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    peaks = {}
    for mb in (2, 8):
        folder = tmp_path / f"in{mb}"
        folder.mkdir()
        with open(folder / "line.txt", "w") as f:
            while f.tell() < mb * 1_000_000:
                f.write(" ".join(rng.choices(vocabulary, k=10_000)) + " ")
        child = subprocess.run(
            [sys.executable, "-c", PEAK_RSS_CHILD, str(folder), str(tmp_path / f"out{mb}")],
            capture_output=True, text=True, check=True, timeout=300,
        )
        peaks[mb] = int(child.stdout.split()[-1]) / 1024  # MB (ru_maxrss is in KB on Linux)
    assert peaks[8] - peaks[2] < 100, peaks


def test_stale_temporary_folders_of_dead_prepares_are_removed(mixed, tmp_path):
    import subprocess

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid is now free: the prepare that used it is dead
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".out.tmp-{finished.pid}", f".out.old-{finished.pid}", f".out.tmp-{alive.pid}",
                 ".out.tmp-notapid", f".other.tmp-{finished.pid}"]
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "train_000000.bin").write_bytes(b"partial")
        prepare([str(mixed)], tmp_path / "out", **small())
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert left == sorted([f".out.tmp-{alive.pid}", ".out.tmp-notapid", f".other.tmp-{finished.pid}"])
    finally:
        alive.kill()
        alive.wait()
