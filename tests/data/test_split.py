"""The val split aims at a share of the tokens: whole documents where the corpus has enough, cuts at a line
boundary where it has not, the same every run and with any number of tokenizer threads."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gptforge.data import split
from gptforge.data.datadir import load_data_dir
from gptforge.data.prepare import prepare, summary_table
from gptforge.data.shards import open_shard
from gptforge.data.split import SplitPlanner, cut_point, target_share

from test_prepare import documents, write_docs  # this folder is on sys.path, as for every test file

EOT = 256  # the bytes tokenizer's end-of-text id


def lines(n: int, seed: int, words: int = 12) -> str:
    """n lines of words drawn from a small vocabulary, different for each seed."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{seed % 7}{i}" for i in range(50)]
    return "".join(" ".join(rng.choice(vocab, size=rng.integers(2, words))) + "\n" for _ in range(n))


def prepared(tmp_path, texts, **options):
    write_docs(tmp_path / "in", texts)
    manifest = prepare([str(tmp_path / "in")], tmp_path / "out", tokenizer="bytes", progress=False, **options)
    share = manifest["splits"]["val"]["tokens"] / sum(s["tokens"] for s in manifest["splits"].values())
    return manifest, share


# ---------------------------------------------------------------- the rules


def test_a_later_piece_is_known_by_its_location():
    from gptforge.data.corpus import is_later_piece

    assert is_later_piece("data/big.txt part 2") and is_later_piece("a part b.txt part 13")
    assert not is_later_piece("data/big.txt") and not is_later_piece("data/x part 1") \
        and not is_later_piece("notes part two.txt")


@pytest.mark.parametrize("tokens, share", [
    (100e6, 0.005),  # a large corpus: the default share already holds 200 windows of 1024
    (10e6, 200 * 1024 / 10e6),  # a middling one: raised to 200 windows
    (1e6, 0.10),  # a small one: capped at a tenth
])
def test_the_default_target(tokens, share):
    assert target_share(None, tokens) == pytest.approx(share)
    assert target_share(0.02, tokens) == 0.02  # an explicit share is kept


@pytest.mark.parametrize("text, at, cut, kind", [
    ("aaaa\nbbbb\ncccc\n", 0.9, 10, "line"),  # just after the nearest line break
    ("aaaa\nbbbb\ncccc\n", 0.5, 5, "line"),
    ("one two three four", 0.75, 13, "space"),  # no line break: before the nearest space
    ("abcdefghij", 0.9, 9, "char"),
    ("ab", 0.9, 1, "char"),  # something on both sides
    ("a", 0.9, None, "char"),
])
def test_cut_point(text, at, cut, kind):
    assert cut_point(text, at) == (cut, kind)


def test_the_planner_has_bounded_memory_and_counts_pieces_with_their_document():
    planner = SplitPlanner()
    planner.add("first piece of a long document")
    planner.add("second piece", continues=True)
    assert planner.chars.nbytes == 8 << split.BUCKET_BITS and planner.total_chars == 42 and planner.documents == 1
    assert planner.chars[split.doc_hash("first piece of a long document") >> (64 - split.BUCKET_BITS)] == 42


# ---------------------------------------------------------------- corpora of every shape


def test_one_document_is_cut_at_a_line_ninety_ten(tmp_path):
    text = lines(300, seed=1)
    manifest, share = prepared(tmp_path, [text])
    assert manifest["split"]["method"] == "inside_documents" and manifest["split"]["boundaries"]["line"] == 1
    assert share == pytest.approx(0.10, abs=0.01)  # within a line of the target
    data = load_data_dir(tmp_path / "out")
    head, tail = (bytes(open_shard(s.path)[:-1].tolist()).decode() for s in (data.train[0], data.val[0]))
    assert head + tail == text and head.endswith("\n")  # nothing lost, and the cut is the recorded boundary


def test_three_documents_are_each_cut(tmp_path):
    texts = [lines(n, seed) for seed, n in enumerate((40, 200, 90))]
    manifest, share = prepared(tmp_path, texts)
    assert manifest["split"]["method"] == "inside_documents" and manifest["split"]["boundaries"]["line"] == 3
    assert share == pytest.approx(0.10, rel=0.2)
    train, val = documents(tmp_path / "out", "train"), documents(tmp_path / "out", "val")
    assert sorted(h + t for h, t in zip(train, val)) == sorted(texts)


def uneven(n: int, seed: int = 0) -> list[str]:
    """n documents with sizes spread over two orders of magnitude, as a folder of help files."""
    rng = np.random.default_rng(seed)
    return [lines(int(rng.lognormal(3.0, 1.0)) + 1, seed=1000 * seed + i) for i in range(n)]


