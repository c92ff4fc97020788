"""Curation at prepare time: deduplication, a blocklist, and PII scrubbing.

Each piece works on one document at a time, so curation streams like the rest of
`prepare`. `Curator` chains them in the order that makes each one see the right
text: the blocklist reads what the author wrote (a blocked e-mail address must not
hide behind `<EMAIL>`), PII scrubbing runs next, and deduplication compares the
final text, so two copies that differ only in a scrubbed address count as one.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import DataError

DEDUP_MODES = ("none", "exact", "near")
CURATION_SKIP_REASONS = {
    "duplicate": "same text as an earlier document, up to whitespace",
    "near_duplicate": "MinHash/LSH match with an earlier document",
    "blocklisted": "contains a term of the --blocklist file",
}
PII_KINDS = ("email", "phone", "secret")
NUM_PERM = 128  # MinHash permutations
SHINGLE_WORDS = 5


# ---------------------------------------------------------------- deduplication


def _normalized(text: str) -> str:
    return " ".join(text.split())


class Deduplicator:
    """Remembers the documents it has been shown and says which ones repeat an earlier one.

    `exact` keeps one 16-byte hash per document. `near` also indexes each kept
    document's MinHash (word 5-gram shingles, 128 permutations) in an LSH table,
    which holds its band keys rather than the whole signature. LSH finds
    pairs by probability, not by computing every Jaccard similarity: at the
    default threshold 0.85, a pair with similarity 0.85 is caught about half the
    time, one at 0.95 almost always, one at 0.7 rarely. That is what makes a single
    streaming pass over millions of documents affordable.
    """

    def __init__(self, mode: str = "exact", threshold: float = 0.85):
        if mode not in DEDUP_MODES:
            raise ValueError(f"dedup mode must be one of {DEDUP_MODES}, got {mode!r}")
        self.mode = mode
        self._hashes: set[bytes] = set()
        self._lsh = None
        if mode == "near":
            datasketch = _datasketch()
            self._minhash = datasketch.MinHash
            self._lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=NUM_PERM)

    @property
    def reasons(self) -> tuple[str, ...]:
        """The skip reasons `seen` can return in this mode."""
        return {"none": (), "exact": ("duplicate",), "near": ("duplicate", "near_duplicate")}[self.mode]

    def seen(self, text: str) -> str | None:
        """'duplicate' or 'near_duplicate' when `text` repeats an earlier document; otherwise remember it."""
        if self.mode == "none":
            return None
        digest = hashlib.blake2b(_normalized(text).encode("utf-8"), digest_size=16).digest()
        if digest in self._hashes:
            return "duplicate"
        self._hashes.add(digest)
        if self._lsh is not None:
            words = re.findall(r"\w+", text.lower())
            if not words:  # nothing to compare but the exact text, done above
                return None
            signature = self._minhash(num_perm=NUM_PERM)
            signature.update_batch(  # a document shorter than 5 words is one shingle
                " ".join(words[i:i + SHINGLE_WORDS]).encode("utf-8")
                for i in range(max(1, len(words) - SHINGLE_WORDS + 1))
            )
            if self._lsh.query(signature):
                return "near_duplicate"
            self._lsh.insert(len(self._hashes), signature)  # any key unique to this document
        return None


def _datasketch():
    try:
        import datasketch
    except ImportError as exc:
        raise DataError("--dedup near needs the datasketch package: pip install gptforge[curate]") from exc
    return datasketch


# ---------------------------------------------------------------- blocklist


class Blocklist:
    """Terms and phrases whose presence drops a document: case-insensitive, whole words only.

    A phrase matches across any run of whitespace, so a line break inside it in the
    document does not let it through.
    """

    def __init__(self, terms: list[str], path: Path | None = None):
        self.terms, self.path = tuple(terms), path
        # Lookarounds, not \b: a term may begin or end with a non-word character ("c++").
        self._pattern = re.compile(rf"(?<!\w){_trie_pattern(self.terms)}(?!\w)", re.IGNORECASE)

    @classmethod
    def from_file(cls, path: str | Path) -> Blocklist:
        """One term or phrase per line; blank lines and lines starting with # are ignored."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise DataError(f"--blocklist {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"--blocklist {path}: cannot read it as UTF-8 text ({exc})") from None
        terms = [term for line in lines if (term := line.strip()) and not term.startswith("#")]
        if not terms:
            raise DataError(f"--blocklist {path}: no terms; expected one term or phrase per line (# starts a comment)")
        return cls(terms, path)

    def match(self, text: str) -> str | None:
        """The first blocked term found in `text`, as written there, or None."""
        found = self._pattern.search(text)
        return found.group(0) if found else None


