"""What a reviewer checks in generated Q&A data before training on it: counts, how varied the questions' openings
are, length distributions, why pairs were rejected, and how much of each answer is not backed by its source.

    report = quality_report(items, rejects)      # small, JSON-serialisable: <out stem>.quality.json
    plot_quality(items, Path("train.quality.png"))
    print(format_quality(report))

An item is one kept Q&A turn: {"split", "type", "section", "question", "answer", "source", "conversation", "turn"}
(optionally "paper_id"); a reject is a run's reject record ({"paper_id", "stage", "reason", ...}).
"""
from __future__ import annotations

import heapq
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from paperqa_tune.charts import pyplot, save_figure
from paperqa_tune.qa.prompts import ANSWERABLE, TYPES
from paperqa_tune.qa.textsim import content_stems

ITEM_KEYS = ("split", "type", "section", "question", "answer", "source", "conversation", "turn")
START_WORDS = (2, 3)           # question openings measured: the first two and the first three words
UNSUPPORTED_LEVELS = (0.2, 0.5)  # answers with more than this share of unsupported content words are counted
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SPLIT_COLORS = {"train": "#2f6fdf", "eval": "#e0a030"}


# --------------------------------------------------------------------------- measures
def _counts(values) -> dict:
    """{value: count}, most frequent first, ties by name (a stable order for the JSON)."""
    return dict(sorted(Counter(values).items(), key=lambda kv: (-kv[1], str(kv[0]))))


def _type_order(types) -> list[str]:
    known = [t for t in TYPES if t in types]
    return known + sorted(t for t in types if t not in TYPES)


