"""Word-overlap measures for curating generated Q&A pairs: how grounded an answer is in its abstract, which
numbers a text carries, and (near-)duplicate questions within a paper and across papers."""
from __future__ import annotations

import functools
import itertools
import math
import re
from collections import Counter, defaultdict

STOPWORDS = frozenset("""a an the of and or to in on for with by from as at is are was were be been being this that
these those it its their there which who whom what when where why how does do did done can could would should may
might will shall not no nor than then also into over under about between both each such only very more most other
some any all our we they them us he she his her you your i if so but while whereas via per up out one two using used
use paper papers abstract authors author according state states stated report reports reported describe describes
described work study present presents presented propose proposes proposed""".split())
_WORD_RE = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")
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
    return frozenset(re.findall(r"\w+", question.lower()))


def jaccard(a: frozenset, b: frozenset) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter) if a or b else 1.0


def normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _signature(order: list, threshold: float) -> list[int]:
    """Index keys of a set whose tokens are given rarest first (see cross_group_near_duplicates): every pair of
    tokens among its first n - ceil(t*n) + 2, and for a set so small that a partner might need to share only one
    token (t*(n+1) <= 1+t, e.g. a single word at t = 0.8), every single token too. Keys are hashes: a collision
    only adds a candidate, which the exact Jaccard check then drops."""
    n = len(order)
    head = order[: n - math.ceil(threshold * n) + 2]
    keys = [hash((a, b)) for a, b in itertools.combinations(head, 2)]
    if threshold * (n + 1) <= 1 + threshold + 1e-9:
        keys += [hash((t,)) for t in order]
    return keys


def cross_group_near_duplicates(sets: list[frozenset], groups: list, threshold: float) -> dict[int, int]:
    """{i: j}: set i has Jaccard >= threshold with an earlier kept set j of another group (the first such j).

    An exact similarity join by prefix filtering on token pairs: order tokens rarest first. Jaccard(x, y) >= t
    needs |x & y| >= a = max(ceil(t|x|), ceil(t|y|)), so the common tokens' first two (in that order) lie within
    the first |x| - a + 2 tokens of x and the first |y| - a + 2 of y: the sets share a pair of tokens from
    those heads (unless a = 1, which only tiny sets allow; they also share a single token). Only those pairs are
    indexed and probed. Single-token prefixes (the classic filter) are quadratic when questions share a few
    frequent words (a paper title repeated in every question of it): a pair of such words is far rarer than
    either word. Near-linear on real data where the pairwise loop is quadratic.
    """
    freq = Counter(t for s in sets for t in s)
    index: dict[int, list[int]] = defaultdict(list)
    dups = {}
    for i, s in enumerate(sets):
        if not s:
            continue
        n = len(s)
        keys = _signature(sorted(s, key=lambda t: (freq[t], t)), threshold)
        lo, hi = threshold * n, n / threshold  # Jaccard >= t also needs t|x| <= |y| <= |x|/t
        hit = None
        for j in sorted({j for k in keys for j in index.get(k, ())}):
            y = sets[j]
            if groups[j] != groups[i] and lo <= len(y) <= hi and jaccard(s, y) >= threshold:
                hit = j
                break
        if hit is not None:
            dups[i] = hit
            continue
        for k in keys:
            index[k].append(i)
    return dups


def within_paper_duplicate(q: str, kept: list[str], title: str, threshold: float) -> str | None:
    """A kept question of the same paper this one nearly repeats (the shared title does not count)."""
    drop = question_tokens(title)
    a = question_tokens(q) - drop
    for other in kept:
        if jaccard(a, question_tokens(other) - drop) >= threshold:
            return other
    return None
