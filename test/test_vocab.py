"""The control vocabulary and a yes/no answer's tokens, read from a tokenizer (never hard-coded)."""
from __future__ import annotations

from typing import Dict, List

from kosmos2_ros.core.model.vocab import NO_SPELLINGS, YES_SPELLINGS, first_answer_tokens


class Pieces:
    """A tokenizer reduced to what `first_answer_tokens` asks: text -> ids, id -> piece."""

    unk_token_id = 0

    def __init__(self, split: Dict[str, List[str]]) -> None:
        self.split = split
        self.ids: Dict[str, int] = {"<unk>": 0}
        for pieces in split.values():
            for piece in pieces:
                self.ids.setdefault(piece, len(self.ids))
        self.pieces = {i: p for p, i in self.ids.items()}

    def __call__(self, text: str, add_special_tokens: bool = False) -> Dict[str, List[int]]:
        return {"input_ids": [self.ids[p] for p in self.split.get(text, ["<unk>"])]}

    def convert_ids_to_tokens(self, ident: int) -> str:
        return self.pieces[ident]


def test_whole_word_spellings_only_when_the_tokenizer_has_them() -> None:
    """The real tokenizer writes "Yes" as one token: its pieces of "YES" (`▁Y`, `ES`) would also count every
    word starting with `▁Y` ("You"), so they are left out."""
    tok = Pieces({" yes": ["\u2581yes"], "yes": ["yes"], " Yes": ["\u2581Yes"], "Yes": ["Yes"],
                  " YES": ["\u2581Y", "ES"], "YES": ["Y", "ES"]})
    got = tok.convert_ids_to_tokens
    assert [got(i) for i in first_answer_tokens(tok, YES_SPELLINGS)] == ["\u2581yes", "yes", "\u2581Yes", "Yes"]


def test_a_small_tokenizer_falls_back_to_first_pieces_after_the_word_boundary() -> None:
    tok = Pieces({" no": ["\u2581", "n", "o"], "no": ["\u2581", "n", "o"], " No": ["\u2581", "N", "o"],
                  "No": ["\u2581", "N", "o"], " NO": ["\u2581", "<unk>"], "NO": ["\u2581", "<unk>"]})
    got = tok.convert_ids_to_tokens
    assert [got(i) for i in first_answer_tokens(tok, NO_SPELLINGS)] == ["n", "N"]    # unknown spellings skipped
