"""Which training samples are held out for validation: whole papers where the data names them, so the validation
loss (and the evaluation on held-out questions) is on papers the adapter never saw. TrainingData: the data stage's
result, the samples with their split."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingData:
    samples: list[dict]                 # every sample: {"input_ids", "labels", "group", "line", ...}
    report: dict                        # build_samples' counts: records, dropped, trimmed
    train: list[dict]
    val: list[dict]                     # held out: validation loss, and the evaluation questions of the run
    template_source: str                # "model", or the project's default when the model has no chat template


def split_train_val(samples: list[dict], val_fraction: float, seed: int,
                    min_val: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out whole papers (meta.paper_id) where known, so validation loss is on unseen papers.
    min_val: hold out at least this many samples (capped at a quarter of the data) when val_fraction > 0."""
    n_val = round(len(samples) * val_fraction)
    if val_fraction > 0:
        n_val = max(n_val, min(min_val, len(samples) // 4))
    if val_fraction > 0 and n_val == 0 and len(samples) >= 10:
        n_val = 1
    if n_val == 0:
        return samples, []
    groups = sorted({s["group"] for s in samples})
    random.Random(seed).shuffle(groups)
    size = {}
    for s in samples:
        size[s["group"]] = size.get(s["group"], 0) + 1
    val_groups, count = set(), 0
    for g in groups:
        if count >= n_val:
            break
        val_groups.add(g)
        count += size[g]
    if count > 2 * n_val or count == len(samples):  # too few papers to hold out whole ones: split records
        val_groups = {id(s) for s in random.Random(seed).sample(samples, n_val)}
        return [s for s in samples if id(s) not in val_groups], [s for s in samples if id(s) in val_groups]
    return [s for s in samples if s["group"] not in val_groups], [s for s in samples if s["group"] in val_groups]
