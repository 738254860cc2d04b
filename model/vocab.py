"""Word vocabularies as the official state-spaces/s4 LM datasets number them (WikiText-2/103, PTB).

The official code (src/dataloaders/utils/vocabulary.py `Vocab`, src/dataloaders/lm.py; read for facts,
not copied) builds the vocabulary from the corpus, not the checkpoint: its special symbols first
(`<eos>`), then every symbol of the counted files by decreasing count, ties in the order first seen
(`Counter.most_common`). A line is tokenized by `line.strip().split()` (lower-cased for PTB), and
each line of a file ends with `<eos>` when encoded. WikiText-103 counts train.txt only; WikiText-2 and
PTB count train, valid and test. A vocabulary can also be read from a symbols file, one per line (the
official `vocab_file` format: the first whitespace-separated field of each line).

Text ↔ ids here follows those conventions: `encode` splits the text into lines and words, each
newline is `<eos>`; an unknown word is `<unk>` when the vocabulary has that symbol (WikiText's own
convention), else a ValueError naming it. `piece(i)` is a token's text: "\\n" for `<eos>`, else a space
and the word, so decoded text reads as WikiText's raw files (" The game began ... \\n") and
`encode(decode(ids)) == ids` for every id.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

EOS, UNK = "<eos>", "<unk>"
VOCAB_FILE = "vocab.txt"
# the official datasets' vocabularies (lm.py): files counted, lower-casing, special symbols
DATASETS = {
    "wt103": (("train.txt",), False),
    "wt2": (("train.txt", "valid.txt", "test.txt"), False),
    "ptb": (("train.txt", "valid.txt", "test.txt"), True),
}


class VocabError(ValueError):
    """A vocabulary file or corpus that cannot be read, or text it cannot encode."""


class WordVocab:
    """symbols[i] is token i's word (no whitespace inside a symbol). `eos` must be a symbol; `unk` is
    used for unknown words when it is one. Raises VocabError for an empty or duplicated symbol list."""

    def __init__(self, symbols: list[str], lower_case: bool = False, eos: str = EOS, unk: str = UNK):
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
        if eos not in self.index:
            raise VocabError(f"the vocabulary has no {eos!r} symbol (the end of a line)")
        self.lower_case, self.eos, self.unk = lower_case, eos, unk
        self.eos_id = self.index[eos]
        self.unk_id = self.index.get(unk)
        self._bytes = [self.piece(i).encode("utf-8") for i in range(len(self.symbols))]

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_corpus(cls, paths: Iterable[str | Path], lower_case: bool = False, special=(EOS,)) -> WordVocab:
        """The official Vocab(special, lower_case).count_file(path) for each path in order, then
        build_vocab() (min_freq 0, no max_size): the specials, then most_common()."""
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
        symbols += [s for s, _ in counter.most_common() if s not in seen]
        return cls(symbols, lower_case=lower_case)

    @classmethod
    def from_dataset(cls, data_dir: str | Path, dataset: str) -> WordVocab:
        """The vocabulary the official code builds for `dataset` (wt103, wt2, ptb) from its data folder."""
        if dataset not in DATASETS:
            raise VocabError(f"dataset {dataset!r}: a word vocabulary is built for {sorted(DATASETS)} only")
        files, lower = DATASETS[dataset]
        return cls.from_corpus([Path(data_dir) / f for f in files], lower_case=lower)

    @classmethod
    def read(cls, path: str | Path, lower_case: bool = False) -> WordVocab:
        """A symbols file: the first whitespace-separated field of each non-blank line is the next symbol
        (the official vocab_file format; our checkpoints' vocab.txt)."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise VocabError(f"{path}: cannot read the vocabulary ({exc})") from None
        return cls([ln.split()[0] for ln in lines if ln.strip()], lower_case=lower_case)

    def write(self, path: str | Path) -> str:
        """Write the symbols file (one per line); returns its SHA-256."""
        data = "".join(s + "\n" for s in self.symbols).encode("utf-8")
        Path(path).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def describe(self) -> dict:
        """The config.json entry (`vocab`) that says how to read the symbols file back."""
        return {"kind": "words", "file": VOCAB_FILE, "size": len(self), "lower_case": self.lower_case,
                "eos": self.eos, "unk": self.unk if self.unk_id is not None else None}  # fmt: skip

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

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` (as `encode` splits it) that the vocabulary lacks, in order: each is read as
        `<unk>` (a literal `<unk>` in the text is the symbol, not unknown)."""
        return [w for w in text.split() if self._key(w) not in self.index]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: its words (split on whitespace), `<eos>` for each newline."""
        lines = text.split("\n")
        ids: list[int] = []
        for k, line in enumerate(lines):
            ids += [self.word_id(w) for w in line.split()]
            if k < len(lines) - 1:
                ids.append(self.eos_id)
        return ids

    def piece(self, i: int) -> str:
        """Token i's text: "\\n" for `<eos>`, else " " + its word."""
        return "\n" if i == self.eos_id else " " + self.symbols[i]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.piece(i) for i in ids)

    def token_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of the tokens' text (`decode(ids).encode()`, from a table): what the server
        matches stop sequences against and streams as text."""
        b = self._bytes
        return b"".join(b[i] for i in ids)


def load_vocab(folder: str | Path) -> WordVocab | None:
    """The word vocabulary a checkpoint folder carries (config.json `vocab`, written by `python -m
    model.convert ... --vocab`), or None when it has none (byte-level text, audio). Raises VocabError
    when the entry, the file or its checksum is wrong."""
    folder = Path(folder)
    try:
        entry = json.loads((folder / "config.json").read_text()).get("vocab")
    except (OSError, ValueError) as exc:
        raise VocabError(f"{folder / 'config.json'}: unreadable ({exc})") from None
    if entry is None:
        return None
    if not (isinstance(entry, dict) and entry.get("kind") == "words" and entry.get("file") == VOCAB_FILE):
        raise VocabError(
            f"{folder / 'config.json'}: vocab entry {entry!r} is not a word vocabulary in {VOCAB_FILE}"
        )
    path = folder / VOCAB_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocabError(f"{path}: missing or unreadable ({exc})") from None
    if entry.get("sha256") != hashlib.sha256(data).hexdigest():
        raise VocabError(f"{path}: checksum mismatch (changed after the conversion?)")
    vocab = WordVocab.read(path, lower_case=bool(entry.get("lower_case")))
    if len(vocab) != entry.get("size"):
        raise VocabError(f"{path}: {len(vocab)} symbols, config.json says {entry.get('size')}")
    return vocab


def main(argv: list[str] | None = None) -> int:
    """python -m model.vocab DATA_DIR DATASET_OR_CKPT OUT: the symbols file of a dataset's vocabulary (wt103,
    wt2, ptb; or the one a run's .ckpt was trained on, read from its config) built from its data folder as
    the official code builds it, one word per line in id order (what
    `WordVocab.read`, `model.convert --vocab` and a server given an official file with `vocab.txt` beside
    it read). Exit status 2 with the reason for a folder or dataset it cannot build from."""
    import argparse  # noqa: PLC0415

    about = " ".join(main.__doc__.split("\n\n")[0].split())
    ap = argparse.ArgumentParser(prog="python -m model.vocab", description=about)
    ap.add_argument("data_dir", help="the dataset's folder, as the official code reads it (train.txt, ...)")
    names = ", ".join(sorted(DATASETS))
    ap.add_argument("dataset", help=f"the official dataset's name ({names}), or the run's .ckpt or .pt, "
                    "whose config names it (dataset._name_): no other dataset's is taken")  # fmt: skip
    ap.add_argument("out", help="the symbols file to write (vocab.txt beside an official .ckpt serves it)")
    args = ap.parse_args(argv)
    dataset = args.dataset
    if Path(dataset).is_file():  # the run's checkpoint: the dataset its config names
        from model.official.reader import OfficialFormatError, dataset_name, read_source  # noqa: PLC0415

        try:
            dataset = dataset_name(read_source(dataset)[1])
        except (OfficialFormatError, OSError) as exc:
            ap.error(f"{dataset}: cannot read its config ({exc})")
        if dataset not in DATASETS:
            ap.error(f"{args.dataset}: its config names dataset {dataset!r}, not one whose word vocabulary "
                     f"is built here ({names})")  # fmt: skip
    elif dataset not in DATASETS:
        ap.error(f"dataset {dataset!r}: not a file, nor one of {names}")
    try:
        vocab = WordVocab.from_dataset(args.data_dir, dataset)
    except (VocabError, OSError) as exc:
        ap.error(str(exc))
    try:
        sha = vocab.write(args.out)
    except OSError as exc:
        ap.error(f"{args.out}: cannot write it ({exc.strerror or exc})")
    print(f"{args.out}: {len(vocab)} words of {dataset} (sha256 {sha})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
