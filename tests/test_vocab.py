"""Word vocabularies (model/vocab.py) against the official code's own: tests/fixtures/official/vocab.json
holds the official Vocab's idx2sym for the WikiText-103 and PTB settings of lm.py on a small corpus
(wt103_data/, written by make_fixtures.py) and its encode_file ids of test.txt; the converter's --vocab
writes the vocabulary into a checkpoint folder, and load_vocab reads it back, checked."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from readme_support import run_convert_then_python

from model.vocab import VocabError, WordVocab, load_vocab

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "official"
DATA = FIX / "wt103_data"
REF = json.loads((FIX / "vocab.json").read_text())


@pytest.mark.parametrize("dataset", ["wt103", "ptb"])
def test_the_vocabulary_is_the_official_one_symbol_for_symbol(dataset):
    assert WordVocab.from_dataset(DATA, dataset).symbols == REF[dataset]["idx2sym"]


def test_the_corpus_has_count_ties_so_the_order_among_them_is_checked():
    counts = Counter((DATA / "train.txt").read_text().split())
    ties = Counter(counts.values())
    assert max(ties.values()) >= 3, ties


@pytest.mark.parametrize("dataset", ["wt103", "ptb"])
def test_encoding_a_file_gives_the_official_ids(dataset):
    """The official encode_file: each line's words, then <eos> (every line of the file ends with one)."""
    vocab = WordVocab.from_dataset(DATA, dataset)
    assert vocab.encode((DATA / "test.txt").read_text()) == REF[dataset]["test_ids"]


def test_a_carriage_return_ends_a_line_as_in_the_official_files(tmp_path):
    """The official code reads its files in text mode, whose universal newlines end a line at "\\n", "\\r\\n"
    or a lone "\\r" (an old Mac file; a client's own text): each such line ends with <eos> (encode_file), as
    the vocabulary's own count splits them (count_symbols). A prompt's lone "\\r" was whitespace, the two
    lines' words run together with no <eos>."""
    vocab = WordVocab.from_dataset(DATA, "wt103")
    raw = "w1 w2\rw0\r\nw3 w4\r\r w2\n"
    (tmp_path / "cr.txt").write_bytes(raw.encode())
    lines = (tmp_path / "cr.txt").read_text().splitlines()  # the lines a text-mode reading gives
    assert len(lines) == 5
    official = [i for ln in lines for i in [*map(vocab.index.get, ln.split()), vocab.eos_id]]
    assert vocab.encode(raw) == official
    assert vocab.encode("w1\rw2") == [vocab.index["w1"], vocab.eos_id, vocab.index["w2"]]
    assert WordVocab.from_corpus([tmp_path / "cr.txt"]).symbols == ["<eos>", "w2", "w1", "w0", "w3", "w4"]


def test_decoding_reads_as_wikitext_and_encoding_it_gives_the_ids_back():
    vocab = WordVocab.from_dataset(DATA, "wt103")
    text = (DATA / "test.txt").read_text()
    ids = vocab.encode(text)
    assert vocab.decode(ids) == "".join(
        "".join(" " + w for w in ln.split()) + "\n" for ln in text.splitlines()
    )
    assert vocab.encode(vocab.decode(ids)) == ids
    every = list(range(len(vocab)))
    assert vocab.encode(vocab.decode(every)) == every


def test_an_unknown_word_is_unk_when_the_vocabulary_has_it_else_refused_by_name():
    vocab = WordVocab.from_dataset(DATA, "wt103")
    assert vocab.encode("w1 zebra") == [vocab.index["w1"], vocab.index["<unk>"]]
    no_unk = WordVocab([s for s in vocab.symbols if s != "<unk>"])
    first = r"^1 word not in the vocabulary, which has no '<unk>' symbol to read it as: 'zebra'\. A word is"
    with pytest.raises(VocabError, match=first):
        no_unk.encode("w1 zebra")
    # every unknown word at once, each once, in order (it named the first only: one fix per request)
    with pytest.raises(VocabError) as err:
        no_unk.encode("zebra w1 prompt.\nfast. zebra")
    said = "3 words not in the vocabulary, which has no '<unk>' symbol to read them as: 'zebra', 'prompt.', "
    said += "'fast.'. "
    assert str(err.value).startswith(said), str(err.value)
    many = " ".join(f"q{i}" for i in range(25))
    with pytest.raises(VocabError, match=r"^25 words .*: 'q0', 'q1', .*'q19' and 5 more\. "):
        no_unk.encode(many)


def test_ptb_lower_cases_its_input():
    vocab = WordVocab.from_dataset(DATA, "ptb")
    assert vocab.encode("The THE the") == [vocab.index["the"]] * 3


