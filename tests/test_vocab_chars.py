"""enwik8's byte and text8's character vocabularies (model/vocab.py ByteVocab, CharVocab) against the
official code's own: tests/fixtures/official/vocab_chars.json holds the official Vocab's idx2sym with lm.py's
EnWik8 / Text8 settings on a small corpus written in Transformer-XL's prep formats (enwik8_data/,
text8_data/, by make_fixtures.py: upper case, two- and three-byte characters, count ties; tabs and newlines
in enwik8's, made spaces in text8's as text8 itself was made)
and its encode_file ids of test.txt; trainpy_enwik.vocab.txt is the official Vocab of the real
train.py run's data (trainpy_enwik.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from readme_support import run_convert_then_python

from model.convert import convert
from model.vocab import ByteVocab, CharVocab, Vocab, VocabError, WordVocab, load_vocab
from model.vocab import main as vocab_main

FIX = Path(__file__).resolve().parent / "fixtures" / "official"
REF = json.loads((FIX / "vocab_chars.json").read_text(encoding="utf-8"))
KIND = {"enwik8": ByteVocab, "text8": CharVocab}


def raw(dataset: str, split: str = "test") -> str:
    """A split's raw text, as the prep script kept it beside its tokenized file."""
    return (FIX / f"{dataset}_data" / f"{split}.raw").read_text(encoding="utf-8")


@pytest.mark.parametrize("dataset", ["enwik8", "text8"])
def test_the_vocabulary_is_the_official_one_symbol_for_symbol(dataset):
    vocab = Vocab.from_dataset(FIX / f"{dataset}_data", dataset)
    assert type(vocab) is KIND[dataset] and vocab.symbols == REF[dataset]["idx2sym"]
    assert KIND[dataset].from_dataset(FIX / f"{dataset}_data", dataset).symbols == vocab.symbols


@pytest.mark.parametrize("dataset", ["enwik8", "text8"])
def test_the_corpus_has_count_ties_and_what_the_readers_must_handle(dataset):
    counts = Counter((FIX / f"{dataset}_data" / "train.txt").read_text(encoding="utf-8").split())
    assert max(Counter(counts.values()).values()) >= 2, counts
    text = raw(dataset)
    assert {"é", "—"} <= set(text) and any(c.isupper() for c in text) and "  " in text
    if dataset == "enwik8":
        assert {"\n", "\t"} <= set(text)
    else:
        assert not any(c.isspace() and c != " " for c in text)


@pytest.mark.parametrize("dataset", ["enwik8", "text8"])
def test_the_raw_text_encodes_to_the_official_ids_of_its_prepared_file(dataset):
    """Our reading of the raw text equals the official tokenizer's reading of the prep script's file: an
    enwik8 newline is dropped as the data lost it; text8 is lower-cased and its space is "_"."""
    vocab = Vocab.from_dataset(FIX / f"{dataset}_data", dataset)
    assert vocab.encode(raw(dataset)) == REF[dataset]["test_ids"]


def test_enwik8_decodes_to_the_bytes_and_text8_to_the_characters_the_data_kept():
    enwik8 = Vocab.from_dataset(FIX / "enwik8_data", "enwik8")
    text = raw("enwik8")
    assert enwik8.decode(REF["enwik8"]["test_ids"]) == text.replace("\n", "")
    assert enwik8.token_bytes(REF["enwik8"]["test_ids"]) == text.replace("\n", "").encode("utf-8")
    assert [enwik8.byte_of[i] for i in enwik8.encode("é")] == [0xC3, 0xA9]
    assert enwik8.decode(enwik8.encode("é")[:1]) == "\ufffd"  # a part of a character
    text8 = Vocab.from_dataset(FIX / "text8_data", "text8")
    assert text8.decode(REF["text8"]["test_ids"]) == raw("text8").lower()
    assert text8.piece(text8.index["_"]) == " "


