"""Is the fine-tuned model better than the base? A paired comparison over the evaluation questions.

Each question gives one primary score per model in [-1, 1] (`*_score` in evaluation.csv, defined in
`paperqa_tune.scoring`). Both models answered the same question, so the comparison is paired: the
per-question difference d = fine-tuned - base.

- win / tie / loss: d > margin / |d| <= margin / d < -margin (margin 0.05: F1 jitter is not a win).
- mean difference with a 95% paired bootstrap interval (questions resampled with replacement, fixed seed).
- two-sided exact sign test over wins vs losses (ties left out).

The verdict says "fine-tuned better" (or "base better") only when the interval excludes 0 AND the sign
test gives p < 0.05 AND at least MIN_QUESTIONS questions were scored; otherwise "no clear difference",
with the reason. Few questions can never produce a win.

The primary score is support-aware (an answer asserting specifics the source does not support scores below
0), and a guard sits on top: when the fine-tuned model hallucinates significantly more than the base (the 95%
bootstrap interval of the paired difference of the 0/1 `*_hallucinated` is above 0), "fine-tuned better"
becomes "no clear difference", with that reason. Fabrication cannot win the verdict. The rate the guard reads is
the claims judge's when it ran (its "source" is "judge"), else the offline rule's (paperqa_tune.evaluate.report).

Each key rate (refusal on unanswerable questions, correction of false premises, ...) is compared the same way on
its own questions, and its "reading" names n: below MIN_RATE_N questions it is "too few to tell", never a claim.
"""
from __future__ import annotations

import math

VERDICTS = ("fine-tuned better", "base better", "no clear difference")
MIN_QUESTIONS = 10
TIE_MARGIN = 0.05
ALPHA = 0.05
# A rate over fewer questions is "too few to tell": with 20, a 0/1 rate's 95% interval is still about +-20 points
MIN_RATE_N = 20
RATE_NAMES = {"refusal_rate_unanswerable": "refuses unanswerable", "correction_rate_false_premise":
              "corrects false premise", "correct_answer_rate_answerable": "correct answers",
              "over_refusal_rate_answerable": "refuses answerable", "degenerate_rate": "degenerate",
              "hallucination_rate": "hallucinates", "hallucination_rate_offline": "hallucinates (offline rule)"}


def _by_whom(rate: dict | None) -> str:
    """What a rate's label adds to name its source: the claims judge's says so; the offline rule's (the default
    without a judge) adds nothing."""
    return " per the judge" if (rate or {}).get("source") == "judge" else ""