@pytest.mark.parametrize(
    ("symbols", "message"),
    [
        ([], "at least one symbol"),
        (["<eos>", "a", "a"], r"symbol 'a' appears twice"),
        (["<eos>", "a b"], r"symbol 'a b': symbols are non-empty and hold no whitespace"),
        (["a", "b"], r"no '<eos>' symbol"),
    ],
)
def test_a_bad_symbol_list_is_refused(symbols, message):
    with pytest.raises(VocabError, match=message):
        WordVocab(symbols)


def test_a_symbols_file_reads_the_first_field_of_each_line(tmp_path):
    (tmp_path / "v.txt").write_text("<eos> 10\nthe 5\n\nof\n")
    assert WordVocab.read(tmp_path / "v.txt").symbols == ["<eos>", "the", "of"]


def test_a_symbols_file_ends_its_lines_where_the_official_text_mode_read_does(tmp_path):
    """The official `_build_from_file` reads a vocab_file in text mode (lines end at \\n, \\r\\n or \\r:
    Python's universal newlines) and takes `line.strip().split()[0]`. Ours split with str.splitlines, which
    also ends a line at \\x0b, \\x0c, \\x1c-\\x1e, \\x85 and U+2028/9: a line "a\\x0cb" gave two symbols
    where the official code reads one ("a"), and every later id was one more (R12's note). Here the
    reference is that same read of the bytes through io.TextIOWrapper, as open(..., 'r') does."""
    import io  # noqa: PLC0415

    seps = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
    text = "<eos>\n" + "".join(f"w{i}{sep}x{i} 7\n" for i, sep in enumerate(seps)) + "cr\rcrlf\r\nlast"
    data = text.encode("utf-8")
    (tmp_path / "v.txt").write_bytes(data)
    with io.TextIOWrapper(io.BytesIO(data), encoding="utf-8") as f:
        want = [line.strip().split()[0] for line in f if line.strip()]
    assert want == ["<eos>", *(f"w{i}" for i in range(len(seps))), "cr", "crlf", "last"]
    assert WordVocab.read(tmp_path / "v.txt").symbols == want


