"""Token ids to text for one request: mlx-lm's streaming detokenizer plus
the cut at stop strings, which the server makes (the decoder only knows
token ids)."""

from __future__ import annotations

from typing import Any, List, Sequence

from mlx_mtp.api import _StopMatcher


class TextStream:
    """Feed a row's tokens as they come; `feed` returns the new text.
    After a stop string has been seen (`stopped`), the rest is ignored:
    the request then cancels its row."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self._detokenizer = tokenizer.detokenizer  # a fresh one per call
        self._stops = _StopMatcher(stops)
        #: tokens that made it into the text (all of them up to a stop)
        self.tokens: List[int] = []
        self.stopped = False

    def feed(self, tokens: Sequence[int]) -> str:
        text = ""
        for token in tokens:
            if self.stopped:
                break
            self.tokens.append(int(token))
            self._detokenizer.add_token(int(token))
            piece, self.stopped = self._stops.feed(self._detokenizer.last_segment)
            text += piece
        return text

    def finish(self) -> str:
        """What the detokenizer and the stop matcher still hold."""
        if self.stopped:
            return ""
        self._detokenizer.finalize()
        piece, self.stopped = self._stops.feed(self._detokenizer.last_segment)
        return piece if self.stopped else piece + self._stops.flush()
