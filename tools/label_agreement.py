"""How far the offline scoring rule agrees with answers labelled by reading: precision, recall and support per label.

    python tools/label_agreement.py                      # the 546 real answers: each batch, its halves, both
    python tools/label_agreement.py --batch 2 --half A --show hallucinated   # one label's disagreements
    python tools/label_agreement.py --hand               # the 73 hand-written cases (hallucinated, corrected)

Labels: hallucinated (1 = invents something), correct (1), and each behaviour one against the rest (answered,
refused, corrected_premise, degenerate). Two labelled batches (tests/data/real_answers_labelled.jsonl, 288
answers; tests/data/real_answers_labelled_2.jsonl, 258), each split by paper in two halves, A and B: sorted paper
ids, alternating, so a rule developed on A's disagreements can be checked on B's answers.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paperqa_tune import scoring

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "data" / "real_answers_labelled.jsonl"
REAL_BATCHES = {"1": REAL, "2": ROOT / "tests" / "data" / "real_answers_labelled_2.jsonl"}
HAND = ROOT / "tests" / "data" / "hallucination_labels.jsonl"
BEHAVIOURS = ("answered", "refused", "corrected_premise", "degenerate")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def half_of(rows: list[dict]) -> dict[str, str]:
    """paper_id -> "A" or "B": sorted ids, alternating."""
    return {p: "AB"[i % 2] for i, p in enumerate(sorted({r["paper_id"] for r in rows}))}


def label_pairs(rows: list[dict], scored: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """(label, rule) 0/1 pairs per label; a label missing from the rows is left out."""
    out: dict[str, list[tuple[int, int]]] = {}
    for key in ("hallucinated", "correct"):
        if all(key in r for r in rows):
            out[key] = [(int(r[key]), int(s[key] or 0)) for r, s in zip(rows, scored)]
    if all("corrected" in r for r in rows if r.get("type") == "false_premise") and "behaviour" not in rows[0]:
        fp = [(r, s) for r, s in zip(rows, scored) if "corrected" in r]
        out["corrected"] = [(int(r["corrected"]), int(s["correct"] or 0)) for r, s in fp]
    if all("behaviour" in r for r in rows):
        for b in BEHAVIOURS:
            out[b] = [(int(r["behaviour"] == b), int(s["behaviour"] == b)) for r, s in zip(rows, scored)]
    return out


def figures(pairs: list[tuple[int, int]]) -> dict:
    c = Counter(pairs)
    tp, fp, fn, tn = c[(1, 1)], c[(0, 1)], c[(1, 0)], c[(0, 0)]
    return {"n": len(pairs), "support": tp + fn, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "agree": tp + tn,
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan")}


def table(title: str, rows: list[dict], scored: list[dict]) -> None:
    print(f"\n{title} (n={len(rows)})")
    print(f"  {'label':<18} {'support':>7} {'agree':>7} {'P':>6} {'R':>6}   tp fp fn tn")
    for label, pairs in label_pairs(rows, scored).items():
        f = figures(pairs)
        print(f"  {label:<18} {f['support']:>7} {f['agree']:>4}/{f['n']:<3} {f['precision']:>6.3f} "
              f"{f['recall']:>6.3f}   {f['tp']} {f['fp']} {f['fn']} {f['tn']}")
    if all("behaviour" in r for r in rows):
        confusion = Counter((r["behaviour"], s["behaviour"]) for r, s in zip(rows, scored))
        print("  behaviour confusion (label -> rule): "
              + ", ".join(f"{a}->{b}: {n}" for (a, b), n in sorted(confusion.items()) if a != b))


def show(label: str, rows: list[dict], scored: list[dict]) -> None:
    pairs = label_pairs(rows, scored)[label]
    for (want, got), r, s in zip(pairs, rows, scored):
        if want != got:
            print(f"\n=== {r.get('id', '')} {r.get('model', '')} [{r['type']}] label {want} rule {got} "
                  f"(behaviour label {r.get('behaviour')} rule {s['behaviour']})")
            print(f"Q: {r['question']}\nA: {r['answer']}\nCONTEXT: {r['context']}")
            print(f"label unsupported: {r.get('unsupported')}  note: {r.get('note', r.get('why'))}")
            print(f"rule unsupported: {s['unsupported']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", choices=("1", "2"), help="only this batch of real answers (default: both)")
    p.add_argument("--half", choices=("A", "B"), help="only this half of the real answers")
    p.add_argument("--show", help="print the disagreements of this label (hallucinated, correct, refused, ...)")
    p.add_argument("--hand", action="store_true", help="the hand-written cases instead of the real answers")
    args = p.parse_args(argv)
    if args.hand:
        rows = load(HAND)
        groups = {"hand-written": list(range(len(rows)))}
    else:
        batches = [b for b in ("1", "2") if args.batch in (None, b)]
        rows, groups = [], {}
        for b in batches:
            part = load(REAL_BATCHES[b])
            halves, first = half_of(part), len(rows)
            rows += part
            for h in "AB":
                if args.half in (None, h):
                    groups[f"batch {b}, half {h} ({', '.join(p for p, x in sorted(halves.items()) if x == h)})"] = \
                        [first + i for i, r in enumerate(part) if halves[r["paper_id"]] == h]
            if args.half is None:
                groups[f"batch {b}"] = list(range(first, len(rows)))
        if len(batches) == 2 and args.half is None:
            groups["both batches"] = list(range(len(rows)))
    scored = [scoring.score_answer(r["answer"], r) for r in rows]
    for title, idx in groups.items():
        sub, sub_scored = [rows[i] for i in idx], [scored[i] for i in idx]
        if args.show:
            show(args.show, sub, sub_scored)
        else:
            table(title, sub, sub_scored)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
