"""What generate_qa.py asks an LLM: the pair types, the generation, repair and judge prompts, and the JSON
schemas of the replies. Everything that shapes the data sits here, hashed together into the manifest."""
from __future__ import annotations

import json

from paperqa_tune.files import sha256_text

ANSWERABLE = ("factual", "conceptual", "methodology")
EDGE_CASES = ("unanswerable", "false_premise")
TYPES = ANSWERABLE + EDGE_CASES

GENERATOR_SYSTEM = ("You write training data for a research assistant: question-answer pairs about one paper, "
                    "using only its abstract. You reply with JSON only.")

TYPE_GUIDE = {
    "factual": "a specific fact the abstract states (a result, number, dataset, model or name); the answer "
               "gives it from the abstract.",
    "conceptual": "the idea, motivation or significance of the work, as the abstract explains it.",
    "methodology": "how the method works or how it was trained or evaluated, as the abstract describes it.",
    "unanswerable": "asks for a plausible detail the abstract does NOT give (hardware, hyperparameters, cost, "
                    "dataset size...); the answer says the abstract does not state it and invents nothing.",
    "false_premise": "presupposes something the abstract contradicts (a wrong number, the opposite finding); "
                     "the answer points out the false premise and gives what the abstract actually says.",
}

GENERATION_PROMPT = """Paper: "{title}" (id {paper_id})
<abstract>
{abstract}
</abstract>

Write exactly {n} question-answer pairs about this paper: {quota}.

Types:
{type_guide}

Rules:
- Every question names the paper ("{name}") so that it makes sense on its own, without the abstract.
- Answers use only what the abstract says, in 1-3 sentences. Never add numbers or names it does not give.
- No two questions ask the same thing.

Reply with one JSON object and nothing else:
{{"pairs": [{{"type": "<one of {types}>", "question": "...", "answer": "..."}}]}}"""

# --turns N: conversations instead of single pairs. Same paper block, same type guide; follow-ups build on answers.
DIALOGUE_PROMPT = """Paper: "{title}" (id {paper_id})
<abstract>
{abstract}
</abstract>

Write exactly {n_conv} conversations about this paper, each of {turns} turns: a user asks, an assistant answers,
and every follow-up question builds on the answer just given (it may refer back to it: "that method", "those
results"). Over all turns together: {quota}; edge cases may come at any turn, not only the first.

Types:
{type_guide}

Rules:
- The first question of each conversation names the paper ("{name}") so that it makes sense on its own.
- Answers use only what the abstract says, in 1-3 sentences. Never add numbers or names it does not give.
- No two conversations start with the same question.

Reply with one JSON object and nothing else:
{{"conversations": [{{"turns": [{{"type": "<one of {types}>", "question": "...", "answer": "..."}}]}}]}}"""

REPAIR_PROMPT = """Your reply could not be used: {error}.
Reply again with only the JSON object {{"pairs": [{{"type": ..., "question": ..., "answer": ...}}]}} as \
instructed above: no prose, no code fences, every pair with a non-empty "type", "question" and "answer"."""

# A section of the full text: the prompts above say "abstract"; this says which text that is.
SECTION_NOTE = """

Here the text above is the "{section}" section of the paper's full text, not its abstract: wherever these
instructions say "the abstract", read "this section". Questions may name the section ("In its method section, ...")."""

REPAIR_DIALOGUES_PROMPT = """Your reply could not be used: {error}.
Reply again with only the JSON object \
{{"conversations": [{{"turns": [{{"type": ..., "question": ..., "answer": ...}}]}}]}} \
as instructed above: no prose, no code fences, every turn with a non-empty "type", "question" and "answer"."""

JUDGE_SYSTEM = "You grade question-answer pairs written about a paper abstract. You reply with JSON only."