def _convert(tmp_path, *extra):
    out = tmp_path / "ck"
    r = subprocess.run(
        [sys.executable, "-m", "model.convert", str(FIX / "s4_wt103.ckpt"), str(out), *map(str, extra)],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    return r, out


def test_convert_writes_the_vocabulary_built_from_the_data_folder_and_load_vocab_reads_it(tmp_path):
    r, out = _convert(tmp_path, "--vocab", DATA)
    assert r.returncode == 0, r.stderr
    vocab = load_vocab(out)
    assert vocab.symbols == REF["wt103"]["idx2sym"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["vocab"]["size"] == 64 and meta["vocab"]["unk"] == "<unk>"
    assert "`vocab.txt`, 64 words (wt103's, built from train.txt of" in (out / "README.md").read_text()
    moved = tmp_path / "vocab-elsewhere.txt"  # its checksum still matches: a link out is refused all the same
    (out / "vocab.txt").rename(moved)
    (out / "vocab.txt").symlink_to(moved)
    with pytest.raises(VocabError, match=r"vocab\.txt: a link to .*vocab-elsewhere\.txt, outside the"):
        load_vocab(out)
    (out / "vocab.txt").unlink()
    moved.rename(out / "vocab.txt")
    (out / "vocab.txt").write_text((out / "vocab.txt").read_text().replace("w2", "w2x"))
    with pytest.raises(VocabError, match="checksum mismatch"):
        load_vocab(out)


def test_convert_reads_a_symbols_file_and_refuses_one_of_another_size(tmp_path):
    (tmp_path / "symbols.txt").write_text("".join(s + "\n" for s in REF["wt103"]["idx2sym"]))
    r, out = _convert(tmp_path, "--vocab", tmp_path / "symbols.txt")
    assert r.returncode == 0, r.stderr
    assert load_vocab(out).symbols == REF["wt103"]["idx2sym"]
    (tmp_path / "short.txt").write_text("".join(s + "\n" for s in REF["wt103"]["idx2sym"][:60]))
    r, out = _convert(tmp_path / "b", "--vocab", tmp_path / "short.txt")
    assert r.returncode == 2 and "60 words, but the model's vocabulary has 64" in r.stderr, r.stderr
    assert not out.exists()


def test_convert_reads_the_vocab_txt_beside_its_source_as_a_server_does(tmp_path):
    """A server given an official file reads the vocab.txt beside it; model.convert ignored it, wrote a
    checkpoint without a vocabulary and warned to give it one, the file right there (a fresh-user trial).
    It reads it now, saying so; --vocab still names another."""
    src = tmp_path / "run" / "checkpoints"
    src.mkdir(parents=True)
    (src / "last.ckpt").write_bytes((FIX / "s4_wt103.ckpt").read_bytes())
    (src / "vocab.txt").write_text("".join(s + "\n" for s in REF["wt103"]["idx2sym"]))
    convert = [sys.executable, "-m", "model.convert", str(src / "last.ckpt")]
    r = subprocess.run([*convert, str(tmp_path / "a")], check=False, capture_output=True, text=True, cwd=ROOT,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"note: {src / 'vocab.txt'}, beside last.ckpt, is read as its vocabulary" in r.stderr, r.stderr
    assert "give it its vocabulary" not in r.stderr
    assert load_vocab(tmp_path / "a").symbols == REF["wt103"]["idx2sym"]
    (tmp_path / "short.txt").write_text("".join(s + "\n" for s in REF["wt103"]["idx2sym"][:60]))
    r = subprocess.run([*convert, str(tmp_path / "b"), "--vocab", str(tmp_path / "short.txt")],
                       check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 2 and "60 words, but the model's vocabulary has 64" in r.stderr, r.stderr


def test_an_audio_model_converts_beside_a_vocab_txt_it_does_not_read(tmp_path, caplog):
    """An official audio model in a folder with another (text) model's vocab.txt, no --vocab given:
    model.convert failed with "--vocab is a text model's option; this is an audio model" (it reads the
    vocab.txt beside SRC since b504593), and a server given the file (the conversion cache) refused it the
    same way. An audio model has no vocabulary: it converts without one now, the conversion cache's too,
    with no note of the file; a --vocab named for it is still refused."""
    from model.convert import convert_cached  # noqa: PLC0415

    src = tmp_path / "downloads"
    src.mkdir()
    (src / "s4_sc09.ckpt").write_bytes((FIX / "s4_sc09.ckpt").read_bytes())
    (src / "vocab.txt").write_text("".join(s + "\n" for s in REF["wt103"]["idx2sym"]))
    convert = [sys.executable, "-m", "model.convert", str(src / "s4_sc09.ckpt")]
    r = subprocess.run([*convert, str(tmp_path / "a")], check=False, capture_output=True, text=True, cwd=ROOT,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "vocab" not in r.stderr, r.stderr
    assert not (tmp_path / "a" / "vocab.txt").exists() and load_vocab(tmp_path / "a") is None
    with caplog.at_level(logging.INFO, logger="model.convert"):
        entry = convert_cached(src / "s4_sc09.ckpt", tmp_path / "cache")
    assert (entry / "model.safetensors").is_file() and load_vocab(entry) is None
    said = [r.getMessage() for r in caplog.records if "converted (converter v" in r.getMessage()]
    assert len(said) == 1 and "vocabulary" not in said[0], said  # (it said ", its vocabulary …/vocab.txt")
    r = subprocess.run([*convert, str(tmp_path / "b"), "--vocab", str(src / "vocab.txt")],
                       check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 2 and "--vocab is a text model's option; this is an audio model" in r.stderr


def test_a_checkpoint_without_a_vocabulary_has_none():
    assert load_vocab(ROOT / "checkpoints" / "text-shakespeare") is None


def test_the_readme_word_level_example_runs_verbatim(tmp_path):
    """The README's two blocks after the `tests/test_vocab.py` marker: the conversion, then the library
    generating words (its folder /tmp/s4-wt103-tiny moved under tmp_path)."""
    out = run_convert_then_python("<!-- tested: tests/test_vocab.py", "/tmp/s4-wt103-tiny", tmp_path / "w")
    text = out.decode("utf-8")[:-1]  # (print's newline)
    vocab = load_vocab(tmp_path / "w")
    assert len(vocab.encode(text)) == 20 and set(text.split()) <= set(vocab.symbols), text


def test_load_vocab_serves_the_bytes_whose_checksum_it_checked(tmp_path, monkeypatch):
    """`load_vocab` read vocab.txt to check its SHA-256, then read the file again to parse it: a vocab.txt
    replaced between the two reads was served unchecked (another vocabulary under the checked one's
    name). It parses the bytes it checked now: the vocabulary is the one config.json's checksum names."""
    words = WordVocab(["<eos>", "<unk>", "the", "a", "sea"])
    other = WordVocab(list(reversed(words.symbols)))
    folder = tmp_path / "ck"
    folder.mkdir()
    sha = words.write(folder / "vocab.txt")
    (folder / "config.json").write_text(json.dumps({"vocab": {**words.describe(), "sha256": sha}}))
    read_bytes = Path.read_bytes

    def read_then_replaced(self):  # another vocab.txt moved over this one just after it is read
        data = read_bytes(self)
        if self.name == "vocab.txt":
            other.write(self)
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_replaced)
    assert load_vocab(folder).symbols == words.symbols
    monkeypatch.undo()
    with pytest.raises(VocabError, match="vocab.txt: checksum mismatch"):  # (the replacement, by itself)
        load_vocab(folder)