def test_text8_reads_any_whitespace_as_its_space_and_refuses_a_literal_underscore():
    """text8 is a-z and single spaces (its source's every other character made a space), so a tab, a
    newline or a no-break space in a prompt is the space "_"; a literal "_" is not a character of the
    text (only the data's writing of a space): refused, saying so. A character that lower-cases to two
    (U+0130) is named itself, not the combining dot it leaves."""
    text8 = Vocab.from_dataset(FIX / "text8_data", "text8")
    assert text8.encode("The\tsea\nnot\u00a0to") == text8.encode("the sea not to")
    assert text8.encode("the sea not to").count(text8.index["_"]) == 3 and text8.dropped("a\nb") == []
    with pytest.raises(
        VocabError, match="character '_' is not in the vocabulary \\(text8 writes a space as '_'"
    ):
        text8.encode("to_be")
    with pytest.raises(VocabError, match="^character 'İ' is not in the vocabulary$"):
        text8.encode("TO BE İ")


def test_an_enwik8_prompt_of_newlines_only_is_refused_saying_why():
    enwik8 = Vocab.from_dataset(FIX / "enwik8_data", "enwik8")
    assert enwik8.dropped("a\nb\n") == ["\n", "\n"] and enwik8.encode("a\nb\n") == enwik8.encode("ab")
    with pytest.raises(VocabError, match="it holds only newlines, which this enwik8 model drops"):
        enwik8.encode("\n\n")
    assert enwik8.encode("") == []


@pytest.mark.parametrize(
    ("dataset", "text", "named"),
    [
        ("enwik8", "the sea x", "character 'x' is not in the vocabulary"),
        ("enwik8", "~ the ü 日", "characters '~', '日' are not in the vocabulary"),  # ü: both its bytes are
        ("text8", "the sea, x", "character 'x' is not in the vocabulary"),
        ("text8", "Zz~Y", "characters '~', 'Y' are not in the vocabulary"),  # (lower-cased first)
    ],
)
def test_a_character_the_vocabulary_lacks_is_refused_by_name(dataset, text, named):
    vocab = Vocab.from_dataset(FIX / f"{dataset}_data", dataset)
    with pytest.raises(VocabError, match=named):
        vocab.encode(text)


def test_a_newline_is_dropped_only_when_the_vocabulary_lacks_it():
    lacking = ByteVocab(["32", "97"])
    assert lacking.encode("a\na \n") == [1, 1, 0]
    having = ByteVocab(["32", "97", "10"])  # data prepared otherwise: the newline is a symbol
    assert having.encode("a\na \n") == [1, 2, 1, 0, 2]
    with pytest.raises(VocabError, match="character '\\\\t' is not"):
        lacking.encode("a\ta")


@pytest.mark.parametrize(
    ("cls", "symbols", "message"),
    [
        (ByteVocab, ["32", "256"], "symbol '256': an enwik8 symbol is a byte value, 0 to 255"),
        (ByteVocab, ["32", "07"], "symbol '07': an enwik8 symbol is a byte value"),
        (ByteVocab, ["a"], "symbol 'a': an enwik8 symbol is a byte value"),
        (ByteVocab, ["32", "32"], "symbol '32' appears twice"),
        (CharVocab, ["a", "bc"], "symbol 'bc': a text8 symbol is one character"),
        (CharVocab, [], "at least one symbol"),
    ],
)
def test_a_bad_symbol_list_is_refused(cls, symbols, message):
    with pytest.raises(VocabError, match=message):
        cls(symbols)


def test_a_dataset_of_another_kind_is_refused_by_the_class():
    with pytest.raises(VocabError, match="dataset 'enwik8': its tokens are bytes, not words"):
        WordVocab.from_dataset(FIX / "enwik8_data", "enwik8")
    with pytest.raises(VocabError, match="dataset 'lm1b': a vocabulary is built for"):
        Vocab.from_dataset(FIX / "enwik8_data", "lm1b")


