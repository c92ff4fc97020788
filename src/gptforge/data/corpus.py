"""Where documents come from: the user's files, or the built-in corpus.

`collect_files` turns INPUT arguments into a file list and `Reader` streams the
documents in them, skipping (and counting) what cannot be used.

What one document may cost is bounded, whatever the input: only regular files are
opened (a FIFO would block forever, a link to /dev/zero never ends), a document
longer than `MAX_DOCUMENT_CHARS` is cut into pieces of at most that size (a text
file is read in chunks, so memory does not grow with the length of a line), a
JSONL line may hold at most `MAX_LINE_BYTES`, and JSON nested deeper than Python
can parse is skipped rather than aborting the run. Pieces and skips are counted.

The built-in corpus is the Python standard library's own source code: every
installation carries about 30 MB of varied, well-written text there, so
`gptforge train` works offline with no dataset at hand. `prepare.builtin_data_dir`
tokenizes it once into a cache folder and reuses it afterwards.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import stat
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import DataError

PIECE_MARK = " part "  # a later piece's location: `data/big.txt part 2`
MAX_DOCUMENT_CHARS = 1 << 20  # longer documents are cut into pieces of at most this many characters
MAX_LINE_BYTES = 64 << 20  # a longer JSONL line is skipped, read past in chunks
READ_BYTES = 1 << 20  # chunk size for files longer than one piece

SKIP_REASONS = {
    "not_regular": "not a regular file (a FIFO, device or socket, or a link to one); never opened",
    "empty": "empty file, or text that is only whitespace",
    "binary": "NUL byte in the first 8 KB",
    "invalid_utf8": "not valid UTF-8; skipped, not repaired",
    "malformed_json": "JSONL line that does not parse",
    "too_long": f"JSONL line longer than {MAX_LINE_BYTES >> 20} MiB",
    "too_deep": "JSONL line nested too deeply to parse",
    "missing_field": "no text field/column, null text, or a JSONL line that is not an object",
    "non_string_field": "text field/column holds something other than a string",
    "unreadable": "the operating system could not read it",
}
MAX_EXAMPLES = 5  # locations kept per skip reason
SNIFF_BYTES = 8192  # a NUL byte this early means a binary file


# ---------------------------------------------------------------- the user's files


def collect_files(inputs: list[str], exclude: Path | None = None) -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into a de-duplicated file list.

    Directory walks are sorted, so the same inputs always give the same document
    order, and skip hidden entries and `__pycache__` (metadata, not corpus) as
    well as `exclude` (the output folder, when preparing into a subfolder of INPUT).
    """
    files, seen = [], set()
    for item in inputs:
        path = Path(item)
        if path.exists() or path.is_symlink():
            matches = [path]
        elif any(char in item for char in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"{item}: the pattern matches no files")
        else:
            raise DataError(f"{item}: no such file or directory")
        for match in matches:
            for file in _walk(match, exclude) if match.is_dir() else [match]:
                key = os.path.realpath(file)
                if key not in seen:
                    seen.add(key)
                    files.append(file)
    return files


def _walk(top: Path, exclude: Path | None) -> Iterator[Path]:
    excluded = os.path.realpath(exclude) if exclude else None
    for root, dirs, names in os.walk(top):
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".") and d != "__pycache__" and os.path.realpath(os.path.join(root, d)) != excluded
        )
        yield from (Path(root, name) for name in sorted(names) if not name.startswith("."))


def file_size(path: Path) -> int:
    """Size for progress accounting; 0 for what cannot be stat'ed."""
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reported as unreadable when it is read


def parquet_module():
    """`pyarrow.parquet`, an optional dependency, or a DataError saying how to install it."""
    try:
        import pyarrow.parquet
    except ImportError as exc:
        raise DataError("reading .parquet files needs pyarrow: pip install gptforge[parquet]") from exc
    return pyarrow.parquet


def is_later_piece(location: str) -> bool:
    """Whether a document's location (as Reader.documents gives it) names the second or a later piece of a
    long document."""
    head, mark, number = location.rpartition(PIECE_MARK)
    return bool(mark) and number.isdigit() and int(number) >= 2