def test_151_uneven_documents_stay_whole_and_val_gets_its_share(tmp_path):
    texts = uneven(151)
    manifest, share = prepared(tmp_path, texts)
    target = manifest["split"]["target_share"]
    assert manifest["split"]["method"] == "documents"
    assert target / 2 <= share <= split.OVER * target and share >= 0.01  # the stated tolerance
    train, val = set(documents(tmp_path / "out", "train")), set(documents(tmp_path / "out", "val"))
    assert not train & val and train | val == set(texts)  # whole documents, each on one side
    assert manifest["split"]["val_share"] == pytest.approx(share, abs=1e-6)


def test_10000_small_documents_hit_the_share_closely(tmp_path):
    texts = [f"note {i}: " + lines(1, seed=i, words=6) for i in range(10_000)]
    manifest, share = prepared(tmp_path, texts, val_fraction=0.05)
    assert manifest["split"]["method"] == "documents"
    assert share == pytest.approx(0.05, rel=0.05)
    assert not set(documents(tmp_path / "out", "train")) & set(documents(tmp_path / "out", "val"))


def test_identical_documents_land_on_one_side(tmp_path):
    texts = uneven(60, seed=3)
    manifest, _ = prepared(tmp_path, texts + texts[:20], val_fraction=0.2, dedup="none")
    train, val = documents(tmp_path / "out", "train"), documents(tmp_path / "out", "val")
    assert manifest["split"]["method"] == "documents" and not set(train) & set(val)


def test_the_manifest_and_summary_state_the_val_size_in_windows(tmp_path):
    manifest, _ = prepared(tmp_path, uneven(151))
    record = manifest["split"]
    val = manifest["splits"]["val"]["tokens"]
    assert record["val_windows"] == {"256": val // 256, "1024": val // 1024}
    assert record["short_of_min_windows_by"] == max(0, 200 * 1024 - val) > 0  # a small corpus: said so
    from rich.console import Console

    console = Console(record=True, width=300)
    console.print(summary_table(manifest, tmp_path / "out"))
    text = console.export_text()
    assert f"{val // 256:,} windows of 256" in text and "whole documents" in text
    assert f"{record['short_of_min_windows_by']:,} tokens short of 200 windows of 1024" in text


# ---------------------------------------------------------------- the same every time


def test_the_split_is_the_same_every_run_and_with_one_tokenizer_thread(tmp_path):
    """BPE tokenizer and split, in this process and in a fresh one limited to one thread: same bytes."""
    write_docs(tmp_path / "in", uneven(151, seed=5))
    options = dict(vocab_size=300, progress=False)
    prepare([str(tmp_path / "in")], tmp_path / "a", **options)
    prepare([str(tmp_path / "in")], tmp_path / "b", **options)
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "gptforge", "prepare", str(tmp_path / "in"), "--out", str(tmp_path / "c"),
                    "--vocab-size", "300", "--quiet"], check=True, env=env, capture_output=True, timeout=300)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in "abc"]
    for manifest in manifests[1:]:
        assert manifest["splits"] == manifests[0]["splits"]  # every shard's sha256
        assert manifest["split"] == manifests[0]["split"] and manifest["tokenizer"] == manifests[0]["tokenizer"]


# ---------------------------------------------------------------- training says when val is too small


def test_train_warns_when_val_has_fewer_windows_than_eval_tokens_asks(tmp_path, capsys):
    from gptforge.cli import main

    write_docs(tmp_path / "in", uneven(151))
    prepare([str(tmp_path / "in")], tmp_path / "data", tokenizer="bytes", progress=False, val_fraction=0.02)
    code = main(["train", f"data.dir={tmp_path / 'data'}", f"run.dir={tmp_path / 'run'}", "model.preset=tiny",
                 "train.max_steps=1", "train.samples=0", "eval.tokens=1000000", "run.tensorboard=false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "fewer than the 15625 that eval.tokens=1,000,000 asks for" in out and "--val-fraction" in out


def test_the_pieces_of_a_long_document_follow_its_first(tmp_path, monkeypatch):
    from gptforge.data import corpus

    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 100)  # every document below comes in several pieces
    monkeypatch.setattr(corpus, "READ_BYTES", 37)
    texts = [f"document {i}: " + lines(20, seed=i, words=5) for i in range(40)]
    manifest, _ = prepared(tmp_path, texts, val_fraction=0.2)
    assert manifest["split"]["method"] == "documents" and manifest["stats"]["split_pieces"] > 40
    train, val = "".join(documents(tmp_path / "out", "train")), "".join(documents(tmp_path / "out", "val"))
    for text in texts:  # each document whole on one side
        assert (text[:50] in train) != (text[:50] in val) and text[-30:] in (train if text[:50] in train else val)
