"""Charts a person reads at a glance: the verdict on top, values written on the bars, "n/a" where a
measure does not apply (never drawn as a zero bar). matplotlib with the Agg backend, written atomically."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

COLORS = {"base": "#9aa5b1", "finetuned": "#2f6fdf"}
LABELS = {"base": "base", "finetuned": "fine-tuned"}
BEHAVIOUR_COLORS = {"answered": "#4c9f70", "refused": "#e0a030", "corrected_premise": "#7b5ea7",
                    "degenerate": "#c8473d", "empty": "#444444"}


def pyplot():
    try:
        import matplotlib
    except ImportError:  # a bare GPU box: the numbers are in the CSV and summary.json anyway
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, plt, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file behind
        raise
    finally:
        plt.close(fig)


def _paired_bars(ax, names: list[str], values: dict[str, list], title: str, fmt: str) -> None:
    """Base and fine-tuned bars per name, each labelled with its value; None shows as 'n/a'."""
    xs = range(len(names))
    for off, side in ((-0.2, "base"), (0.2, "finetuned")):
        for x, v in zip(xs, values[side]):
            if v is None:
                ax.text(x + off, 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="#777777", rotation=90)
                continue
            ax.bar(x + off, v, width=0.4, color=COLORS[side])
            ax.text(x + off, v + 0.02, fmt.format(v), ha="center", va="bottom", fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    low = min([0.0] + [v for side in values.values() for v in side if v is not None])
    if low < 0:  # support-aware scores go below 0 for invented specifics
        ax.axhline(0, color="#444444", lw=0.6)
    ax.set_ylim(low - 0.1 if low < 0 else 0, 1.15)


def plot_results(summary: dict, path: Path) -> bool:
    """results_bar.png: key behaviours, correct rate and primary score by type, behaviour mix."""
    plt = pyplot()
    if plt is None:
        print(f"warning: matplotlib is not installed; {path} not drawn (pip install matplotlib)", file=sys.stderr)
        return False
    rate_names = {"refusal_rate_unanswerable": "refuses\nunanswerable", "correction_rate_false_premise":
                  "corrects\nfalse premise", "correct_answer_rate_answerable": "correct\nanswers",
                  "over_refusal_rate_answerable": "refuses\nanswerable", "degenerate_rate": "degenerate\nor empty",
                  "hallucination_rate": "hallucinated"}
    rates = summary["rates"]
    hall = rates.get("hallucination_rate") or {}
    if hall.get("ci95"):  # the paired interval under the bar's name: is the difference real?
        rate_names["hallucination_rate"] += f"\n(diff {hall['ci95'][0]:+.0%}..{hall['ci95'][1]:+.0%})"
    rate_names = {k: v for k, v in rate_names.items() if k in rates}
    by_type = summary["by_type"]
    types = list(by_type)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8))
    _paired_bars(axes[0], list(rate_names.values()),
                 {s: [rates[k][s] if rates[k]["n"] else None for k in rate_names] for s in ("base", "finetuned")},
                 "rates (first three: higher is better; last three: lower is better)", "{:.0%}")
    _paired_bars(axes[1], types, {s: [by_type[t][s]["correct_rate"] for t in types] for s in ("base", "finetuned")},
                 "correct (the type's expected behaviour)", "{:.0%}")
    _paired_bars(axes[2], types, {s: [by_type[t][s]["mean_score"] for t in types] for s in ("base", "finetuned")},
                 "mean support-aware score (below 0: invented specifics)", "{:.2f}")
    mix = by_type["all"]
    bottom = {"base": 0.0, "finetuned": 0.0}
    for label, color in BEHAVIOUR_COLORS.items():
        for x, side in enumerate(("base", "finetuned")):
            v = mix[side]["behaviour"][label] or 0.0
            axes[3].bar(x, v, bottom=bottom[side], color=color, label=label if x == 0 else None, width=0.6)
            if v >= 0.06:
                axes[3].text(x, bottom[side] + v / 2, f"{v:.0%}", ha="center", va="center", fontsize=7, color="white")
            bottom[side] += v
    axes[3].set_xticks([0, 1], [LABELS["base"], LABELS["finetuned"]])
    axes[3].set_ylim(0, 1.0)
    axes[3].set_title("what the answers do (all questions)", fontsize=10)
    axes[3].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    from matplotlib.patches import Patch

    axes[0].legend(handles=[Patch(color=COLORS[s], label=LABELS[s]) for s in ("base", "finetuned")], fontsize=8,
                   loc="upper right")
    fig.suptitle("\n".join(textwrap.wrap(summary["verdict_line"], 170)), fontsize=9, fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_figure(fig, plt, path)
    return True


def plot_curve(points: list[dict], panels: dict[str, dict[str, str]], path: Path) -> bool:
    """learning_curve.png: one panel per group of measures (title -> {column: label}) against the training step,
    panels without data left out; the training and validation loss in a last panel when the run logged them."""
    plt = pyplot()
    if plt is None:
        print(f"warning: matplotlib is not installed; {path} not drawn (pip install matplotlib)", file=sys.stderr)
        return False
    steps = [p["step"] for p in points]

    def drawn(series):
        return {c: lab for c, lab in series.items() if any(p.get(c) is not None for p in points)}

    shown = {t: drawn(s) for t, s in panels.items() if drawn(s)}
    losses = drawn({"train_loss": "train loss", "val_loss": "validation loss"})
    n = len(shown) + bool(losses)
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.2 * n), sharex=True, squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], [*shown.items(), *([("loss", losses)] if losses else [])]):
        for col, label in series.items():
            xy = [(s, p[col]) for s, p in zip(steps, points) if p.get(col) is not None]
            ax.plot([x for x, _ in xy], [y for _, y in xy], "o-", label=label, lw=1)
        if title != "loss":
            ax.set_ylim(-0.02, 1.05)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1, 0].set_xlabel("optimizer step (0 = base model)")
    fig.suptitle("evaluation across checkpoints", fontsize=10)
    fig.tight_layout()
    save_figure(fig, plt, path)
    return True


def plot_loss(metrics: dict, path: Path) -> bool:
    """Training and validation loss per optimizer step (train_qlora_hf.py's loss.png)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    train_l = [r["loss"] for r in metrics["train"]]
    val_l = [r["loss"] for r in metrics["val"]]
    if train_l:
        ax.plot([r["step"] for r in metrics["train"]], train_l, label="train", lw=1)
    if val_l:
        ax.plot([r["step"] for r in metrics["val"]], val_l, "o-", label="validation")
        last = metrics["val"][-1]
        ax.annotate(f"{last['loss']:.3f}", (last["step"], last["loss"]), textcoords="offset points", xytext=(4, 6),
                    fontsize=8)
    # The first steps' losses can be many times the rest: scale to what follows them so the descent is visible.
    settled = train_l[len(train_l) // 10:] + val_l
    if settled:
        lo, hi = min(settled), max(settled)
        pad = max(0.05 * (hi - lo), 0.01)
        ax.set_ylim(lo - pad, hi + pad * 3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_title("QLoRA training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, plt, Path(path))
    return True