def pieces(chunks: Iterable[str]) -> Iterator[str]:
    """The text of one document, given in `chunks`, as pieces of at most MAX_DOCUMENT_CHARS characters.

    A document that fits is yielded whole. A longer one is cut after the last newline
    of each window, else before its last space (where a byte-level BPE starts a word
    anyway), else at the limit; a cut is looked for in the second half of the window
    so that no piece is tiny.
    """
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        start = 0
        while len(buffer) - start > MAX_DOCUMENT_CHARS:
            cut = _cut(buffer, start)
            yield buffer[start:cut]
            start = cut
        buffer = buffer[start:]
    yield buffer


def _cut(text: str, start: int) -> int:
    end = start + MAX_DOCUMENT_CHARS
    half = start + MAX_DOCUMENT_CHARS // 2
    newline = text.rfind("\n", half, end)
    if newline >= 0:
        return newline + 1
    space = text.rfind(" ", half, end)
    return space if space >= 0 else end


@dataclass
class Reader:
    """Yields the documents in `files`, skipping and counting what cannot be used.

    Formats go by extension: `.jsonl`/`.ndjson` hold one JSON object per line with
    the text under `text_field`; `.parquet` has it in column `text_column`; any
    other file is UTF-8 text and one document. A document longer than
    MAX_DOCUMENT_CHARS comes as several pieces (see `pieces`), counted in
    `split_documents` and `split_pieces`; with `first_piece_only`, only its first.
    """

    files: list[Path]
    text_field: str = "text"
    text_column: str = "text"
    first_piece_only: bool = False
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    files_done: int = 0
    bytes_done: int = 0
    split_documents: int = 0
    split_pieces: int = 0
    split_examples: list[str] = field(default_factory=list)

    def documents(self) -> Iterator[tuple[str, str]]:
        """(text, location) pairs; locations look like `data/x.jsonl:17`, or `data/big.txt part 2` for a piece."""
        readers = {".jsonl": self._jsonl, ".ndjson": self._jsonl, ".parquet": self._parquet}
        for path in self.files:
            if self._is_regular(path):
                yield from readers.get(path.suffix.lower(), self._text)(path)
            self.files_done += 1

    def skip(self, reason: str, location: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(location)

    def _is_regular(self, path: Path) -> bool:
        """Stat (following links) before opening: opening a FIFO blocks, a device may never end."""
        try:
            mode = path.stat().st_mode
        except OSError:
            self.skip("unreadable", str(path))
            return False
        if not stat.S_ISREG(mode):
            self.skip("not_regular", str(path))
            return False
        return True

    def _document(self, chunks: Iterable[str], location: str) -> Iterator[tuple[str, str]]:
        """One usable document, in pieces when it is longer than MAX_DOCUMENT_CHARS."""
        count = 0
        for count, piece in enumerate(pieces(chunks), 1):
            yield piece, location if count == 1 else f"{location}{PIECE_MARK}{count}"
            if self.first_piece_only:
                return
        if count > 1:
            self.split_documents += 1
            self.split_pieces += count
            if len(self.split_examples) < MAX_EXAMPLES:
                self.split_examples.append(location)

    def _text(self, path: Path) -> Iterator[tuple[str, str]]:
        if file_size(path) > MAX_DOCUMENT_CHARS:
            yield from self._long_text(path)
            return
        try:
            data = path.read_bytes()
        except OSError:
            self.skip("unreadable", str(path))
            return
        self.bytes_done += len(data)
        if b"\0" in data[:SNIFF_BYTES]:
            self.skip("binary", str(path))
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.skip("invalid_utf8", str(path))
            return
        if not text.strip():
            self.skip("empty", str(path))
            return
        yield text, str(path)

    def _long_text(self, path: Path) -> Iterator[tuple[str, str]]:
        """A text file longer than one piece, read in chunks: checked whole first (a file with invalid
        UTF-8 is skipped entirely, as a short one is), then streamed as pieces."""
        try:
            problem = _text_problem(path)
            if problem:
                self.skip(problem, str(path))
                self.bytes_done += file_size(path)
                return
            yield from self._document(self._decoded(path), str(path))
        except OSError:
            self.skip("unreadable", str(path))

    def _decoded(self, path: Path) -> Iterator[str]:
        for text, size in _decoded_chunks(path):
            self.bytes_done += size
            yield text

    def _jsonl(self, path: Path) -> Iterator[tuple[str, str]]:
        """One document per line; blank lines are separators, not documents."""
        lines = lineno = 0
        try:
            with open(path, "rb") as f:
                if b"\0" in f.read(SNIFF_BYTES):
                    self.skip("binary", str(path))
                    self.bytes_done += file_size(path)
                    return
                f.seek(0)
                while line := f.readline(MAX_LINE_BYTES + 1):
                    lineno += 1
                    self.bytes_done += len(line)
                    if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                        self.bytes_done += _read_past_line(f)
                        lines += 1
                        self.skip("too_long", f"{path}:{lineno}")
                    elif line.strip():
                        lines += 1
                        yield from self._json_document(line, f"{path}:{lineno}")
        except OSError:
            self.skip("unreadable", f"{path}:{lineno + 1}" if lineno else str(path))
            return
        if not lines:
            self.skip("empty", str(path))

    def _json_document(self, line: bytes, location: str) -> Iterator[tuple[str, str]]:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            self.skip("invalid_utf8", location)
            return
        except json.JSONDecodeError:
            self.skip("malformed_json", location)
            return
        except RecursionError:
            self.skip("too_deep", location)
            return
        text = obj.get(self.text_field) if isinstance(obj, dict) else None
        yield from self._checked(text, location)

    def _parquet(self, path: Path) -> Iterator[tuple[str, str]]:
        pq = parquet_module()
        row = 0
        try:
            parquet = pq.ParquetFile(path)
            if self.text_column not in parquet.schema_arrow.names:
                self.skip("missing_field", str(path))
            else:
                for batch in parquet.iter_batches(batch_size=1024, columns=[self.text_column]):
                    for text in batch.column(0).to_pylist():
                        row += 1
                        yield from self._checked(text, f"{path}:row {row}")
        except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            self.skip("unreadable", f"{path}:row {row + 1}" if row else str(path))
        self.bytes_done += file_size(path)

    def _checked(self, text: object, location: str) -> Iterator[tuple[str, str]]:
        """The text of one JSON line or Parquet row, if it is a usable document."""
        if text is None:
            self.skip("missing_field", location)
        elif not isinstance(text, str):
            self.skip("non_string_field", location)
        elif not _encodable(text):
            self.skip("invalid_utf8", location)
        elif not text.strip():
            self.skip("empty", location)
        else:
            yield from self._document([text], location)


def _decoded_chunks(path: Path) -> Iterator[tuple[str, int]]:
    """(text, bytes read) for each chunk of a UTF-8 file; raises UnicodeDecodeError where it is invalid."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while data := f.read(READ_BYTES):
            yield decoder.decode(data), len(data)
    yield decoder.decode(b"", final=True), 0


def _text_problem(path: Path) -> str | None:
    """The skip reason of a long text file ('binary', 'invalid_utf8' or 'empty'), or None; one chunk in memory."""
    with open(path, "rb") as f:
        if b"\0" in f.read(SNIFF_BYTES):
            return "binary"
    blank = True
    try:
        for text, _ in _decoded_chunks(path):
            blank = blank and (not text or text.isspace())
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "empty" if blank else None


def _read_past_line(f) -> int:
    """Read to the end of the current line in chunks; the number of bytes read."""
    size = 0
    while chunk := f.readline(READ_BYTES):
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return size


def _encodable(text: str) -> bool:
    """False for JSON text with lone surrogate escapes ("\\ud800"), which no UTF-8 can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------- the built-in corpus

_EXCLUDED_DIRS = {"site-packages", "dist-packages"}  # third-party code, differs per machine


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every `*.py` file of the standard library, sorted so the corpus is the same on every run."""
    files = []
    for root, dirs, names in os.walk(stdlib_dir()):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
        files.extend(Path(root, name) for name in names if name.endswith(".py"))
    return sorted(files)


def cache_root() -> Path:
    """Where prepared data is cached: `$GPTFORGE_CACHE`, else `~/.cache/gptforge`."""
    return Path(os.environ.get("GPTFORGE_CACHE") or Path.home() / ".cache" / "gptforge")