def bootstrap_ci(diffs: list[float], n_boot: int = 5000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` under resampling of the questions."""
    import numpy as np

    if not diffs:
        return (float("nan"), float("nan"))
    d = np.asarray(diffs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins vs losses under p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(base: list[float | None], finetuned: list[float | None], margin: float = TIE_MARGIN,
            seed: int = 0) -> dict:
    """Paired statistics over the questions where both scores exist."""
    pairs = [(b, f) for b, f in zip(base, finetuned) if b is not None and f is not None]
    diffs = [f - b for b, f in pairs]
    wins = sum(d > margin for d in diffs)
    losses = sum(d < -margin for d in diffs)
    n = len(diffs)
    lo, hi = bootstrap_ci(diffs, seed=seed)
    return {"n": n, "mean_base": _r(sum(b for b, _ in pairs) / n) if n else None,
            "mean_finetuned": _r(sum(f for _, f in pairs) / n) if n else None,
            "mean_difference": _r(sum(diffs) / n) if n else None,
            "ci95": [_r(lo), _r(hi)] if n else None,
            "wins": wins, "ties": n - wins - losses, "losses": losses,
            "sign_test_p": _r(sign_test_p(wins, losses), 5)}


def decide(stats: dict, min_questions: int = MIN_QUESTIONS, alpha: float = ALPHA) -> tuple[str, str]:
    """(verdict, reason in plain words) from compare()'s statistics."""
    n = stats["n"]
    if n < min_questions:
        return "no clear difference", (f"only {n} scored question(s): too few to tell (at least {min_questions} "
                                       "are needed before a difference can be called)")
    lo, hi = stats["ci95"]
    p = stats["sign_test_p"]
    if lo > 0 and p < alpha:
        return "fine-tuned better", f"the 95% interval of the difference is above 0 and the sign test gives p={p:.3g}"
    if hi < 0 and p < alpha:
        return "base better", f"the 95% interval of the difference is below 0 and the sign test gives p={p:.3g}"
    if lo <= 0 <= hi:
        why = "the 95% interval of the difference includes 0"
    else:
        why = f"the interval excludes 0 but the sign test is not significant (p={p:.3g})"
    return "no clear difference", why


def guard_hallucination(verdict: str, reason: str, hallucination: dict | None) -> tuple[str, str]:
    """No "fine-tuned better" when the fine-tuned model hallucinates significantly more (interval of the paired
    difference of hallucination rates above 0)."""
    ci = (hallucination or {}).get("ci95")
    if verdict != VERDICTS[0] or not ci or ci[0] <= 0:
        return verdict, reason
    return VERDICTS[2], (f"the score favours the fine-tuned model, but it hallucinates significantly more"
                         f"{_by_whom(hallucination)} "
                         f"({hallucination['base']:.0%} -> {hallucination['finetuned']:.0%} of answers, 95% CI of "
                         f"the difference {ci[0]:+.0%} to {ci[1]:+.0%}), so it is not called better")


def headline(verdict: str, stats: dict, reason: str, hallucination: dict | None = None) -> str:
    """One line a person reads first: verdict, means, interval, win/tie/loss, p, hallucination rates."""
    if not stats["n"]:
        return f"VERDICT: {verdict} — no question could be scored ({reason})"
    lo, hi = stats["ci95"]
    hall = ""
    if hallucination and hallucination.get("n"):
        h_lo, h_hi = hallucination["ci95"]
        hall = (f"; hallucinated{_by_whom(hallucination)} {hallucination['base']:.0%} (base) -> "
                f"{hallucination['finetuned']:.0%} (fine-tuned) of answers [95% CI of the difference {h_lo:+.0%} "
                f"to {h_hi:+.0%}]")
    return (f"VERDICT: {verdict} — mean support-aware score {stats['mean_base']:.3f} (base) -> "
            f"{stats['mean_finetuned']:.3f} (fine-tuned), difference {stats['mean_difference']:+.3f} [95% CI "
            f"{lo:+.3f} to {hi:+.3f}]; fine-tuned wins {stats['wins']}, ties {stats['ties']}, loses "
            f"{stats['losses']} of {stats['n']} questions (sign test p={stats['sign_test_p']:.3g}){hall}"
            + (f"; {reason}" if verdict == VERDICTS[2] else ""))


def rate_reading(rate: dict, min_n: int = MIN_RATE_N) -> str:
    """What a rate's paired comparison allows one to say: "too few to tell" below min_n questions, else whether
    the 95% interval of the difference (fine-tuned - base) lies above 0, below 0, or includes it."""
    n, ci = rate["n"], rate.get("ci95")
    if n < min_n or not ci:
        return f"too few to tell (n={n} < {min_n})"
    if ci[0] > 0:
        return "higher after fine-tuning"
    if ci[1] < 0:
        return "lower after fine-tuning"
    return "no clear change (the 95% interval of the difference includes 0)"


def rates_line(rates: dict) -> str:
    """The key rates in one line, each base -> fine-tuned with its n, and "too few to tell" where it is."""
    parts = []
    for key, name in RATE_NAMES.items():
        r = rates.get(key)
        if not r or not r["n"]:
            continue
        name += _by_whom(r)
        if r["reading"].startswith("too few"):
            parts.append(f"{name} {_pct(r['base'])} -> {_pct(r['finetuned'])}: {r['reading']}")
        else:
            parts.append(f"{name} {_pct(r['base'])} -> {_pct(r['finetuned'])} (n={r['n']}, "
                         f"{r['reading'].split(' (')[0]})")
    return "rates: " + ("; ".join(parts) if parts else "none")


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _r(x: float, digits: int = 4) -> float:
    return round(x, digits)
