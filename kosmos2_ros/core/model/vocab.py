"""Token ids of Kosmos-2's control vocabulary, read from the tokenizer.

Ids differ between the real checkpoint and tiny test tokenizers, so nothing in the
package hard-codes them; everything asks a `GroundingVocab`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, Tuple

NUM_PATCH_INDEX_TOKENS = 1024
PATCH_TOKEN_RE = re.compile(r"<patch_index_(\d+)>")

TAG_TOKENS = (
    "</doc>", "<image>", "</image>", "</chunk>", "</line>", "<phrase>", "</phrase>",
    "<object>", "</object>", "</delimiter_of_multi_objects/>", "<grounding>",
)


def patch_token(index: int) -> str:
    return f"<patch_index_{index:04d}>"


#: How an answer of yes or no may be spelt after "Answer:" (with and without the word's leading space).
YES_SPELLINGS = ("yes", "Yes", "YES")
NO_SPELLINGS = ("no", "No", "NO")


def first_answer_tokens(tokenizer: Any, spellings: Iterable[str]) -> Tuple[int, ...]:
    """The tokens an answer is written as after "Answer:": each spelling (with its leading space, and
    without) that the tokenizer writes as one token (`▁Yes`, `▁yes`, `yes` for the real one). Only for a
    tokenizer with no such spelling at all (the small test ones: `▁`, `y`, `es`) the first piece of each
    spelling stands in, which other words may share; a spelling in several pieces never counts otherwise
    (`▁Y` + `ES` would count "You")."""
    whole, first = [], []
    for word in spellings:
        for text in (f" {word}", word):
            ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
            content = [i for i in ids if tokenizer.convert_ids_to_tokens(i).strip("\u2581 ")]
            if not content or tokenizer.unk_token_id in content:
                continue
            target = whole if len(content) == 1 else first
            if content[0] not in target:
                target.append(content[0])
    return tuple(whole or first)


@dataclass(frozen=True)
class GroundingVocab:
    bos: int
    eos: int
    pad: int
    unk: int
    boi: int                # <image>
    eoi: int                # </image>
    phrase_open: int
    phrase_close: int
    object_open: int
    object_close: int
    delimiter: int          # </delimiter_of_multi_objects/>
    grounding: int
    first_patch: int        # <patch_index_0000>; patch k is first_patch + k
    num_patches: int
    vocab_size: int
    control_strings: FrozenSet[str]   # every string that would tokenize to a control token
    # A yes/no answer's first token, every spelling (`first_answer_tokens`); a token both could start is in neither.
    yes_tokens: Tuple[int, ...] = ()
    no_tokens: Tuple[int, ...] = ()

    @property
    def patches_per_side(self) -> int:
        return int(round(self.num_patches ** 0.5))

    def is_patch(self, token_id: int) -> bool:
        return self.first_patch <= token_id < self.first_patch + self.num_patches

    def patch_ids(self) -> Tuple[int, int]:
        """Half-open id range [start, stop) of the location tokens."""
        return self.first_patch, self.first_patch + self.num_patches

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> GroundingVocab:
        def tid(token: str) -> int:
            ident = tokenizer.convert_tokens_to_ids(token)
            if ident is None or ident == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {token!r} token: not a Kosmos-2 processor tokenizer")
            return int(ident)

        first = tid(patch_token(0))
        last = tid(patch_token(NUM_PATCH_INDEX_TOKENS - 1))
        if last - first != NUM_PATCH_INDEX_TOKENS - 1:
            raise ValueError("the tokenizer's <patch_index_XXXX> ids are not contiguous")
        added: Dict[str, int] = tokenizer.get_added_vocab()
        specials = set(tokenizer.all_special_tokens)
        yes, no = first_answer_tokens(tokenizer, YES_SPELLINGS), first_answer_tokens(tokenizer, NO_SPELLINGS)
        return cls(
            bos=int(tokenizer.bos_token_id), eos=int(tokenizer.eos_token_id),
            pad=int(tokenizer.pad_token_id), unk=int(tokenizer.unk_token_id),
            boi=tid("<image>"), eoi=tid("</image>"),
            phrase_open=tid("<phrase>"), phrase_close=tid("</phrase>"),
            object_open=tid("<object>"), object_close=tid("</object>"),
            delimiter=tid("</delimiter_of_multi_objects/>"), grounding=tid("<grounding>"),
            first_patch=first, num_patches=NUM_PATCH_INDEX_TOKENS,
            vocab_size=len(tokenizer),
            control_strings=frozenset(set(added) | specials | set(TAG_TOKENS)),
            yes_tokens=tuple(t for t in yes if t not in no), no_tokens=tuple(t for t in no if t not in yes),
        )
