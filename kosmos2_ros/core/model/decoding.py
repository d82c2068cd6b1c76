"""The greedy decode loop shared by every backend: free, or constrained to a box.

Free decoding is transformers' greedy search: argmax of float32 logits (first index on
ties), stop after eos or `max_new_tokens`. Constrained decoding is for prompts that end in a
phrase whose box is wanted: it appends `<object>` itself, lets the model choose only among
location tokens (then between `</object>` and the multi-object delimiter), and stops at
`</object>`. Whenever free decoding yields a well-formed box, both give the same box, the
constrained one in fewer model calls.

Logits processors (`NoRepeatNGram`, as transformers' `NoRepeatNGramLogitsProcessor`) are
small objects a row carries and the loop applies in order before choosing a token, in both
modes: a constrained row chooses among its allowed tokens after the processors have banned
theirs (a banned location token is skipped for the next best).

The loop reads each step's logits through `backends.logits.TokenScores`: the argmax, the softmax
normaliser and the location and control tokens' logits, computed where the backend's logits are
(on the GPU for the torch and TensorRT backends), so a token costs one small transfer, not a
65k-float row.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..backends.base import Backend
from ..backends.logits import Readout, TokenScores, read_scores
from .vocab import GroundingVocab

#: A row's next-token logits as the functions below take them: the loop's `TokenScores`, or a [vocab] array.
Logits = Union[TokenScores, np.ndarray]


class DecodingMode(str, enum.Enum):
    FREE = "free"
    CONSTRAINED = "constrained"

    @classmethod
    def parse(cls, value: str) -> DecodingMode:
        try:
            return cls((value or "").strip().lower())
        except ValueError:
            raise ValueError(f"unknown decoding mode {value!r}; expected free or constrained") from None


class Cancelled(Exception):
    """Raised inside the loop when the caller's `should_stop` says so."""


