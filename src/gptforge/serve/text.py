"""Generated tokens to released text: stop strings, partial characters and the output safety filter.

Text is released as tokens arrive, but never a character that could still change what the client should
see: a byte-level token may end inside a UTF-8 character, the end of the text may be the start of a stop
string, and a word list or pattern of the safety filter may match once more text follows. So the last
`holdback` characters (to the last whitespace before them) wait, matches of the filter are masked before
they leave, and a stop string ends the text before it. Streaming and non-streaming responses both come
from here, so they say the same thing.
"""

from __future__ import annotations

HOLDBACK = 32  # characters kept back while the filter might still match across them (a card number is 19)


class TextStream:
    def __init__(self, tokenizer, stop: list[str], safety=None, holdback: int = HOLDBACK):
        self.tokenizer, self.stop, self.safety = tokenizer, [s for s in stop if s], safety
        self.holdback = holdback if safety is not None else 0
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string)
        self.released = 0  # characters of self.text already released
        self.stopped = False  # a stop string was found (or the filter withheld the output)
        self.blocked = False
        self.masked = 0  # spans masked while streaming
        self._base = 0  # tokens before this one are in self.text

    def push(self, token: int) -> str:
        """Take one token; return the text that may be released now."""
        if self.stopped:
            return ""
        self.ids.append(token)
        # Byte-level decoding concatenates, so only the tokens after the last whole character are decoded.
        piece = self.tokenizer.decode(self.ids[self._base:])
        if piece.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
            return ""
        self._base = len(self.ids)
        self.text += piece
        for s in self.stop:
            i = self.text.find(s, max(0, self.released - len(s)))
            if i >= 0:
                self.text = self.text[:i]
                self.stopped = True
        if self.stopped:
            return self._release(len(self.text))
        tail = max([len(s) - 1 for s in self.stop] + [self.holdback])
        cut = len(self.text) - tail
        if self.holdback and cut > self.released:
            space = max(self.text.rfind(" ", self.released, cut), self.text.rfind("\n", self.released, cut))
            cut = space + 1 if space >= 0 else cut  # no word break in sight: release up to the held tail
        return self._release(cut) if cut > self.released else ""

    def finish(self) -> str:
        """The text still held back, at the end of generation."""
        if self.blocked:
            return ""
        return self._release(len(self.text))

    def _release(self, cut: int) -> str:
        if self.safety is None:
            out, self.released = self.text[self.released:cut], cut
            return out
        # Only text near what is released can hold a new match: check from a window before it, not from
        # the start (the whole answer is checked once more at the end, for the counts and the audit).
        base = max(0, self.released - 4 * HOLDBACK)
        verdict = self.safety.check(self.text[base:cut] if cut == len(self.text) else self.text[base:])
        verdict.spans = [(start + base, end + base, category) for start, end, category in verdict.spans]
        if verdict.blocked:
            self.stopped = self.blocked = True
            refusal = self.safety.refusal.replace("{categories}", ", ".join(sorted(verdict.categories)))
            return ("\n" if self.released else "") + refusal
        pieces, pos = [], self.released
        for start, end, category in verdict.spans:
            if end <= self.released or start >= cut:
                continue
            if end > cut:  # a match runs past the cut: release up to its start only
                cut = max(start, self.released)
                break
            pieces += [self.text[pos:max(start, pos)], f"[masked:{category}]"]
            pos = end
            self.masked += 1
        pieces.append(self.text[pos:cut] if cut > pos else "")
        self.released = max(cut, pos)
        return "".join(pieces)
