"""Word-overlap measures for curating generated Q&A pairs: how grounded an answer is in its abstract, which
numbers a text carries, and (near-)duplicate questions within a paper and across papers."""
from __future__ import annotations

import functools
import itertools
import math
import re
import sys
from collections import Counter

STOPWORDS = frozenset("""a an the of and or to in on for with by from as at is are was were be been being this that
these those it its their there which who whom what when where why how does do did done can could would should may
might will shall not no nor than then also into over under about between both each such only very more most other
some any all our we they them us he she his her you your i if so but while whereas via per up out one two using used
use paper papers abstract authors author according state states stated report reports reported describe describes
described work study present presents presented propose proposes proposed""".split())
_WORD_RE = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")
_TOKEN_RE = re.compile(r"\w+")
NUMBER_RE = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?")
_SUFFIXES = ("ations", "ation", "ments", "ment", "ings", "ing", "ies", "ied", "es", "ed", "ly", "s")


def clean_text(text) -> str:
    """One line with single spaces (None: empty)."""
    return " ".join(str(text).split()) if text is not None else ""


@functools.lru_cache(maxsize=65536)
def _stem(w: str) -> str:
    for suf in _SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 4:
            w = w[: -len(suf)]
            break
    return w[:8]


@functools.lru_cache(maxsize=4096)  # each abstract is checked against every one of its pairs
def content_stems(text: str) -> frozenset[str]:
    words = _WORD_RE.findall(text.lower())
    return frozenset(_stem(w) for w in words if w not in STOPWORDS and (len(w) > 2 or w.isdigit()))


@functools.lru_cache(maxsize=4096)
def numbers(text: str) -> frozenset[str]:
    return frozenset(n.replace(",", "") for n in NUMBER_RE.findall(text))


def grounding(answer: str, abstract: str) -> float:
    """Share of the answer's content words (crudely stemmed) that the abstract contains."""
    ans = content_stems(answer)
    return len(ans & content_stems(abstract)) / len(ans) if ans else 0.0


def question_tokens(question: str) -> frozenset[str]:
    """The question's lowercased words. Interned: a run holds one token set per question for the duplicate join,
    and sharing one copy of each word cuts their memory by almost half (~0.9 instead of ~1.6 KB a question)."""
    return frozenset(map(sys.intern, _TOKEN_RE.findall(question.lower())))


def jaccard(a: frozenset, b: frozenset) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter) if a or b else 1.0


def normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _token_order(sets: list[frozenset], groups: list) -> tuple[Counter, dict]:
    """(in how many groups each token occurs, each token's rank: fewest groups first, then rarest). A group that
    comes back after another is counted again: exact for grouped input (a paper's questions together), and an
    overcount elsewhere only keeps a token in the join that could have been left out."""
    spread, freq, last = Counter(), Counter(), {}
    missing = object()
    for s, g in zip(sets, groups):
        freq.update(s)
        for t in s:
            if last.get(t, missing) != g:
                last[t] = g
                spread[t] += 1
    return spread, {t: r for r, t in enumerate(sorted(freq, key=lambda t: (spread[t], freq[t], t)))}


def _signature(shared: list, n: int, threshold: float) -> list[int]:
    """Index keys of a set of n tokens, given its tokens that occur in other groups too, ordered by rank (see
    cross_group_near_duplicates): every pair among the first len(shared) - ceil(t*n) + 2 of them, and for a set so
    small that a partner might share a single token with it (t*(n+1) <= 1+t: one word at t = 0.8), every one of
    them too. Keys are hashes: a collision only adds a candidate, which the Jaccard check then drops."""
    head = shared[: len(shared) - math.ceil(threshold * n) + 2]
    keys = [hash((a, b)) for a, b in itertools.combinations(head, 2)]
    if threshold * (n + 1) <= 1 + threshold + 1e-9:
        keys += [hash((t,)) for t in shared]
    return keys


def cross_group_near_duplicates(sets: list[frozenset], groups: list, threshold: float) -> dict[int, int]:
    """{i: j}: set i has Jaccard >= threshold with an earlier kept set j of another group (the first such j).

    An exact similarity join (prefix filtering on token pairs). Jaccard(x, y) >= t needs |x & y| >= a =
    ceil(t * max(|x|, |y|)) common tokens, and a token that occurs in one group only is never common to two
    groups: so x is dropped from the join when fewer than ceil(t|x|) of its tokens occur elsewhere (a question
    carrying its paper's own names), and otherwise, with x' those tokens ordered by a fixed rank (in fewest groups
    first), the two first common tokens lie within the first |x'| - a + 2 of x' and of y'. Only pairs of tokens
    from those heads are indexed and probed (single tokens too when a = 1 is possible: tiny sets). The classic
    single-token prefix is quadratic when questions share frequent words that always come together (a template's
    "overall conclusion"); a pair of them next to a title word is far rarer. Candidates per set stay nearly flat
    as the input grows (bench/bench_data_scale.py), where they grew in proportion to it before.
    """
    spread, rank = _token_order(sets, groups)
    index: dict[int, int | list[int]] = {}  # key -> the one set holding it, or a list of them (most keys: one)
    dups = {}
    for i, s in enumerate(sets):
        n = len(s)
        shared = sorted((t for t in s if spread[t] > 1), key=rank.__getitem__)
        if not s or len(shared) < math.ceil(threshold * n):
            continue  # no other group's set can share enough tokens with it (nor it with theirs)
        keys = _signature(shared, n, threshold)
        candidates = set()
        for k in keys:
            got = index.get(k)
            if isinstance(got, list):
                candidates.update(got)
            elif got is not None:
                candidates.add(got)
        lo, hi = threshold * n, n / threshold  # Jaccard >= t also needs t|x| <= |y| <= |x|/t
        hit = next((j for j in sorted(candidates) if groups[j] != groups[i] and lo <= len(sets[j]) <= hi
                    and jaccard(s, sets[j]) >= threshold), None)
        if hit is not None:
            dups[i] = hit
            continue
        for k in keys:
            got = index.get(k)
            if got is None:
                index[k] = i
            elif isinstance(got, list):
                got.append(i)
            else:
                index[k] = [got, i]
    return dups


def within_paper_duplicate(q: str, kept: list[str], title: str, threshold: float) -> str | None:
    """A kept question of the same paper this one nearly repeats (the shared title does not count)."""
    drop = question_tokens(title)
    a = question_tokens(q) - drop
    for other in kept:
        if jaccard(a, question_tokens(other) - drop) >= threshold:
            return other
    return None
