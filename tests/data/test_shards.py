"""Shard files: the llm.c header layout, its uint32 extension, streaming writes, damage detection,
and loading data dirs written by llm.c / modded-nanogpt."""

import numpy as np
import pytest

from gptforge.data.datadir import load_data_dir
from gptforge.data.shards import ShardWriter, find_shards, open_shard, read_header, write_shard
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import DataError


def llmc_write_datafile(path, tokens, magic=20240520, version=1, dtype=np.uint16):
    """What llm.c's dev/data/data_common.py `write_datafile` does, byte for byte."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=dtype).tobytes())


def test_uint16_shard_round_trip_and_header_layout(tmp_path):
    tokens = np.array([0, 1, 50256, 65535], dtype=np.int64)
    write_shard(tmp_path / "s.bin", tokens, vocab_size=65536)
    header = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=256)
    assert header[:4].tolist() == [20240520, 1, 4, 65536] and not header[4:].any()
    info = read_header(tmp_path / "s.bin")
    assert (info.num_tokens, info.dtype, info.vocab_size) == (4, np.dtype("<u2"), 65536)
    assert open_shard(tmp_path / "s.bin").tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_large_vocabularies_use_uint32(tmp_path):
    tokens = [0, 65536, 128255]
    write_shard(tmp_path / "s.bin", np.array(tokens), vocab_size=128256)
    header = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=4)
    assert header.tolist() == [20240801, 7, 3, 128256]
    assert read_header(tmp_path / "s.bin").dtype == np.dtype("<u4")
    assert open_shard(tmp_path / "s.bin").tolist() == tokens


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must lie in"):
        write_shard(tmp_path / "s.bin", np.array([5, 300]), vocab_size=300)
    with pytest.raises(ValueError, match="must lie in"):
        ShardWriter(tmp_path, "train", vocab_size=300).add([-1])


def test_empty_shard_opens_as_empty_array(tmp_path):
    write_shard(tmp_path / "s.bin", np.array([], dtype=np.int64), vocab_size=300)
    assert open_shard(tmp_path / "s.bin").shape == (0,)


def test_truncated_shard_is_named_with_expected_size(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100), vocab_size=300)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train_000000\.bin: truncated: header says 100 tokens \(1224 bytes\) "
                                        r"but file has 1214 bytes"):
        read_header(path)


def test_trailing_bytes_short_files_and_bad_magic_are_refused(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(10), vocab_size=300)
    path.write_bytes(path.read_bytes() + b"xx")
    with pytest.raises(DataError, match="trailing bytes"):
        read_header(path)
    path.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="too short for a shard header"):
        read_header(path)
    llmc_write_datafile(path, [1, 2], magic=1234)
    with pytest.raises(DataError, match="magic number 1234, expected 20240520"):
        read_header(path)
    llmc_write_datafile(path, [1, 2], version=2)
    with pytest.raises(DataError, match="unsupported shard version 2"):
        open_shard(path)


def test_writer_streams_into_numbered_shards(tmp_path):
    writer = ShardWriter(tmp_path, "train", vocab_size=300, shard_tokens=10)
    for chunk in (np.arange(7), list(range(7, 18)), np.arange(18, 25)):
        writer.add(chunk)
    paths = writer.close()
    assert [p.name for p in paths] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert [read_header(p).num_tokens for p in paths] == [10, 10, 5]
    assert np.concatenate([open_shard(p) for p in paths]).tolist() == list(range(25))
    assert writer.num_tokens == 25
    assert sorted(tmp_path.iterdir()) == paths


def test_writer_without_tokens_writes_nothing(tmp_path):
    assert ShardWriter(tmp_path, "val", vocab_size=300).close() == []
    assert not list(tmp_path.iterdir())


def test_find_shards_accepts_our_names_and_llmc_names(tmp_path):
    names = ["train_000001.bin", "train_000000.bin", "val_000000.bin", "tinyshakespeare_val.bin",
             "tinyshakespeare_train.bin", "fineweb_train_000001.bin", "notes.txt", "train_000002.bin.tmp"]
    for name in names:
        (tmp_path / name).touch()
    assert [p.name for p in find_shards(tmp_path, "train")] == [
        "fineweb_train_000001.bin", "tinyshakespeare_train.bin", "train_000000.bin", "train_000001.bin"]
    assert [p.name for p in find_shards(tmp_path, "val")] == ["tinyshakespeare_val.bin", "val_000000.bin"]


def test_llmc_tinyshakespeare_dir_loads_as_gpt2(tmp_path):
    train, val = [15496, 11, 50256] * 5, [464, 50256]
    llmc_write_datafile(tmp_path / "tinyshakespeare_train.bin", train)
    llmc_write_datafile(tmp_path / "tinyshakespeare_val.bin", val)
    data = load_data_dir(tmp_path)
    assert (data.vocab_size, data.tokenizer, data.manifest) == (50257, None, None)
    assert [info.vocab_size for info in data.train + data.val] == [None, None]
    assert open_shard(data.train[0].path).tolist() == train
    assert open_shard(data.val[0].path).tolist() == val


def test_foreign_dir_vocab_from_header_or_tokenizer_json(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(10), vocab_size=100_000)
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(5), vocab_size=100_000)
    assert load_data_dir(tmp_path).vocab_size == 100_000
    Tokenizer.bytes().save(tmp_path / "tokenizer.json")
    data = load_data_dir(tmp_path)
    assert data.vocab_size == 257 and data.tokenizer.eot_id == 256


def test_foreign_uint32_dir_without_vocab_size_is_refused(tmp_path):
    llmc_write_datafile(tmp_path / "x_train.bin", [1, 2], magic=20240801, version=7, dtype=np.uint32)
    llmc_write_datafile(tmp_path / "x_val.bin", [3], magic=20240801, version=7, dtype=np.uint32)
    with pytest.raises(DataError, match="cannot tell the vocabulary size"):
        load_data_dir(tmp_path)


def test_dir_without_val_shards_says_what_it_found(tmp_path):
    llmc_write_datafile(tmp_path / "tinyshakespeare_train.bin", [1, 2, 3])
    with pytest.raises(DataError, match=r"found 1 train and 0 val shards \(files: tinyshakespeare_train\.bin\)"):
        load_data_dir(tmp_path)


def test_half_written_and_missing_dirs_are_refused(tmp_path):
    half = tmp_path / ".data.tmp-1234"
    half.mkdir()
    with pytest.raises(DataError, match="interrupted prepare"):
        load_data_dir(half)
    with pytest.raises(DataError, match="not a data directory"):
        load_data_dir(tmp_path / "absent")