def _nearest_rank(sorted_values: list[int], p: float) -> int:
    """The p-th percentile by the nearest-rank rule: the smallest value with at least p% of values at or below it."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def length_stats(lengths: list[int]) -> dict | None:
    """{n, mean, p50, p90, max} of word counts (nearest-rank percentiles, so they are values that occur)."""
    if not lengths:
        return None
    s = sorted(lengths)
    return {"n": len(s), "mean": round(sum(s) / len(s), 2), "p50": _nearest_rank(s, 50), "p90": _nearest_rank(s, 90),
            "max": s[-1]}


def question_start(question: str, k: int) -> str:
    """The first k lowercased words of a question (all of them if it has fewer)."""
    return " ".join(_WORD_RE.findall(question.lower())[:k])


def start_diversity(questions: list[str], k: int, top: int = 10) -> dict:
    """How varied the questions' first k words are.

    distinct: number of different openings; distinct_share: distinct / questions (1.0 = no two questions open
    alike); entropy_bits: Shannon entropy H of the openings' distribution; effective_starts: 2**H, the number of
    equally used openings with the same entropy; normalised_entropy: H / log2(questions), 0 when every question
    opens alike and 1 when none share an opening (None below 2 questions); top: the `top` most used openings with
    their count and share of all questions.
    """
    n = len(questions)
    counts = Counter(question_start(q, k) for q in questions)
    h = -sum(c / n * math.log2(c / n) for c in counts.values()) if n else 0.0
    return {"words": k, "distinct": len(counts), "distinct_share": round(len(counts) / n, 4) if n else None,
            "entropy_bits": round(h, 4), "effective_starts": round(2 ** h, 2) if n else None,
            "normalised_entropy": round(h / math.log2(n), 4) if n >= 2 else None,
            "top": [{"start": s, "count": c, "share": round(c / n, 4)}
                    for s, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]}


def unsupported_share(answer: str, source: str) -> tuple[float, frozenset] | None:
    """(share of the answer's content words, crudely stemmed, that its source lacks; those words), or None when the
    answer has no content word."""
    words = content_stems(answer)
    if not words:
        return None
    missing = words - content_stems(source)
    return len(missing) / len(words), missing


def _unsupported(items: list[dict], worst: int = 5) -> tuple[dict, dict]:
    """(report of answerable types, report of the other types): shares of answers' content words not in their source.

    Only factual/conceptual/methodology answers must be grounded in the source. Edge cases are reported
    separately (counts and mean share, no worst list): an unanswerable answer names what the source lacks ("does
    not state the learning rate") and a false-premise answer names the wrong claim, so their unsupported words are
    expected and a high share there is not a defect.
    """
    scored, other = [], defaultdict(list)
    no_words = Counter()
    missing_words: Counter = Counter()
    for k, it in enumerate(items):
        got = unsupported_share(it["answer"], it["source"])
        if got is None:
            no_words[it["type"]] += 1
            continue
        if it["type"] in ANSWERABLE:
            scored.append((got[0], k, it))
            missing_words.update(got[1])
        else:
            other[it["type"]].append(got[0])
    n = len(scored)
    by_type = defaultdict(list)
    for share, _, it in scored:
        by_type[it["type"]].append(share)
    answerable = {
        "types": list(ANSWERABLE),
        "answers": n, "without_content_words": sum(no_words[t] for t in ANSWERABLE),
        "mean_share": round(sum(s for s, _, _ in scored) / n, 4) if n else None,
        **{f"answers_over_{round(lvl * 100)}pct": round(sum(1 for s, _, _ in scored if s > lvl) / n, 4) if n else None
           for lvl in UNSUPPORTED_LEVELS},
        "mean_share_by_type": {t: round(sum(by_type[t]) / len(by_type[t]), 4) for t in _type_order(by_type)},
        "top_unsupported_words": [{"stem": w, "answers": c} for w, c in
                                  sorted(missing_words.items(), key=lambda kv: (-kv[1], kv[0]))[:10]],
        "worst": [{"share": round(s, 4), "type": it["type"], "conversation": it["conversation"], "turn": it["turn"],
                   "question": it["question"][:200], "answer": it["answer"][:200]}
                  for s, _, it in heapq.nsmallest(worst, scored, key=lambda x: (-x[0], x[1])) if s > 0],
    }
    edge = {t: {"answers": len(other[t]) + no_words[t], "mean_share": round(sum(other[t]) / len(other[t]), 4)
                if other[t] else None} for t in _type_order(set(other) | (set(no_words) - set(ANSWERABLE)))}
    return answerable, edge


def _rejects(rejects: list[dict], top: int = 10) -> dict:
    """Reject reasons by their key (the text before the first ':'), most frequent first, one short example each."""
    keys, example = Counter(), {}
    for r in rejects:
        reason = str(r.get("reason", ""))
        key = reason.split(":", 1)[0].strip() or "(no reason)"
        keys[key] += 1
        if key not in example:
            example[key] = {"paper_id": r.get("paper_id"), "stage": r.get("stage"), "reason": reason[:160]}
    return {"total": len(rejects), "by_stage": _counts(str(r.get("stage")) for r in rejects),
            "top_reasons": [{"reason": k, "count": c, "example": example[k]}
                            for k, c in sorted(keys.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]}


# --------------------------------------------------------------------------- the report
def _check(items: list[dict]) -> None:
    for k, it in enumerate(items):
        missing = [key for key in ITEM_KEYS if key not in it]
        if missing:
            raise ValueError(f"quality item {k} lacks {', '.join(missing)} (has {', '.join(sorted(it))})")


def quality_report(items: list[dict], rejects: list[dict]) -> dict:
    """A small summary of kept turns and rejects (no per-item lists; the worst-5 examples are the only text).

    Words for lengths are whitespace-separated tokens; question openings are the first 2 and 3 lowercased
    alphanumeric words (see start_diversity for the measures); unsupported content compares content_stems of the
    answer and of the item's source (see _unsupported for why edge cases are kept apart).
    """
    _check(items)
    types = _type_order({it["type"] for it in items})
    papers = {it["paper_id"] for it in items} if all("paper_id" in it for it in items) else None
    questions = [it["question"] for it in items]
    q_len = [len(it["question"].split()) for it in items]
    a_len = [len(it["answer"].split()) for it in items]
    answerable, edge = _unsupported(items)
    type_counts = Counter(it["type"] for it in items)
    by_split_type: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        by_split_type[it["split"]][it["type"]] += 1
    return {
        "totals": {"turns": len(items), "conversations": len({it["conversation"] for it in items}),
                   "papers": len(papers) if papers is not None else None, "rejects": len(rejects)},
        "by_split": _counts(it["split"] for it in items),
        "by_type": {t: type_counts[t] for t in types},
        "by_split_type": {s: {t: by_split_type[s][t] for t in types if by_split_type[s][t]}
                          for s in _counts(it["split"] for it in items)},
        "by_section": _counts(it["section"] for it in items),
        "by_turn": {str(t): c for t, c in sorted(Counter(int(it["turn"]) for it in items).items())},
        "question_starts": {f"first_{k}_words": start_diversity(questions, k) for k in START_WORDS},
        "length_words": {
            name: {"all": length_stats(lens),
                   "by_type": {t: length_stats([n for n, it in zip(lens, items) if it["type"] == t]) for t in types}}
            for name, lens in (("question", q_len), ("answer", a_len))},
        "unsupported": answerable,
        "unsupported_edge_cases": edge,
        "rejects": _rejects(rejects),
    }


# --------------------------------------------------------------------------- for people
def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def format_quality(report: dict) -> str:
    """A few lines for the terminal after a run: the numbers a reviewer looks at first."""
    t = report["totals"]
    papers = f" from {t['papers']:,} papers" if t["papers"] is not None else ""
    splits = ", ".join(f"{s} {c:,}" for s, c in report["by_split"].items())
    lines = [f"quality: {t['turns']:,} turns in {t['conversations']:,} conversations{papers} ({splits or 'none'})",
             "  types: " + (", ".join(f"{k} {v:,}" for k, v in report["by_type"].items()) or "none")
             + "; sections: " + (", ".join(f"{k} {v:,}" for k, v in list(report["by_section"].items())[:5]) or "none")]
    d = report["question_starts"]["first_2_words"]
    if d["top"]:
        top = ", ".join(f"\"{x['start']}\" {x['share']:.0%}" for x in d["top"][:3])
        lines.append(f"  question openings (first 2 words): {d['distinct']:,} distinct ({_pct(d['distinct_share'])} of "
                     f"questions), effective {d['effective_starts']:g}, normalised entropy "
                     f"{d['normalised_entropy'] if d['normalised_entropy'] is not None else 'n/a'}; top {top}")
    q, a = report["length_words"]["question"]["all"], report["length_words"]["answer"]["all"]
    if q and a:
        lines.append(f"  length in words: questions mean {q['mean']:g}, p90 {q['p90']}, max {q['max']}; answers mean "
                     f"{a['mean']:g}, p90 {a['p90']}, max {a['max']}")
    u = report["unsupported"]
    lines.append(f"  unsupported content ({'/'.join(u['types'])}, {u['answers']:,} answers): mean {_pct(u['mean_share'])} "
                 f"of content words not in the source; {_pct(u['answers_over_20pct'])} of answers over 20%, "
                 f"{_pct(u['answers_over_50pct'])} over 50%")
    if u["worst"] and u["worst"][0]["share"] > 0:
        w = u["worst"][0]
        lines.append(f"  worst: {w['share']:.0%} unsupported ({w['type']}): {w['question'][:90]!r}")
    r = report["rejects"]
    top = ", ".join(f"{x['reason']} {x['count']:,}" for x in r["top_reasons"][:5])
    lines.append(f"  rejects: {r['total']:,}" + (f" ({top})" if top else ""))
    return "\n".join(lines)


def plot_quality(items: list[dict], path: Path) -> None:
    """One PNG: question and answer length histograms (words), train and eval overlaid as shares of their split
    (so a small eval split stays visible), with each split's median marked; the tail beyond the 99th percentile
    is folded into the last bin."""
    plt = pyplot()
    if plt is None:
        print(f"warning: matplotlib is not installed; {path} not drawn (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    splits = list(_counts(it["split"] for it in items))
    for ax, field in zip(axes, ("question", "answer")):
        lens = {s: [len(it[field].split()) for it in items if it["split"] == s] for s in splits}
        every = sorted(n for v in lens.values() for n in v)
        if not every:
            ax.text(0.5, 0.5, "no items", ha="center", va="center", transform=ax.transAxes, color="#777777")
            ax.set_title(f"{field} length", fontsize=10)
            continue
        cap = max(_nearest_rank(every, 99), 1)
        width = max(1, math.ceil(cap / 40))
        bins = list(range(0, cap + 2 * width, width))
        medians = {}
        for s, v in lens.items():
            if v:
                color = _SPLIT_COLORS.get(s, "#7b5ea7")
                ax.hist([min(n, cap) for n in v], bins=bins, weights=[1 / len(v)] * len(v), histtype="stepfilled",
                        alpha=0.35, color=color, edgecolor=color, label=f"{s} (n={len(v):,})")
                medians[s] = (_nearest_rank(sorted(v), 50), color)
        top = ax.get_ylim()[1]
        for k, (med, color) in enumerate(medians.values()):
            ax.axvline(med, color=color, lw=1, ls="--")
            ax.annotate(f"median {med}", (med, top * (0.95 - 0.07 * k)), fontsize=7, color=color, xytext=(3, 0),
                        textcoords="offset points", va="top")
        over = f"; the last bin holds everything over {cap}" if every[-1] > cap else ""
        ax.set_title(f"{field} length (words{over})", fontsize=10)
        ax.set_xlabel("words")
        ax.set_ylabel("share of the split's turns")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{len(items):,} kept turns", fontsize=10, fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    save_figure(fig, plt, Path(path))