JUDGE_PROMPT = """Paper: "{title}"
<abstract>
{abstract}
</abstract>

Grade each pair from 1 (wrong, unsupported by the abstract, or useless) to 5 (correct, fully supported by
the abstract, useful). An "unanswerable" pair is good only if its answer says the abstract does not give
that detail and invents nothing; a "false_premise" pair only if its answer corrects the premise.

{pairs}

Reply with one JSON object and nothing else:
{{"scores": [{{"index": 1, "score": 4, "reason": "..."}}]}}"""

_TURN = {"type": "object",
         "properties": {"type": {"type": "string", "enum": list(TYPES)}, "question": {"type": "string"},
                        "answer": {"type": "string"}},
         "required": ["type", "question", "answer"], "additionalProperties": False}
DIALOGUES_SCHEMA = {
    "type": "object",
    "properties": {"conversations": {"type": "array", "items": {
        "type": "object", "properties": {"turns": {"type": "array", "items": _TURN}},
        "required": ["turns"], "additionalProperties": False}}},
    "required": ["conversations"], "additionalProperties": False,
}
PAIRS_SCHEMA = {
    "type": "object",
    "properties": {"pairs": {"type": "array", "items": {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": list(TYPES)}, "question": {"type": "string"},
                       "answer": {"type": "string"}},
        "required": ["type", "question", "answer"], "additionalProperties": False}}},
    "required": ["pairs"], "additionalProperties": False,
}
SCORES_SCHEMA = {
    "type": "object",
    "properties": {"scores": {"type": "array", "items": {
        "type": "object",
        "properties": {"index": {"type": "integer"}, "score": {"type": "number"}, "reason": {"type": "string"}},
        "required": ["index", "score", "reason"], "additionalProperties": False}}},
    "required": ["scores"], "additionalProperties": False,
}


def prompts_hash(system_prompt: str, extended: bool = False) -> str:
    """One hash over every prompt text, so the manifest says which prompts made the data."""
    return sha256_text(json.dumps([GENERATOR_SYSTEM, TYPE_GUIDE, GENERATION_PROMPT, REPAIR_PROMPT, JUDGE_SYSTEM,
                                   JUDGE_PROMPT, PAIRS_SCHEMA, SCORES_SCHEMA, system_prompt]
                                  # added later: hashed only when used, so older manifests keep their hash
                                  + ([DIALOGUE_PROMPT, DIALOGUES_SCHEMA, REPAIR_DIALOGUES_PROMPT, SECTION_NOTE]
                                     if extended else []),
                                  sort_keys=True))