@pytest.mark.parametrize("dataset", ["enwik8", "text8"])
def test_convert_builds_the_vocabulary_from_the_data_folder_and_load_vocab_reads_it(dataset, tmp_path):
    summary = convert(FIX / f"s4_{dataset}.ckpt", tmp_path / "m", vocab=FIX / f"{dataset}_data")
    assert summary["warning"] is None and f"{len(REF[dataset]['idx2sym'])} " in summary["vocab"]
    vocab = load_vocab(tmp_path / "m")
    assert type(vocab) is KIND[dataset] and vocab.symbols == REF[dataset]["idx2sym"] and vocab.lower_case
    entry = json.loads((tmp_path / "m" / "config.json").read_text())["vocab"]
    assert entry["kind"] == {"enwik8": "bytes", "text8": "chars"}[dataset]


def test_the_real_runs_symbols_file_is_read_as_enwik8_bytes(tmp_path):
    """trainpy_enwik.ckpt names dataset enwik8: --vocab FILE reads the symbols as byte values."""
    summary = convert(FIX / "trainpy_enwik.ckpt", tmp_path / "m", vocab=FIX / "trainpy_enwik.vocab.txt")
    assert summary["warning"] is None and "68 bytes (read from" in summary["vocab"]
    vocab = load_vocab(tmp_path / "m")
    assert (
        isinstance(vocab, ByteVocab)
        and vocab.decode(vocab.encode("To be, or not\nto be")) == "To be, or notto be"
    )


def test_model_vocab_writes_enwik8_and_text8_symbols_files(tmp_path, capsys):
    assert vocab_main([str(FIX / "text8_data"), str(FIX / "s4_text8.ckpt"), str(tmp_path / "t.txt")]) == 0
    assert f"{len(REF['text8']['idx2sym'])} characters of text8" in capsys.readouterr().out
    assert CharVocab.read(tmp_path / "t.txt").symbols == REF["text8"]["idx2sym"]
    assert vocab_main([str(FIX / "enwik8_data"), "enwik8", str(tmp_path / "e.txt")]) == 0
    assert f"{len(REF['enwik8']['idx2sym'])} bytes of enwik8" in capsys.readouterr().out
    assert ByteVocab.read(tmp_path / "e.txt").symbols == REF["enwik8"]["idx2sym"]


def test_model_vocab_refuses_a_data_folder_that_is_not_the_checkpoint_s(tmp_path, capsys):
    """Given the run's checkpoint, `python -m model.vocab DATA_DIR CKPT OUT` built the vocabulary of
    whatever enwik8 folder it was given and exited 0 (a fresh-user trial: the fixtures' 33-byte enwik8_data
    for version 3's 68-symbol run), and the server then refused the vocab.txt beside the checkpoint. Now
    a vocabulary of another size than the model's is refused, naming both, and nothing is written; the
    run's own data (the sizes agree) and a dataset's name (no model to compare with) write it as before."""
    out = tmp_path / "vocab.txt"
    with pytest.raises(SystemExit) as exc:
        vocab_main([str(FIX / "enwik8_data"), str(FIX / "trainpy_v3_s4.ckpt"), str(out)])
    assert exc.value.code == 2 and not out.exists()
    assert (
        f"{FIX / 'enwik8_data'} gives 33 bytes of enwik8, but {FIX / 'trainpy_v3_s4.ckpt'}'s model has 68 "
        f"tokens: not its run's data folder? ({out} not written)"
    ) in capsys.readouterr().err
    assert vocab_main([str(FIX / "enwik8_data"), str(FIX / "s4_enwik8.ckpt"), str(out)]) == 0
    assert len(ByteVocab.read(out)) == 33
    assert vocab_main([str(FIX / "wt103_data"), str(FIX / "s4_wt103.ckpt"), str(out)]) == 0  # (adaptive)


def test_the_readme_enwik8_example_runs_verbatim(tmp_path):
    """The README's two blocks after the `tests/test_vocab_chars.py` marker: the conversion with the run's
    symbols file, then the library generating 40 bytes (its folder /tmp/s4-hamlet moved under tmp_path),
    which read back as the same 40 ids."""
    out = run_convert_then_python("<!-- tested: tests/test_vocab_chars.py", "/tmp/s4-hamlet", tmp_path / "h")
    text = out[:-1].decode("utf-8")  # (print's newline; the run's bytes are all ASCII)
    vocab = load_vocab(tmp_path / "h")
    assert len(vocab.encode(text)) == 40 and vocab.decode(vocab.encode(text)) == text, text


