"""How tokenized training samples look to a person (train_qlora_hf.py --inspect): trained tokens marked in
the text, a length histogram, and the padding a batch layout would cost."""
from __future__ import annotations

import math
import random

from paperqa_tune.train.packing import IGNORE


def marked_text(text: str, ids: list[int], labels: list[int], offsets, bos_id) -> str:
    """`text` with ⟦ ⟧ around the characters of trained tokens (label != -100); <s> in front when a BOS token
    was added outside the text."""
    trained = [False] * len(text)
    for lab, (a, b) in zip(labels, offsets):
        if lab != IGNORE:
            trained[a:b] = [True] * (b - a)
    out, on = ["<s>" if ids and ids[0] == bos_id and offsets[0] == (0, 0) else ""], False
    for ch, t in zip(text, trained):
        if t != on:
            out.append("⟦" if t else "⟧")
            on = t
        out.append(ch)
    return "".join(out) + ("⟧" if on else "")


def padding_share(step_plans, lengths: list[int], micro: int) -> float:
    """Share of padding tokens when each step's samples (sorted longest first) are padded per micro-batch."""
    padded = 0
    for step in step_plans:
        step = sorted(step, key=lambda i: -lengths[i])
        for k in range(0, len(step), micro):
            chunk = step[k:k + micro]
            padded += max(lengths[i] for i in chunk) * len(chunk)
    return 1 - sum(lengths) / padded


def histogram_lines(lengths: list[int], bins: int = 10, bar: int = 40) -> list[str]:
    """A text histogram of lengths in `bins` equal-width bins."""
    width = max(1, math.ceil(max(lengths) / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - 1) // width)] += 1
    return [f"  {k * width + 1:>6}-{(k + 1) * width:<6} {c:>6} {'#' * math.ceil(bar * c / max(counts))}"
            for k, c in enumerate(counts)]


def epoch_plan(lengths: list[int], per_step: int, seed: int, epoch: int, group_by_length: bool,
               shuffle: bool) -> list[list[int]]:
    """Sample indices of each optimizer step of one epoch, a function of (seed, epoch) only.

    Length grouping sorts chunks of 64 steps' worth of samples by length, so neighbours (which share
    micro-batches) have similar lengths, then shuffles the order of the steps.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = per_step * 64
        order = [i for k in range(0, len(order), mega)
                 for i in sorted(order[k:k + mega], key=lambda j: -lengths[j])]
    steps = [order[k:k + per_step] for k in range(0, len(order), per_step)]
    if group_by_length and shuffle:
        rng.shuffle(steps)
    return steps
