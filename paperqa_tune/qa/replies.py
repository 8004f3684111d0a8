"""Reading what the LLM that writes the Q&A replied: JSON (fenced or wrapped in prose), generation replies as
conversations of valid turns, judge replies as scores. Everything here raises ValueError or returns what is usable;
generate_qa.py decides what becomes a reject."""
from __future__ import annotations

import json
import re

from paperqa_tune.client import Outcome
from paperqa_tune.qa.prompts import TYPES
from paperqa_tune.qa.textsim import clean_text


def _json_object(content: str | None):
    if content is None or not content.strip():
        raise ValueError("the reply was empty")
    text = content.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        a, b = text.find("{"), text.rfind("}")
        if 0 <= a < b:
            try:
                return json.loads(text[a: b + 1])
            except json.JSONDecodeError:
                pass
        raise ValueError(f"not valid JSON ({e.msg} at char {e.pos})") from None


def _turn(item) -> tuple[dict | None, str | None]:
    """(a valid Q&A turn, None) or (None, why the item is not one)."""
    if not isinstance(item, dict):
        return None, "pair is not an object"
    t = re.sub(r"[\s-]+", "_", str(item.get("type", "")).strip().lower())
    q, a = item.get("question"), item.get("answer")
    if t not in TYPES:
        return None, f"unknown type {item.get('type')!r}"
    if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
        return None, "missing or empty question/answer"
    return {"type": t, "question": clean_text(q), "answer": a.strip()}, None


def parse_reply(out: Outcome, turns: int = 1) -> tuple[list[list[dict]], list[tuple[dict, str]]]:
    """(conversations, [(bad item, reason)]) from a generation reply: each conversation a list of turns (one turn
    when --turns 1, whose replies are {"pairs": [...]}). A conversation is cut before its first invalid turn: the
    turns after it build on it. Raises ValueError when nothing usable came back."""
    try:
        obj = _json_object(out.content)
    except ValueError as e:
        cut = " (cut off at --max_tokens)" if out.finish_reason == "length" else ""
        raise ValueError(f"{e}{cut}") from None
    key = "pairs" if turns == 1 else "conversations"
    items = obj.get(key) if isinstance(obj, dict) else obj if isinstance(obj, list) else None
    if not isinstance(items, list):
        raise ValueError(f"the JSON has no {key!r} list")
    good, bad = [], []
    for item in items:
        steps = [item] if turns == 1 else item.get("turns") if isinstance(item, dict) else None
        if not isinstance(steps, list):
            bad.append(({"raw": str(item)[:200]}, "conversation has no 'turns' list"))
            continue
        conv = []
        for k, step in enumerate(steps[:turns]):
            turn, why = _turn(step)
            if turn is None:
                raw = step if isinstance(step, dict) else {"raw": str(step)[:200]}
                bad.append((raw, why if turns == 1 else f"turn {k + 1}: {why}"))
                break
            conv.append(turn)
        if conv:
            good.append(conv)
    if not good:
        what = "pair" if turns == 1 else "conversation"
        raise ValueError(f"no valid {what} in the reply ({bad[0][1] if bad else f'empty {key} list'})")
    return good, bad


def reply_problem(out: Outcome, turns: int = 1) -> str | None:
    """Why a generation reply cannot be used (empty, not JSON, nothing valid in it), or None."""
    try:
        parse_reply(out, turns)
    except ValueError as e:
        return str(e)
    return None


def judge_scores(out: Outcome) -> dict[int, tuple[float, str]]:
    """{pair index: (score, reason)} from a judge reply; empty when it failed or does not parse."""
    scores = {}
    if out.error is None:
        try:
            obj = _json_object(out.content)
        except ValueError:
            return scores
        for s in obj.get("scores", []) if isinstance(obj, dict) else []:
            ok = isinstance(s, dict) and isinstance(s.get("index"), int) and not isinstance(s.get("score"), bool)
            if ok and isinstance(s.get("score"), (int, float)):
                scores[s["index"]] = (float(s["score"]), str(s.get("reason", ""))[:300])
    return scores