def type_quotas(n: int, edge_ratio: float) -> dict[str, int]:
    """How many pairs of each type to ask for: edge cases split unanswerable/false_premise, the rest evenly."""
    n_edge = min(n, round(n * edge_ratio))
    if edge_ratio > 0 and n >= 4 and n_edge == 0:
        n_edge = 1
    q = {"unanswerable": (n_edge + 1) // 2, "false_premise": n_edge // 2}
    rest = n - n_edge
    for i, t in enumerate(("factual", "methodology", "conceptual")):
        q[t] = rest // 3 + (1 if i < rest % 3 else 0)
    return {t: q[t] for t in TYPES}


def type_order(quotas: dict[str, int]) -> list[str]:
    """The quota as one type per item, dealt round-robin in TYPES order (factual, conceptual, methodology,
    unanswerable, false_premise, factual, ...): neighbouring items differ, so a model does not drift into
    writing the same kind of question over and over."""
    left, out = dict(quotas), []
    while any(left.values()):
        for t in TYPES:
            if left.get(t, 0) > 0:
                out.append(t)
                left[t] -= 1
    return out


def request_schema(quotas: dict[str, int], turns: int = 1) -> dict:
    """PAIRS_SCHEMA (turns 1) or DIALOGUES_SCHEMA with the request's quota written in: exactly the number of pairs
    (or conversations of `turns` turns) asked, each item's "type" fixed to the one its position was dealt
    (type_order; conversations take their turns' types in order). A constrained decoder (the hf backend's
    grammar) then cannot write a mix other than the one asked for, whatever the model prefers."""
    order = type_order(quotas)

    def turn(t: str) -> dict:
        return {**_TURN, "properties": {**_TURN["properties"], "type": {"type": "string", "enum": [t]}}}

    def fixed(items: list[dict]) -> dict:
        return {"type": "array", "prefixItems": items, "items": False, "minItems": len(items),
                "maxItems": len(items)}

    if turns == 1:
        key, items = "pairs", [turn(t) for t in order]
    else:
        conv = DIALOGUES_SCHEMA["properties"]["conversations"]["items"]
        key, items = "conversations", [
            {**conv, "properties": {"turns": fixed([turn(t) for t in order[c:c + turns]])}}
            for c in range(0, len(order) - len(order) % turns, turns)]
    base = PAIRS_SCHEMA if turns == 1 else DIALOGUES_SCHEMA
    return {**base, "properties": {key: fixed(items)}}


def short_name(title: str, paper_id: str) -> str:
    """How questions name the paper: the part before a colon when that is a short name ("QLoRA: ...")."""
    if not title:
        return f"paper {paper_id}"
    head = title.split(":")[0].strip()
    return head if ":" in title and 1 < len(head) <= 40 else title


def conversations_per_source(pairs: int, turns: int) -> int:
    """Conversations asked per source text: about --pairs_per_abstract Q&A turns in all, at least one."""
    return max(1, round(pairs / turns))


def items_asked(quotas: dict[str, int], turns: int) -> int:
    """What one request asks for: pairs, or with turns > 1 conversations of `turns` turns (the type quotas count
    turns over all of them)."""
    n = sum(quotas.values())
    return n if turns == 1 else max(1, n // turns)


def for_source(user: str, source: dict) -> str:
    """A prompt written for an abstract, for the text it is really grounded in: unchanged for an abstract; for a
    section of the full text the <abstract> block is tagged as that section and SECTION_NOTE says how to read the
    instructions."""
    section = source.get("section", "abstract")
    if section == "abstract":
        return user
    user = user.replace("<abstract>", f'<section name="{section}">', 1).replace("</abstract>", "</section>", 1)
    return user + SECTION_NOTE.format(section=section)


def generation_messages(paper: dict, quotas: dict[str, int], turns: int = 1) -> list[dict]:
    """The request for one source text: an abstract, or a section of the full text (`paper["section"]`). With
    turns > 1 it asks for sum(quotas) // turns conversations; the type quotas then count turns over all of them.
    A single-turn request for an abstract is the same text as always (earlier runs' cached replies still match)."""
    quota = ", ".join(f"{k} {t}" for t, k in quotas.items() if k)
    guide = "\n".join(f"- {t}: {TYPE_GUIDE[t]}" for t in TYPES if quotas.get(t))
    fields = dict(title=paper["title"] or "(untitled)", paper_id=paper["id"], abstract=paper["abstract"],
                  quota=quota, type_guide=guide, name=short_name(paper["title"], paper["id"]), types="|".join(TYPES))
    if turns > 1:
        user = DIALOGUE_PROMPT.format(**fields, turns=turns, n_conv=items_asked(quotas, turns))
    else:
        user = GENERATION_PROMPT.format(**fields, n=items_asked(quotas, turns))
    return [{"role": "system", "content": GENERATOR_SYSTEM}, {"role": "user", "content": for_source(user, paper)}]


def repair_messages(messages: list[dict], bad_reply: str | None, error: str, turns: int = 1) -> list[dict]:
    prompt = REPAIR_PROMPT if turns == 1 else REPAIR_DIALOGUES_PROMPT
    return messages + [{"role": "assistant", "content": (bad_reply or "")[:4000]},
                       {"role": "user", "content": prompt.format(error=error)}]


def judge_messages(paper: dict, pairs: list[dict]) -> list[dict]:
    listing = "\n\n".join(f"{i}. [{p['type']}]\nQ: {p['question']}\nA: {p['answer']}" for i, p in enumerate(pairs, 1))
    user = JUDGE_PROMPT.format(title=paper["title"] or paper["id"], abstract=paper["abstract"], pairs=listing)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": for_source(user, paper)}]