def test_the_official_cache_pt_is_the_vocabulary_and_edited_text_files_are_warned_of(tmp_path, capsys):
    """stale_cache/: the official code's cache.pt of enwik8_data (written by the official Vocab and
    torch.save, as lm.py caches a dataset) beside text files edited after it: the official code trains on
    the cache's vocabulary, so that one is used (read inertly), with a warning that the files disagree;
    the cache alone gives it without one. `model.vocab` prints the warning, `--vocab` logs it and puts it
    in the card's vocabulary line."""
    stale = FIX / "stale_cache"
    vocab = Vocab.from_dataset(stale, "enwik8")
    assert vocab.symbols == REF["enwik8"]["idx2sym"] and "cache.pt" in vocab.origin
    assert vocab.warning.startswith(f"train.txt, valid.txt, test.txt of {stale} give another vocabulary (")
    assert "than its cache.pt (33 symbols), which the official code reads instead of them" in vocab.warning
    built = ByteVocab.from_corpus(
        [stale / f for f in ("train.txt", "valid.txt", "test.txt")], lower_case=True
    )
    assert built.symbols != vocab.symbols  # (the edit matters)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "cache.pt").write_bytes((stale / "cache.pt").read_bytes())
    vocab = Vocab.from_dataset(alone, "enwik8")
    assert vocab.symbols == REF["enwik8"]["idx2sym"] and vocab.warning is None
    assert vocab_main([str(stale), "enwik8", str(tmp_path / "v.txt")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: train.txt, valid.txt, test.txt of") and "cache.pt" in out
    summary = convert(FIX / "s4_enwik8.ckpt", tmp_path / "m", vocab=stale)
    assert (
        f"read from {stale / 'cache.pt'}" in summary["vocab"] and "; warning: train.txt" in summary["vocab"]
    )
    assert load_vocab(tmp_path / "m").symbols == REF["enwik8"]["idx2sym"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"idx2sym": ["a"]}, "not the official dataset cache (vocab, train, valid, test)"),
        (
            (__import__("argparse").Namespace(idx2sym=["a"]),),
            "it holds argparse.Namespace, which is not allowed",
        ),
    ],
)
def test_a_cache_pt_that_is_not_the_official_one_is_refused_naming_it(tmp_path, content, message):
    import torch  # noqa: PLC0415

    torch.save(content, tmp_path / "cache.pt")
    with pytest.raises(VocabError) as exc:
        Vocab.from_dataset(tmp_path, "text8")
    assert str(exc.value).startswith(f"{tmp_path / 'cache.pt'}: ") and message in str(exc.value)
    assert "(move it away to build the vocabulary from the text files)" in str(exc.value)


@pytest.mark.parametrize("name", ["trainpy_v3_s4", "trainpy_v3_s4d"])
def test_version_3s_real_runs_symbols_file_is_read_as_enwik8_bytes(tmp_path, name):
    """trainpy_v3_*.ckpt (version 3's train.py, dataset enwik8): --vocab trainpy_v3.vocab.txt reads the
    run's 68 symbols as byte values in the file's order. That run's data has a `10` symbol (its test
    split's cut ends within `101`: trainpy_v3.md), so a newline encodes and round-trips, as the official
    Vocab would."""
    summary = convert(FIX / f"{name}.ckpt", tmp_path / "m", vocab=FIX / "trainpy_v3.vocab.txt")
    assert summary["warning"] is None and "68 bytes (read from" in summary["vocab"]
    vocab = load_vocab(tmp_path / "m")
    lines = (FIX / "trainpy_v3.vocab.txt").read_text().split()
    assert isinstance(vocab, ByteVocab) and [int(s) for s in vocab.symbols] == [int(s) for s in lines]
    ids = vocab.encode("To be, or not\nto be")
    assert max(ids) < 68 and vocab.decode(ids) == "To be, or not\nto be"