def _trie_pattern(terms: tuple[str, ...]) -> str:
    """One regex for all terms, shaped as a trie of their characters.

    A plain alternation makes the regex engine try every term at every position of
    every document: with a thousand terms that crawls at 0.2 MB/s. The trie shares
    common prefixes, so each position costs about one term's length (20 MB/s+).
    """
    trie: dict = {}
    for term in terms:
        node = trie
        for char in " ".join(term.lower().split()):
            node = node.setdefault(char, {})
        node[""] = {}  # a term ends here

    def pattern(node: dict) -> str:
        branches = [(r"\s+" if char == " " else re.escape(char)) + pattern(child)
                    for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


# ---------------------------------------------------------------- PII

# A top-level domain from a short list of generic ones, or any two-letter country code in one case: so that a
# matrix product and an attribute in code (`x@w.weight`, `q@k.mT`) are not taken for an address.
_TLD = r"(?:(?i:com|org|net|edu|gov|mil|int|info|biz|io|ai|dev|app|tech|online|site|xyz|cloud|email)|[a-z]{2}|[A-Z]{2})"
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    rf"{_TLD}(?![\w-]|\.\w)"
)
# Three shapes, with separators where people put them, so that integers (signed or not), versions (1.2.3),
# dates and hex never qualify. A digit group right before or after (a table of numbers) disqualifies a match.
_PHONE = re.compile(
    r"""(?=[+(0-9])(?<![\w.+/-])(?<![0-9]\ )(?:    # the first character, checked first: most positions fail there
        \+[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?)?(?:[ .-]?[0-9]{2,4}){2,5}          # +44 20 7946 0958
      | (?:\([0-9]{3}\)\ ?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}                        # (415) 555-2671
      | 0[1-9][0-9]{0,3}(?P<sep>[ /-])[1-9][0-9]{1,7}(?:(?P=sep)[0-9]{2,8}){0,3}    # 020 7946 0958, 089/1234567
    )(?![\w/-]|[ .][0-9])""",
    re.VERBOSE,
)
_PHONE_DIGITS = range(9, 16)  # E.164 allows 15; fewer than 9 (country code included) is rarely a phone number


def _is_phone(candidate: str) -> bool:
    """Enough digits, and not a bare "+4294967296": that is far more often a signed integer in code."""
    return sum(char.isdigit() for char in candidate) in _PHONE_DIGITS and not candidate[1:].isdigit()


_SECRET = re.compile(
    # Every secret below starts with one of these characters; checking that first lets most positions of a
    # document fail at once, which makes the whole pattern about 4 times faster.
    r"(?=[-AaSsGgCcPp])(?:"
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----"
    r"(?:[A-Za-z0-9+/=\s:,-]*?-----END \1PRIVATE KEY-----|(?:\s*[A-Za-z0-9+/=]{40,})+)"  # or cut off after its body
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|(?<![\w-])sk-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{20,}"  # OpenAI/Anthropic/Stripe-style keys
    r"|\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"  # GitHub tokens
    r"|(?i:api[_-]?key|secret[_-]?key|client[_-]?secret|access[_-]?token|auth[_-]?token|password|passwd)"
    r"\w*[\"']?\s*[:=]\s*([\"'])(?P<value>[^\s\"']{8,})\2"  # only the value is replaced
    r")"
)


def scrub_pii(text: str) -> tuple[str, Counter]:
    """`text` with e-mail addresses, phone numbers and secrets replaced by <EMAIL>, <PHONE>, <SECRET>,
    and how many of each were replaced.

    Secrets go first, so digits inside a key are never taken for a phone number. An
    assignment such as `password = "..."` keeps its name: only the value is replaced.
    """
    counts = Counter()

    def secret(match: re.Match) -> str:
        counts["secret"] += 1
        if match.group("value") is None:
            return "<SECRET>"
        start, end = (i - match.start() for i in match.span("value"))
        return match.group()[:start] + "<SECRET>" + match.group()[end:]

    def email(match: re.Match) -> str:
        counts["email"] += 1
        return "<EMAIL>"

    def phone(match: re.Match) -> str:
        if not _is_phone(match.group()):
            return match.group()
        counts["phone"] += 1
        return "<PHONE>"

    text = _SECRET.sub(secret, text)
    if "@" in text:  # a plain substring test skips most documents far faster than the regex could
        text = _EMAIL.sub(email, text)
    return _PHONE.sub(phone, text), counts


# ---------------------------------------------------------------- the chain


@dataclass
class Curator:
    """One pass of curation over a document stream; `pii` counts what was scrubbed in the documents kept."""

    dedup: Deduplicator
    blocklist: Blocklist | None = None
    scrub: bool = False
    pii: Counter = field(default_factory=Counter)

    @property
    def reasons(self) -> tuple[str, ...]:
        """The skip reasons this curator can report."""
        return self.dedup.reasons + (("blocklisted",) if self.blocklist else ())

    def documents(
        self, documents: Iterator[tuple[str, str]], skip: Callable[[str, str], None]
    ) -> Iterator[tuple[str, str]]:
        """The (text, location) pairs that survive, with their final text; `skip(reason, location)` for the rest."""
        for text, location in documents:
            if self.blocklist is not None and self.blocklist.match(text):
                skip("blocklisted", location)
                continue
            found = Counter()
            if self.scrub:
                text, found = scrub_pii(text)
            reason = self.dedup.seen(text)
            if reason:
                skip(reason, location)
                continue
            self.pii.update(found)  # counted in what is kept, not in copies dropped later
            yield text, location
