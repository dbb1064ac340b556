"""Token ids to text as they arrive, with OpenAI ``stop`` sequences.

The whole reply is decoded again at every step and only the new characters are handed out,
so the pieces always add up to the final text (a byte-level BPE token may end in the middle
of a UTF-8 character: such an incomplete tail waits for the next token). Text that could be
the start of a stop sequence is held back until it is clearly not; when a stop sequence
appears, the reply ends just before it.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # handed out so far
        self.stopped = False  # a stop sequence matched: the reply is over

    def feed(self, ids: list[int]) -> str:
        """New text after ``ids`` (possibly empty); sets ``stopped`` on a stop sequence."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for i in (full.find(s, max(0, len(self.text) - len(s) + 1))
                                for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._advance(full[:min(hits)])
        safe = len(full.rstrip("\ufffd"))  # an incomplete UTF-8 tail waits
        hold = 0
        for s in self.stop:  # so does a tail that may still grow into a stop sequence
            hold = max([hold] + [k for k in range(1, len(s)) if full[:safe].endswith(s[:k])])
        return self._advance(full[:safe - hold])

    def finish(self) -> str:
        """The held-back rest once generation has ended (no more tokens will come)."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _advance(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        new, self.text = upto[len(self.text):], upto
        return new
