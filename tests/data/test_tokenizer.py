"""Tokenizer: exact round trips, EOT handling, byte accounting, and every way of loading one."""

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from gptforge.data import tokenizer as tokenizer_module
from gptforge.data.tokenizer import EOT, Tokenizer, training_chunks
from gptforge.errors import DataError

SAMPLES = [
    "def f(x):\n\treturn x ** 2  # square\n",
    "   leading spaces and trailing   ",
    "Windows line\r\nendings\r\n",
    "emoji 🙂🚀 and accents: déjà vu, naïve, Ωμέγα, 日本語のテキスト",
    "combining e\u0301 and zero\u200bwidth, NUL-free control \x07 chars",
    "{'json': [1, 2.5, null], \"k\": \"v\"}",
    "",
    " ",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(SAMPLES * 20, vocab_size=400)


@pytest.fixture(scope="module")
def gpt2_folder(bpe, tmp_path_factory):
    """A GPT-2 style folder (vocab.json + merges.txt) holding the BPE fixture's vocabulary;
    like GPT-2's, its vocab.json lists EOT as an ordinary entry."""
    folder = tmp_path_factory.mktemp("gpt2")
    model = json.loads(bpe.to_json())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = "".join(" ".join(pair) + "\n" for pair in model["merges"])
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["bpe", "bytes", "saved_json", "gpt2_folder"])
def any_tokenizer(request, bpe, gpt2_folder, tmp_path_factory) -> Tokenizer:
    if request.param == "bpe":
        return bpe
    if request.param == "bytes":
        return Tokenizer.bytes()
    if request.param == "saved_json":
        path = tmp_path_factory.mktemp("saved") / "tokenizer.json"
        bpe.save(path)
        return Tokenizer.load(path)
    return Tokenizer.from_pretrained(gpt2_folder)


@pytest.mark.parametrize("text", SAMPLES + ["".join(SAMPLES)])
def test_decode_inverts_encode(any_tokenizer, text):
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == text


def test_literal_end_of_text_in_a_document_stays_text(any_tokenizer):
    text = f"docs mention {EOT} literally"
    ids = any_tokenizer.encode(text)
    assert any_tokenizer.eot_id not in ids
    assert any_tokenizer.decode(ids) == text


def test_eot_decodes_visibly(any_tokenizer):
    assert any_tokenizer.decode([any_tokenizer.eot_id]) == EOT


def test_encode_batch_matches_encode(any_tokenizer):
    assert any_tokenizer.encode_batch(SAMPLES) == [any_tokenizer.encode(s) for s in SAMPLES]


def test_token_byte_lengths_sum_to_utf8_length(any_tokenizer):
    lengths = any_tokenizer.token_byte_lengths()
    assert lengths.dtype == np.int32 and lengths.shape == (any_tokenizer.vocab_size,)
    assert lengths[any_tokenizer.eot_id] == 0
    for text in SAMPLES:
        assert lengths[any_tokenizer.encode(text)].sum() == len(text.encode("utf-8"))


def test_bytes_tokenizer_is_one_id_per_byte():
    tok = Tokenizer.bytes()
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.encode("Aé") == [0x41, 0xC3, 0xA9]
    assert tok.token_byte_lengths().tolist() == [1] * 256 + [0]


def test_bpe_vocab_size_counts_eot(bpe):
    assert bpe.vocab_size <= 400
    assert bpe.vocab_size == len(json.loads(bpe.to_json())["model"]["vocab"])
    assert 0 <= bpe.eot_id < bpe.vocab_size


def test_saved_tokenizer_reloads_identically(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    for path in (tmp_path / "tokenizer.json", tmp_path):
        loaded = Tokenizer.load(path)
        assert loaded.sha256 == bpe.sha256
        assert loaded.encode(SAMPLES[0]) == bpe.encode(SAMPLES[0])


def test_gpt2_folder_keeps_ids_and_makes_eot_special(bpe, gpt2_folder):
    tok = Tokenizer.from_pretrained(gpt2_folder)
    assert tok.eot_id == bpe.eot_id
    assert tok.vocab_size == bpe.vocab_size
    assert tok.encode(SAMPLES[3]) == bpe.encode(SAMPLES[3])


def test_pretrained_without_eot_gets_one_appended(tmp_path):
    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(SAMPLES, tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False))
    size = raw.get_vocab_size()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert tok.eot_id == size and tok.vocab_size == size + 1
    assert tok.token_byte_lengths()[tok.eot_id] == 0


def test_wrapping_a_tokenizer_without_eot_is_refused():
    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer(tokenizers.Tokenizer(models.BPE()))


def test_nothing_usable_at_the_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no tokenizer found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match=r"tokenizer\.json: not a valid tokenizer"):
        Tokenizer.from_pretrained(tmp_path)


def test_training_chunks_leave_ordinary_text_whole_and_cut_long_runs(monkeypatch):
    source = Path(tokenizer_module.__file__).read_text(encoding="utf-8")
    assert list(training_chunks(source)) == [source]  # code and prose have no 4,097-character word
    monkeypatch.setattr(tokenizer_module, "TRAIN_RUN_CHARS", 10)
    monkeypatch.setattr(tokenizer_module, "_LONG_RUN", tokenizer_module.re.compile(r"(?<!\S)\S{11,}"))
    text = "a b " + "x" * 25 + " tail " + "y" * 10
    assert list(training_chunks(text)) == ["a b " + "x" * 10, "x" * 10, "x" * 5 + " tail " + "y" * 10]


def test_the_bpe_trainer_never_sees_a_run_longer_than_the_limit(monkeypatch):
    """One unbroken 1 MiB run is a single word to the trainer, which took minutes over it."""
    import random
    import string

    fed = []
    train_from_iterator = tokenizers.Tokenizer.train_from_iterator

    def spy(self, iterator, *args, **kwargs):
        return train_from_iterator(self, (fed.append(text) or text for text in iterator), *args, **kwargs)

    monkeypatch.setattr(tokenizers.Tokenizer, "train_from_iterator", spy)
    text = "".join(random.Random(0).choices(string.ascii_letters, k=1 << 20))
    tok = Tokenizer.train_bpe(["a few words first ", text], vocab_size=300)
    assert "".join(fed) == "a few words first " + text
    assert max(len(run) for chunk in fed for run in chunk.split()) == tokenizer_module.TRAIN_RUN_CHARS
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]
