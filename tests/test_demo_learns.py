"""The demo's fine-tuning must make the tiny model measurably better on held-out papers, not just run.

Runs tools/demo.py's run() with the demo's own settings (a few minutes on 2 CPU cores) and reads the
evaluation's own verdict (outputs/summary.json). What a tiny model can learn, and what is checked here, is
behaviour and form: reject false premises, refuse what the abstract cannot answer, stop producing loops and
made-up words. Stating what is true instead of a false premise (what the correction rate counts) needs the facts,
which a model this small does not have: the demo rejects most premises but corrects few. Whether its answers to answerable questions are right is not checked: the prompt holds no
abstract and a model this small cannot know.
"""
from __future__ import annotations

import csv
import json

import pytest

SIDES = ("base", "finetuned")


def assert_finetuned_better(paths: dict) -> None:
    """The verdict, in one place: fine-tuned better than base on the held-out papers, for the right reasons."""
    s = json.loads(paths["summary"].read_text(encoding="utf-8"))
    with open(paths["evaluation"], encoding="utf-8-sig", newline="") as f:
        fps = [r for r in csv.DictReader(f) if r["type"] == "false_premise"]
    msg = json.dumps({k: s[k] for k in ("verdict_line", "rates")}, indent=1)
    assert s["verdict"] == "fine-tuned better", msg
    rates = s["rates"]
    assert rates["correction_rate_false_premise"]["n"] >= 8 and rates["refusal_rate_unanswerable"]["n"] >= 8, msg
    rejects = {side: sum(r[f"{side}_behaviour"] == "corrected_premise" for r in fps) / len(fps) for side in SIDES}
    assert rejects["finetuned"] >= rejects["base"] + 0.4, (rejects, msg)
    un = rates["refusal_rate_unanswerable"]
    assert un["finetuned"] > un["base"], msg
    assert rates["degenerate_rate"]["finetuned"] <= rates["degenerate_rate"]["base"], msg


@pytest.mark.numerics
@pytest.mark.timeout(900)
def test_demo_finetuned_beats_base_on_held_out_papers(tmp_path):
    from tools import demo

    lines = []
    paths = demo.run(tmp_path, log=lines.append)
    assert_finetuned_better(paths)
    # the demo also shows one multi-turn conversation (--turns 3) whose follow-up is an edge case
    shown = "\n".join(lines)
    assert "one multi-turn conversation" in shown and shown.count("assistant: ") >= 3
    recs = [json.loads(x) for x in paths["dialogues"].read_text(encoding="utf-8").splitlines()]
    assert recs and all(1 <= len(r["meta"]["turn_types"]) <= 3 for r in recs)
    assert sum(len(r["meta"]["turn_types"]) == 3 for r in recs) >= 0.9 * len(recs)
