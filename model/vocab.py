"""Vocabularies as the official state-spaces/s4 LM datasets number tokens (WikiText, PTB, enwik8, text8).

The official code (src/dataloaders/utils/vocabulary.py `Vocab`, src/dataloaders/lm.py; read for facts,
not copied) builds the vocabulary from the corpus, not the checkpoint: its special symbols first
(`<eos>` for the word datasets, none for enwik8 and text8), then every symbol of the counted files by
decreasing count, ties in the order first seen (`Counter.most_common`). A line is tokenized by
`line.strip().split()`, lower-cased for PTB and for enwik8 and text8 (whose `vocab_kwargs = {}` keep the
`Vocab` default, lower_case=True); a word dataset's line ends with `<eos>` when encoded, enwik8's and
text8's with nothing (`add_eos=False`). WikiText-103 counts train.txt only; the others train, valid and
test. A vocabulary can also be read from a symbols file, one per line (the official `vocab_file` format:
the first whitespace-separated field of each line).

Three kinds of token, by dataset (config.json's `vocab.kind`):

- **words** (wt103, wt2, ptb), `WordVocab`: `encode` splits the text into lines and words, each newline
  is `<eos>` (a line ends at "\\n", "\\r\\n" or a lone "\\r", as the official code's text-mode reading
  of its files ends one); an unknown word is `<unk>` when the vocabulary has that symbol (WikiText's own
  convention), else a VocabError naming it. `piece(i)` is a token's text: "\\n" for `<eos>`, else a
  space and the word, so decoded text reads as WikiText's raw files (" The game began ... \\n") and
  `encode(decode(ids)) == ids` for every id.
- **bytes** (enwik8), `ByteVocab`: Transformer-XL's prep_enwik8.py, which the official code's data
  folder follows, writes each byte of the corpus as its decimal number, space-separated, and a newline byte
  as a line break, which the tokenizer's split drops: the symbols are byte values ("101"), numbered by
  frequency, and the model never saw a newline. `encode` reads the text's UTF-8 bytes, each as its symbol's
  id; a newline is dropped when the vocabulary lacks it (as the training data lost them), any other byte
  it lacks is a VocabError naming the character. A token's text is its byte (part of a character, for
  non-ASCII text).
- **chars** (text8), `CharVocab`: prep_text8.py writes each character, a space as "_", space-separated:
  the symbols are characters. text8 itself is lower-case a-z and single spaces (every other character of
  its Wikipedia source made a space), so `encode` lower-cases the text (the `Vocab` default) and reads any
  whitespace as "_"; a character the vocabulary lacks is a VocabError naming it, a literal "_" too (it is
  the data's writing of a space, not a character of the text). A token's text is its character, " " for
  "_".
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from model.checkpoint import CheckpointError, checkpoint_file
from model.codecs import checked_ids

EOS, UNK = "<eos>", "<unk>"
VOCAB_FILE = "vocab.txt"
CACHE_FILE = "cache.pt"  # the official LM datasets' cache in their data folder (lm.py `_save_to_cache`)
# the official datasets' vocabularies (lm.py): files counted, lower-casing, the kind of symbol
ALL_SPLITS = ("train.txt", "valid.txt", "test.txt")
DATASETS = {
    "wt103": (("train.txt",), False, "words"),
    "wt2": (ALL_SPLITS, False, "words"),
    "ptb": (ALL_SPLITS, True, "words"),
    "enwik8": (ALL_SPLITS, True, "bytes"),
    "text8": (ALL_SPLITS, True, "chars"),
}


def text_lines(text: str) -> list[str]:
    """`text` cut where a file read in text mode ends its lines, as the official code reads its data and
    vocab files: at "\\n", "\\r\\n" or a lone "\\r" (Python's universal newlines), not at every break
    str.splitlines knows (\\x0c, \\x85, U+2028, ...). The last piece is what follows the last break ("" after
    a final one)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


class VocabError(ValueError):
    """A vocabulary file or corpus that cannot be read, or text it cannot encode."""


def count_symbols(paths: Iterable[str | Path], lower_case: bool, special: Iterable[str] = ()) -> list[str]:
    """The official Vocab(special, lower_case).count_file(path) for each path in order, then build_vocab()
    (min_freq 0, no max_size): the specials, then the counted symbols by `Counter.most_common()` (by
    decreasing count, ties in the order first seen). Raises VocabError for a file it cannot read."""
    counter: Counter[str] = Counter()
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    counter.update((line.lower() if lower_case else line).split())
        except (OSError, UnicodeDecodeError) as exc:
            raise VocabError(f"{path}: cannot read the corpus ({exc})") from None
    symbols = list(dict.fromkeys(special))
    seen = set(symbols)
    return symbols + [s for s, _ in counter.most_common() if s not in seen]


class Vocab:
    """What the three kinds share: `symbols[i]` is token i's symbol (non-empty, no whitespace, each once;
    else VocabError), `token_bytes` (ids → the UTF-8 bytes of their text, from a table), `decode`, the
    symbols file (`read`, `write`) and config.json's entry (`describe`). Subclasses set `kind`, `unit`
    (what one token is, in messages) and `_bytes` (each token's bytes)."""

    kind = ""
    unit = ""
    _bytes: list[bytes]
    origin = ""  # how `from_dataset` got it (the official cache.pt, or the text files)
    warning: str | None = None  # `from_dataset`: the text files disagree with the cache.pt used
    drops: tuple[str, ...] = ()  # the characters `encode` drops from any text (`dropped`)

    def __init__(self, symbols: list[str], lower_case: bool = False) -> None:
        if not symbols:
            raise VocabError("a vocabulary needs at least one symbol")
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            dup = next(s for i, s in enumerate(self.symbols) if self.index[s] != i)
            raise VocabError(f"symbol {dup!r} appears twice")
        bad = next((s for s in self.symbols if not s or any(c.isspace() for c in s)), None)
        if bad is not None:
            raise VocabError(f"symbol {bad!r}: symbols are non-empty and hold no whitespace")
        self.lower_case = lower_case

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_corpus(cls, paths: Iterable[str | Path], lower_case: bool = False, special=()) -> Vocab:
        """This kind's vocabulary of the counted files (`count_symbols`)."""
        return cls(count_symbols(paths, lower_case, special), lower_case=lower_case)

    @classmethod
    def from_dataset(cls, data_dir: str | Path, dataset: str) -> Vocab:
        """The vocabulary the official code trains on for `dataset` (`DATASETS`: wt103, wt2, ptb, enwik8,
        text8) with this data folder, of that dataset's kind: the one cached in DATA_DIR/cache.pt when that
        file exists (lm.py reads it instead of the text files whenever it is there; read inertly,
        `model.official.reader.read_vocab_cache`), else built from the text files as the official code
        builds it. `origin` says which; `warning` is set when both exist and disagree (the text files
        edited after the cache was written: the cache's is used, as the official code would). Raises
        VocabError for another dataset (or one of another kind than this class's), a cache.pt that is not
        the official one, or a folder whose files cannot be read."""
        if dataset not in DATASETS:
            raise VocabError(f"dataset {dataset!r}: a vocabulary is built for {sorted(DATASETS)} only")
        files, lower, kind = DATASETS[dataset]
        if cls is not Vocab and cls.kind != kind:
            raise VocabError(f"dataset {dataset!r}: its tokens are {kind}, not {cls.kind}")
        folder = Path(data_dir)
        paths = [folder / f for f in files]
        cache = folder / CACHE_FILE
        if not cache.is_file():
            vocab = VOCABS[kind].from_corpus(paths, lower_case=lower)
            vocab.origin = f"built from {', '.join(files)} of {folder}, as the official code builds it"
            return vocab
        from model.official.reader import OfficialFormatError, read_vocab_cache  # noqa: PLC0415

        try:
            vocab = VOCABS[kind](read_vocab_cache(cache), lower_case=lower)
        except OfficialFormatError as exc:
            raise VocabError(f"{exc}; the official code would read its vocabulary from it (move it away to "
                             "build the vocabulary from the text files)") from None  # fmt: skip
        vocab.origin = f"read from {cache}, the official code's cache of it (which its runs train on)"
        if all(p.is_file() for p in paths):
            try:
                built = VOCABS[kind].from_corpus(paths, lower_case=lower).symbols
            except VocabError:
                built = []
            if built != vocab.symbols:
                other = "numbered otherwise" if len(built) == len(vocab) else f"{len(built)} symbols"
                vocab.warning = (
                    f"{', '.join(files)} of {folder} give another vocabulary ({other}) than its {CACHE_FILE} "
                    f"({len(vocab)} symbols), which the official code reads instead of them whenever it "
                    f"exists: {CACHE_FILE}'s is used (the text files were changed after it was written?)"
                )
        return vocab

    @classmethod
    def read(cls, path: str | Path, lower_case: bool = False) -> Vocab:
        """A symbols file: the first whitespace-separated field of each non-blank line is the next symbol
        (the official vocab_file format; our checkpoints' vocab.txt)."""
        try:
            return cls.parse(Path(path).read_bytes(), lower_case=lower_case)
        except (OSError, UnicodeDecodeError) as exc:
            raise VocabError(f"{path}: cannot read the vocabulary ({exc})") from None

    @classmethod
    def parse(cls, data: bytes, lower_case: bool = False) -> Vocab:
        """`read`'s vocabulary from a symbols file's bytes (UnicodeDecodeError when they are not UTF-8). Its
        lines end where the official code's text-mode read ends them (\\n, \\r\\n or \\r: Python's
        universal newlines), not at every break str.splitlines knows (\\x0c, \\x85, U+2028, ...), which
        made one line with such a character between its fields two symbols."""
        lines = text_lines(data.decode("utf-8"))
        return cls([ln.split()[0] for ln in lines if ln.strip()], lower_case=lower_case)

    def write(self, path: str | Path) -> str:
        """Write the symbols file (one per line); returns its SHA-256."""
        data = "".join(s + "\n" for s in self.symbols).encode("utf-8")
        Path(path).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def describe(self) -> dict:
        """The config.json entry (`vocab`) that says how to read the symbols file back."""
        return {"kind": self.kind, "file": VOCAB_FILE, "size": len(self), "lower_case": self.lower_case}

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def least_tokens(self, text: str, most: int) -> int:
        """A lower bound on the ids `encode(text)` gives (where it takes the text), found at C speed, in
        memory that grows with `most`, not with the text: a caller with a limit on tokens refuses a text
        over it before `encode` reads it, whose time grows with the text (a word vocabulary took 12 s for
        16 MiB of newlines, a character one 6 s for 16 MiB of letters). Exact for a word vocabulary up to
        `most`."""
        raise NotImplementedError

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` read as `<unk>`: none (only a word vocabulary has one)."""
        return []

    def dropped(self, text: str) -> list[str]:
        """The characters of `text` that `encode` drops, in order: none (only enwik8's newlines are)."""
        return []

    def token_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of the tokens' text (from a table): what the server matches stop sequences
        against and streams as text."""
        b = self._bytes
        return b"".join(b[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens' text (U+FFFD for a byte that does not complete a character). Raises VocabError (a
        ValueError) for an id that is not an integer in 0 … len − 1 (a negative one read a symbol from the
        end: a helper's audit)."""
        try:
            q = checked_ids(ids if hasattr(ids, "__len__") else list(ids), "token", len(self._bytes))
        except ValueError as exc:
            raise VocabError(f"{exc} (the vocabulary's ids)") from None
        return self.token_bytes(int(i) for i in q).decode("utf-8", errors="replace")


def _refuse(missing: list[str], more: str = "") -> VocabError:
    """The error naming the characters (the first 8) a byte or character vocabulary cannot read."""
    named = ", ".join(repr(c) for c in missing[:8]) + (", …" if len(missing) > 8 else "")
    which = f"character {named} is" if len(missing) == 1 else f"characters {named} are"
    return VocabError(f"{which} not in the vocabulary{more}")


class ByteVocab(Vocab):
    """enwik8's: each symbol a byte value in decimal ("0".."255", as prep_enwik8.py writes them), token i
    the byte `byte_of[i]` (see the module's docstring). Raises VocabError for another symbol."""

    kind, unit = "bytes", "byte"

    def __init__(self, symbols: list[str], lower_case: bool = True) -> None:
        super().__init__(symbols, lower_case)
        bad = next((s for s in self.symbols if not (s.isdecimal() and s == str(int(s)))), None)
        bad = bad or next((s for s in self.symbols if int(s) > 255), None)
        if bad is not None:
            raise VocabError(f"symbol {bad!r}: an enwik8 symbol is a byte value, 0 to 255, in decimal")
        self.byte_of = [int(s) for s in self.symbols]
        self._bytes = [bytes([b]) for b in self.byte_of]
        self._table = bytearray(256)  # byte → id (ids < 256: one byte each)
        for i, b in enumerate(self.byte_of):
            self._table[b] = i
        lacking = set(range(256)) - set(self.byte_of)
        self._dropped = b"\n" if 10 in lacking else b""  # a newline the data never had: dropped
        self._lacking = lacking - {10}

    def least_tokens(self, text: str, most: int) -> int:
        """Every character is a byte or more, each one id, but a newline this vocabulary drops."""
        return len(text) - (text.count("\n") if self._dropped else 0)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`'s UTF-8 bytes (a newline dropped when not a symbol). Raises VocabError
        naming the characters whose bytes are not symbols (and UnicodeEncodeError for a lone surrogate)."""
        data = text.encode("utf-8")
        if not self._lacking.isdisjoint(data):
            missing = [c for c in dict.fromkeys(text) if not self._lacking.isdisjoint(c.encode("utf-8"))]
            raise _refuse(missing, " (an enwik8 model reads a character as its UTF-8 bytes, and these hold a "
                          "byte its data never had)")  # fmt: skip
        ids = list(data.translate(self._table, self._dropped))
        if data and not ids:
            raise VocabError(
                "it holds only newlines, which this enwik8 model drops (its data had none: the prep script "
                "wrote each as a line break, which the official tokenizer dropped); send another character"
            )
        return ids

    @property
    def drops(self) -> tuple[str, ...]:
        """("\n",) when the vocabulary lacks the newline byte (`encode` drops it), else ()."""
        return tuple(self._dropped.decode())

    def dropped(self, text: str) -> list[str]:
        """The newlines of `text` when the vocabulary lacks the newline byte (`encode` drops them)."""
        return ["\n"] * text.count("\n") if self._dropped else []

    def piece(self, i: int) -> str:
        """Token i's text: its byte as a character when ASCII, else U+FFFD (a part of a character)."""
        return self._bytes[i].decode("utf-8", errors="replace")


class CharVocab(Vocab):
    """text8's: each symbol one character, "_" a space (see the module's docstring). Raises VocabError for
    a symbol of more than one character."""

    kind, unit = "chars", "character"

    def __init__(self, symbols: list[str], lower_case: bool = True) -> None:
        super().__init__(symbols, lower_case)
        bad = next((s for s in self.symbols if len(s) != 1), None)
        if bad is not None:
            raise VocabError(f"symbol {bad!r}: a text8 symbol is one character")
        self._bytes = [self.piece(i).encode("utf-8") for i in range(len(self.symbols))]

    def least_tokens(self, text: str, most: int) -> int:
        """Every character is an id or more (a lower-cased "İ" is two), or `encode` refuses it."""
        return len(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`'s characters (lower-cased when `lower_case`; any whitespace read as "_").
        Raises VocabError naming the characters the vocabulary lacks (a literal "_" among them)."""
        index, space = self.index, self.index.get("_")
        ids: list[int] = []
        missing: dict[str, None] = {}
        for c in text:
            if c.isspace() and space is not None:
                ids.append(space)
                continue
            for d in c.lower() if self.lower_case else c:  # ("İ" lower-cases to two characters)
                i = index.get(d)
                if i is None or d == "_" or d.isspace():
                    missing[c] = None
                else:
                    ids.append(i)
        if missing:
            why = " (text8 writes a space as '_': send a space)" if "_" in missing else ""
            raise _refuse(list(missing), why)
        return ids

    def piece(self, i: int) -> str:
        """Token i's text: its character, " " for "_"."""
        s = self.symbols[i]
        return " " if s == "_" else s


NAMED_WORDS = 20  # of the unknown words a refusal names


class WordVocab(Vocab):
    """symbols[i] is token i's word (no whitespace inside a symbol). `eos` must be a symbol; `unk` is
    used for unknown words when it is one. Raises VocabError for an empty or duplicated symbol list."""

    kind, unit = "words", "word"

    def __init__(self, symbols: list[str], lower_case: bool = False, eos: str = EOS, unk: str = UNK):
        super().__init__(symbols, lower_case)
        if eos not in self.index:
            raise VocabError(f"the vocabulary has no {eos!r} symbol (the end of a line)")
        self.eos, self.unk = eos, unk
        self.eos_id = self.index[eos]
        self.unk_id = self.index.get(unk)
        self._bytes = [self.piece(i).encode("utf-8") for i in range(len(self.symbols))]

    @classmethod
    def from_corpus(cls, paths: Iterable[str | Path], lower_case: bool = False, special=(EOS,)) -> WordVocab:
        """The word datasets' specials: `<eos>` first."""
        return cls(count_symbols(paths, lower_case, special), lower_case=lower_case)

    def describe(self) -> dict:
        return {**super().describe(), "eos": self.eos, "unk": self.unk if self.unk_id is not None else None}

    def _key(self, word: str) -> str:
        """The symbol a word is looked up as (lower-cased for a lower_case vocabulary: PTB's)."""
        return word.lower() if self.lower_case else word

    def word_id(self, word: str) -> int:
        i = self.index.get(self._key(word), self.unk_id)
        if i is None:
            raise VocabError(
                f"word {word[:40]!r} is not in the vocabulary (which has no {self.unk!r} symbol)"
            )
        return i

    def _unknown_message(self, unknown: list[str]) -> str:
        """The refusal of a text whose `unknown` words (in order) this vocabulary, with no `unk`, lacks:
        all of them at once (one a request made a user fix a prompt one word per request: a fresh-user
        trial), with how its words are split."""
        distinct = list(dict.fromkeys(unknown))
        named = ", ".join(repr(w[:40]) for w in distinct[:NAMED_WORDS])
        more = f" and {len(distinct) - NAMED_WORDS:,} more" if len(distinct) > NAMED_WORDS else ""
        return (
            f"{len(distinct):,} word{'s' if len(distinct) != 1 else ''} not in the vocabulary, which has no "
            f"{self.unk!r} symbol to read {'them' if len(distinct) != 1 else 'it'} as: {named}{more}. A word "
            "is what whitespace separates, as in the training text (WikiText and PTB write punctuation "
            "apart: 'fast .', not 'fast.')"
        )

    def least_tokens(self, text: str, most: int) -> int:
        """Its words (split at whitespace, as `encode` splits them) and its newlines (an `<eos>` each); the
        words counted up to `most` + 1 (`str.split`'s maxsplit: the rest stays one string)."""
        return len(text.split(None, most)) + text.count("\n")

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` (as `encode` splits it) that the vocabulary lacks, in order: each is read as
        `<unk>` (a literal `<unk>` in the text is the symbol, not unknown)."""
        return [w for w in text.split() if self._key(w) not in self.index]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: its words (split on whitespace), `<eos>` for each newline ("\\n", "\\r\\n" or
        a lone "\\r": Python's universal newlines, which end the lines of the official code's files; a lone
        "\\r" was whitespace, two lines' words run together). Raises VocabError naming every word the
        vocabulary lacks (up to `NAMED_WORDS`) when it has no `unk`."""
        if self.unk_id is None and (unknown := self.unknown_words(text)):
            raise VocabError(self._unknown_message(unknown))
        lines = text_lines(text)
        ids: list[int] = []
        for k, line in enumerate(lines):
            ids += [self.word_id(w) for w in line.split()]
            if k < len(lines) - 1:
                ids.append(self.eos_id)
        return ids

    def piece(self, i: int) -> str:
        """Token i's text: "\\n" for `<eos>`, else " " + its word."""
        return "\n" if i == self.eos_id else " " + self.symbols[i]


VOCABS: dict[str, type[Vocab]] = {"words": WordVocab, "bytes": ByteVocab, "chars": CharVocab}


def load_vocab(folder: str | Path, meta: dict | None = None) -> Vocab | None:
    """The vocabulary a checkpoint folder carries (config.json `vocab`, written by `python -m
    model.convert ... --vocab`): a WordVocab, ByteVocab or CharVocab by its `kind`; None when it has none
    (byte-level text, audio). `meta`: the folder's config.json, when the caller read it already (else it
    is read here). Raises VocabError when the entry, the file or its checksum is wrong."""
    folder = Path(folder)
    try:
        entry = (json.loads((folder / "config.json").read_text()) if meta is None else meta).get("vocab")
    except (OSError, ValueError, AttributeError) as exc:
        raise VocabError(f"{folder / 'config.json'}: unreadable ({exc})") from None
    if entry is None:
        return None
    if not (isinstance(entry, dict) and entry.get("kind") in VOCABS and entry.get("file") == VOCAB_FILE):
        raise VocabError(
            f"{folder / 'config.json'}: vocab entry {entry!r} is not a vocabulary ({', '.join(VOCABS)}) in "
            f"{VOCAB_FILE}"
        )
    path = folder / VOCAB_FILE
    try:
        if path.exists():  # (a link out of the folder is refused, as the checkpoint's own files' are)
            checkpoint_file(folder, VOCAB_FILE)
        data = path.read_bytes()
    except CheckpointError as exc:
        raise VocabError(str(exc)) from None
    except OSError as exc:
        raise VocabError(f"{path}: missing or unreadable ({exc})") from None
    if entry.get("sha256") != hashlib.sha256(data).hexdigest():
        raise VocabError(f"{path}: checksum mismatch (changed after the conversion?)")
    try:  # the bytes just checked (the file was read again to parse it: a vocab.txt replaced meanwhile was
        # served unchecked)
        vocab = VOCABS[entry["kind"]].parse(data, lower_case=bool(entry.get("lower_case")))
    except UnicodeDecodeError as exc:
        raise VocabError(f"{path}: cannot read the vocabulary ({exc})") from None
    if len(vocab) != entry.get("size"):
        raise VocabError(f"{path}: {len(vocab)} symbols, config.json says {entry.get('size')}")
    return vocab


def main(argv: list[str] | None = None) -> int:
    """python -m model.vocab DATA_DIR DATASET_OR_CKPT OUT: the symbols file of a dataset's vocabulary (wt103,
    wt2, ptb, enwik8, text8; or the one a run's .ckpt was trained on, read from its config) built from its
    data folder as the official code builds it, one symbol per line in id order (what `model.convert
    --vocab` and a server given an official file with `vocab.txt` beside it read). Exit status 2 with the
    reason for a folder or dataset it cannot build from."""
    import argparse  # noqa: PLC0415
    import sys  # noqa: PLC0415

    about = " ".join(main.__doc__.split("\n\n")[0].split())
    ap = argparse.ArgumentParser(prog="python -m model.vocab", description=about)
    ap.add_argument("data_dir", help="the dataset's folder, as the official code reads it (train.txt, ...)")
    names = ", ".join(sorted(DATASETS))
    ap.add_argument("dataset", help=f"the official dataset's name ({names}), or the run's .ckpt or .pt, "
                    "whose config names it (dataset._name_): no other dataset's is taken, nor a vocabulary "
                    "of another size than its model's")  # fmt: skip
    ap.add_argument("out", help="the symbols file to write (vocab.txt beside an official .ckpt serves it)")
    args = ap.parse_args(argv)
    dataset, size = args.dataset, None
    if Path(dataset).is_file():  # the run's checkpoint: the dataset its config names, and its model's size
        from model.official.mapping import Unsupported, map_official  # noqa: PLC0415
        from model.official.reader import OfficialFormatError, dataset_name, read_source  # noqa: PLC0415

        try:
            sd, cfg, kind = read_source(dataset)
            dataset = dataset_name(cfg)
        except (OfficialFormatError, OSError) as exc:
            ap.error(f"{dataset}: cannot read its config ({exc})")
        try:
            size = map_official(sd, cfg, kind).config["vocab_size"]
        except Unsupported:  # (model.convert refuses it, naming why)
            pass
        if dataset not in DATASETS:
            ap.error(f"{args.dataset}: its config names dataset {dataset!r}, not one whose vocabulary is "
                     f"built here ({names})")  # fmt: skip
    elif dataset not in DATASETS:
        ap.error(f"dataset {dataset!r}: not a file, nor one of {names}")
    try:
        vocab = Vocab.from_dataset(args.data_dir, dataset)
    except (VocabError, OSError) as exc:
        ap.error(str(exc))
    if size is not None and len(vocab) != size:  # a server would refuse it beside the checkpoint
        ap.error(f"{args.data_dir} gives {len(vocab)} {vocab.unit}s of {dataset}, but {args.dataset}'s model "
                 f"has {size} tokens: not its run's data folder? ({args.out} not written)")  # fmt: skip
    try:
        sha = vocab.write(args.out)
    except OSError as exc:
        ap.error(f"{args.out}: cannot write it ({exc.strerror or exc})")
    if vocab.warning:
        print(f"warning: {vocab.warning}", file=sys.stderr)
    print(f"{args.out}: {len(vocab)} {vocab.unit}s of {dataset}, {vocab.origin} (sha256 {sha})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