class LogitsProcessor:
    """Rewrites one row's next-token logits from its whole sequence so far (prompt + generated).

    `ids`: [seq] ints; `logits`: [vocab] float32. Returns new logits (never edits the given
    array, which the loop also uses for token probabilities). Banned tokens get -inf: a processor
    says which (`banned`), so the loop reads a row's full logits only when its argmax is banned.
    """

    def banned(self, ids: Sequence[int]) -> np.ndarray:
        """Token ids this processor bans after `ids`."""
        raise NotImplementedError

    def __call__(self, ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        banned = np.asarray(self.banned(ids), dtype=np.int64)
        banned = banned[banned < logits.shape[-1]]
        if banned.size == 0:
            return logits
        out = np.array(logits, dtype=np.float32, copy=True)
        out[banned] = -np.inf
        return out


class NoRepeatNGram(LogitsProcessor):
    """No n-gram of `size` tokens occurs twice in the sequence, prompt included.

    As transformers' `NoRepeatNGramLogitsProcessor`: the last `size - 1` tokens are matched
    against every earlier window, and each match bans the token that followed it.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"no-repeat n-gram size must be positive, got {size}")
        self.size = int(size)

    def banned(self, ids: Sequence[int]) -> np.ndarray:
        """Token ids that would complete an n-gram already in `ids`."""
        seq = np.asarray(ids, dtype=np.int64)   # [seq]
        n, length = self.size, len(seq)
        if length < n:
            return np.empty(0, dtype=np.int64)
        windows = length - n + 1                # windows holding a full n-gram
        prefix = seq[length - n + 1:]           # [n - 1]: what the next token would extend
        match = np.ones(windows, dtype=bool)
        for k in range(n - 1):
            match &= seq[k:k + windows] == prefix[k]
        return seq[np.nonzero(match)[0] + n - 1]


def logits_processors(no_repeat_ngram_size: int = 0) -> Tuple[LogitsProcessor, ...]:
    """The processors for a row's decoding settings (0 = none), in the order they apply."""
    return (NoRepeatNGram(no_repeat_ngram_size),) if no_repeat_ngram_size > 0 else ()


@dataclass(frozen=True)
class Candidate:
    """Another box the model considered: its first-corner cell, and the second corner it would give after it."""
    first: int          # token id of the upper-left location token
    second: int         # token id of the lower-right location token, the model's best given `first`
    p_first: float      # the model's probabilities of the two, over the whole vocabulary
    p_second: float

    @property
    def score(self) -> float:
        return self.p_first * self.p_second


@dataclass
class Generation:
    token_ids: List[int] = field(default_factory=list)
    probs: List[float] = field(default_factory=list)   # model's probability of each token (1.0 if forced)
    forced: List[bool] = field(default_factory=list)
    model_calls: int = 0
    stop_reason: str = ""                               # eos | length | box
    # p(`<object>`) right after the prompt's closing `</phrase>`: whether the model grounds the phrase
    # at all (None when the prompt does not end in a phrase).
    presence: Optional[float] = None
    # Other boxes the model considered for its first box (`Candidate`s, best first; Row.max_candidates).
    candidates: List[Candidate] = field(default_factory=list)
    # Row.yes_no: p(yes) / (p(yes) + p(no)) at the first answer token, from the prompt's own logits.
    answer_probability: Optional[float] = None
    # For a row with `export_prefix`: its KV cut to the shared prefix (None if the backend cannot cut).
    prefix_cache: Any = None


@dataclass
class Row:
    """One sequence to decode: prompt ids, where the image goes, and how to decode it."""
    input_ids: List[int]
    image_mask: List[int]
    max_new_tokens: int
    constrained: bool = False
    # A prefix cache already holding input_ids[:prefix_len] (shared between rows of a frame).
    prefix_cache: Any = None
    prefix_len: int = 0
    # No prefix cache yet: prefill the whole prompt at once and hand back its first prefix_len
    # tokens' KV for later rows (one decoder call instead of prefix + suffix).
    export_prefix: bool = False
    # Applied in order to the logits before each choice (see `logits_processors`).
    processors: Tuple[LogitsProcessor, ...] = ()
    # The row's own image (rows about different frames decoded together); None = generate's.
    image_embeds: Any = None
    # Other first-corner cells to complete as candidate boxes (`candidate_cells`); 0 = none.
    max_candidates: int = 0
    # A yes/no question: read p(yes) and p(no) at the first answer token (Generation.answer_probability).
    yes_no: bool = False


def scores_of(logits: Logits, vocab: Optional[GroundingVocab] = None) -> TokenScores:
    """`TokenScores` of one row (host arrays read here; the loop's own are read where computed)."""
    if isinstance(logits, TokenScores):
        return logits
    return TokenScores.from_host(logits, readout_for(vocab) if vocab is not None else Readout())


def readout_for(vocab: GroundingVocab) -> Readout:
    """What the loop reads of each row: the location tokens, the control tokens a box's grammar uses, and
    a yes/no answer's first tokens (a few floats more a row, so a check costs no extra read)."""
    lo, hi = vocab.patch_ids()
    return Readout(lo, hi, (vocab.object_open, vocab.object_close, vocab.delimiter, vocab.eos)
                   + vocab.yes_tokens + vocab.no_tokens)


def answer_probability(logits: Logits, vocab: GroundingVocab) -> float:
    """p(yes) / (p(yes) + p(no)) over the next token: each a sum over the answer's spellings' first tokens
    (`GroundingVocab.yes_tokens`), from the softmax over the whole vocabulary."""
    if not vocab.yes_tokens or not vocab.no_tokens:
        raise ValueError("the tokenizer has no first token for yes or for no: no yes/no probability")
    scores = scores_of(logits, vocab)

    def log_sum(tokens: Tuple[int, ...]) -> float:
        z = np.array([scores.logit(t) for t in tokens], dtype=np.float64)
        top = float(z.max())
        return top + float(np.log(np.exp(z - top).sum())) if np.isfinite(top) else top

    # From the logits, not the probabilities: both may underflow to 0 in float32 when the answer tokens trail
    # the best token far behind, and their ratio is still defined. NaN when neither can be said at all.
    gap = log_sum(vocab.yes_tokens) - log_sum(vocab.no_tokens)
    if np.isnan(gap):
        return float("nan")
    return float(1.0 / (1.0 + np.exp(-gap))) if gap > -700 else 0.0


def token_prob(logits: Logits, token: int) -> float:
    """Softmax probability of `token` over the whole vocabulary.

    float32 exponentials with a float64 sum: within 1e-7 absolute (1e-5 relative) of an
    all-float64 softmax and about 5x faster (it runs once per token per row, next to a GPU step of well under a millisecond).
    """
    return scores_of(logits).prob(token)


def choose(logits: Logits, ids: Sequence[int], processors: Sequence[LogitsProcessor],
           allowed: Optional[np.ndarray] = None) -> int:
    """The greedy choice: argmax (first on ties) of the processed logits among `allowed`.

    Should the processors ban every allowed token (a box's grammar leaves no other choice), the
    grammar wins and the unprocessed best allowed token is taken, so a constrained row always ends.
    Free choices need a row's full logits only when a processor bans its argmax.
    """
    scores = scores_of(logits)
    banned = np.unique(np.concatenate([np.asarray(p.banned(ids), dtype=np.int64) for p in processors])) \
        if processors else np.empty(0, dtype=np.int64)
    if allowed is None:
        if not np.isin(scores.argmax, banned):
            return scores.argmax
        z = scores.full()
        for proc in processors:
            z = proc(ids, z)
        return int(np.argmax(z))
    values = scores.logits_at(allowed)
    kept = ~np.isin(allowed, banned)
    if kept.any():
        return int(allowed[np.argmax(np.where(kept, values, -np.inf))])
    return int(allowed[np.argmax(values)])


class Phase(enum.Enum):
    """Where a row is in its output: free text, or inside a box constrained decoding writes."""
    FREE = enum.auto()      # plain greedy decoding (free mode, or a row that is not constrained)
    OPEN = enum.auto()      # `<object>` is forced next
    FIRST = enum.auto()     # the upper-left location token
    SECOND = enum.auto()    # the lower-right location token
    CLOSE = enum.auto()     # `</object>`, or the delimiter before another box


#: The phase after a token in a box: open -> first -> second -> close (-> first for another box).
_NEXT_IN_BOX = {Phase.OPEN: Phase.FIRST, Phase.FIRST: Phase.SECOND, Phase.SECOND: Phase.CLOSE}


#: Candidate cells are at least this many cells (Chebyshev distance on the grid) from any cell
#: already taken: the chosen box's neighbouring cell is the same object, not another one.
CANDIDATE_SPACING = 2
#: The fewest first-corner cells a candidate search tries: the candidates are ranked by their boxes' scores
#: after the search, so a smaller search (max_candidates 1) could miss the best-scoring box a larger one finds.
CANDIDATE_SEARCH = 3


def candidate_search(wanted: int) -> int:
    """First-corner cells to try for `wanted` candidates (0: none): the best candidate never depends on how
    many were asked for; the caller keeps the best `wanted`."""
    return max(int(wanted), CANDIDATE_SEARCH) if wanted > 0 else 0


def candidate_cells(logits: Logits, chosen: int, vocab: GroundingVocab, count: int,
                    spacing: int = CANDIDATE_SPACING, grid: int = 32) -> List[Tuple[int, float]]:
    """The most likely other first-corner tokens (token id, probability), best first, each at least
    `spacing` cells from the chosen one and from each other; fewer when the grid runs out."""
    lo, _ = vocab.patch_ids()
    probs = scores_of(logits, vocab).span_probs()
    taken = [chosen - lo]
    out: List[Tuple[int, float]] = []
    for cell in np.argsort(-probs, kind="stable"):
        if len(out) >= count:
            break
        r, c = divmod(int(cell), grid)
        if all(max(abs(r - t // grid), abs(c - t % grid)) >= spacing for t in taken):
            taken.append(int(cell))
            out.append((lo + int(cell), float(probs[cell])))
    return out


def best_second(logits: Logits, first: int, vocab: GroundingVocab, grid: int = 32) -> int:
    """The model's most likely lower-right token that makes a box with `first` (not above or left of it)."""
    lo, _ = vocab.patch_ids()
    r, c = divmod(first - lo, grid)
    cells = np.array([lo + rr * grid + cc for rr in range(r, grid) for cc in range(c, grid)])
    return int(cells[np.argmax(scores_of(logits, vocab).logits_at(cells))])


class _RowState:
    def __init__(self, index: int, row: Row, vocab: GroundingVocab) -> None:
        self.index = index      # the row's place in the batch (for on_token)
        self.row = row
        self.vocab = vocab
        self.gen = Generation()
        self.cache: Any = None
        self.scores: Optional[TokenScores] = None
        self.done = row.max_new_tokens <= 0
        self.phase = Phase.OPEN if row.constrained else Phase.FREE
        self.feed: Optional[int] = None      # a forced token the next decode step reads without a choice
        # Candidate first corners and the cache they continue from (before the chosen first corner).
        self.pending: List[Tuple[int, float]] = []
        self.pending_cache: Any = None

    def sequence(self) -> List[int]:
        """Prompt and generated ids so far (a forced `<object>` is among the generated)."""
        return list(self.row.input_ids) + self.gen.token_ids

    def allowed(self) -> Optional[np.ndarray]:
        v = self.vocab
        if self.phase in (Phase.FIRST, Phase.SECOND):
            return np.arange(*v.patch_ids())
        if self.phase is Phase.CLOSE:
            # Another box needs the delimiter, two locations and </object>.
            if self.row.max_new_tokens - len(self.gen.token_ids) >= 4:
                return np.array([v.object_close, v.delimiter])
            return np.array([v.object_close])
        return None

    def take(self, token: int, prob: float, forced: bool = False) -> None:
        self.gen.token_ids.append(token)
        self.gen.probs.append(prob)
        self.gen.forced.append(forced)
        v = self.vocab
        budget_left = self.row.max_new_tokens - len(self.gen.token_ids)
        if self.phase is Phase.FREE:
            if token == v.eos:
                self.done, self.gen.stop_reason = True, "eos"
        elif self.phase is Phase.CLOSE:
            if token == v.object_close:
                self.done, self.gen.stop_reason = True, "box"
                return
            self.phase = Phase.FIRST
        else:
            self.phase = _NEXT_IN_BOX[self.phase]
            if self.phase is Phase.CLOSE and budget_left <= 1:
                # room only for </object>: close the box without asking the model
                self.take(v.object_close, 1.0, forced=True)
                return
        if not self.done and len(self.gen.token_ids) >= self.row.max_new_tokens:
            self.done = True
            self.gen.stop_reason = self.gen.stop_reason or "length"


def generate(backend: Backend, image_embeds: Any, rows: Sequence[Row], vocab: GroundingVocab,
             on_token: Optional[Callable[[int, Generation], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> List[Generation]:
    """Decode every row greedily; rows advance together so backends can batch decode steps."""
    states = [_RowState(i, r, vocab) for i, r in enumerate(rows)]
    readout = readout_for(vocab)
    prompts = [(st, list(st.row.input_ids)) for st in states if not st.done]
    # Rows on a shared prefix prefill their suffixes together; others (with the image) alone.
    on_prefix = [(st, ids) for st, ids in prompts if st.row.prefix_cache is not None]
    if on_prefix:
        logits, caches = backend.prefill_batch([st.row.prefix_cache for st, _ in on_prefix],
                                               [ids[st.row.prefix_len:] for st, ids in on_prefix])
        for (st, _), scores, cache in zip(on_prefix, read_scores(logits, readout), caches):
            st.scores, st.cache = scores, cache
    for st, ids in prompts:
        r = st.row
        if r.prefix_cache is None:
            mask = list(r.image_mask) + [0] * (len(ids) - len(r.image_mask))
            embeds = r.image_embeds if r.image_embeds is not None else image_embeds
            logits, st.cache = backend.prefill(embeds, ids, mask)
            st.scores = read_scores(logits, readout)[0]
            if r.export_prefix and r.prefix_len:
                st.gen.prefix_cache = backend.truncate(st.cache, r.prefix_len)
        st.gen.model_calls += 1
        if r.input_ids and r.input_ids[-1] == vocab.phrase_close:
            st.gen.presence = st.scores.prob(vocab.object_open)
        if r.yes_no:
            st.gen.answer_probability = answer_probability(st.scores, vocab)
        if r.constrained:
            # <object> is forced; the prompt's own logits gave its probability (presence) first.
            st.take(vocab.object_open, 1.0, forced=True)
            st.feed = vocab.object_open

    while True:
        if should_stop is not None and should_stop():
            raise Cancelled()
        active = [st for st in states if not st.done]
        if not active:
            break
        tokens = []
        for st in active:
            if st.feed is not None:
                tok, st.feed = st.feed, None
                tokens.append(tok)
                continue
            ids = st.sequence() if st.row.processors else ()
            tok = choose(st.scores, ids, st.row.processors, st.allowed())
            if st.row.max_candidates and st.pending_cache is None and _first_corner(st, tok):
                st.pending = candidate_cells(st.scores, tok, vocab, st.row.max_candidates)
                st.pending_cache = backend.fork(st.cache) if st.pending else False
            st.take(tok, st.scores.prob(tok))
            if st.done:
                st.scores = None    # nothing reads it again: let its step's logits go
            tokens.append(tok)
            if on_token is not None:
                on_token(st.index, st.gen)
        stepping = [(st, tok) for st, tok in zip(active, tokens) if not st.done]
        if not stepping:
            continue
        logits, caches = backend.decode_batch([st.cache for st, _ in stepping], [tok for _, tok in stepping])
        for (st, _), scores, cache in zip(stepping, read_scores(logits, readout), caches):
            st.scores, st.cache = scores, cache
            st.gen.model_calls += 1
    _complete_candidates(backend, states, vocab)
    return [st.gen for st in states]


def _first_corner(st: _RowState, token: int) -> bool:
    """Whether `token` is the row's first box's upper-left corner (right after its first `<object>`)."""
    ids = st.gen.token_ids
    return bool(ids) and ids[-1] == st.vocab.object_open and st.vocab.is_patch(token) \
        and ids.count(st.vocab.object_open) == 1


def _complete_candidates(backend: Backend, states: Sequence[_RowState], vocab: GroundingVocab) -> None:
    """Every row's candidate first corners completed in one batched decode step: each on its own fork
    of the cache before the chosen first corner, its second corner the model's best after it."""
    work = [(st, tok, p) for st in states if st.pending_cache for tok, p in st.pending]
    if not work:
        return
    caches = [backend.fork(st.pending_cache) for st, _, _ in work]
    logits, _ = backend.decode_batch(caches, [tok for _, tok, _ in work])
    for (st, tok, p), scores in zip(work, read_scores(logits, readout_for(vocab))):
        second = best_second(scores, tok, vocab)
        st.gen.candidates.append(Candidate(tok, second, p, scores.prob(second)))
    for st in states:
        st.gen.candidates.sort(key=lambda c: -c.score)
        st.pending, st.pending_cache = [], None
