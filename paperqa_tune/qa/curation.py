"""Stage 1's curation: the checks every generated Q&A turn must pass (chat markers, length, error text, grounding,
edge-case behaviour), exact and near-duplicate removal, the optional LLM judge's scores, the split of whole papers
into train and eval, and the records written for each.

    rules = CurationRules(min_grounding=0.5)          # the defaults are generate_qa.py's flag defaults
    convs = curate(convs, units, rules, counts, rejects)
    train, evals = to_records(convs, units, split_papers(ids, 3, seed), turns=1, system_prompt=..., backend=...,
                              model=...)

A conversation is {"paper_id", "unit", "turns": [{"type", "question", "answer"}, ...]}; `units` maps a unit id to
the text it is grounded in (source_units). Dropped turns go to `rejects` with their reason and are counted in
`counts` by the reason's first word.

Two evaluation sets: "unseen" (every question of the papers split_papers holds out whole) and "knowledge" (pairs
about training papers that hold_back_knowledge keeps out of the training file, then drop_near_training)."""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from paperqa_tune.client import Outcome
from paperqa_tune.errors import InputError
from paperqa_tune.llm import Progress, Stats
from paperqa_tune.messages import chat_record, qa_messages
from paperqa_tune.qa.prompts import (ANSWERABLE, SCORES_SCHEMA, TYPES, conversations_per_source, judge_messages,
                                     type_quotas)
from paperqa_tune.qa.replies import judge_scores
from paperqa_tune.qa.textsim import (cross_group_near_duplicates, grounding, normalized, numbers, question_tokens,
                                     within_paper_duplicate)
from paperqa_tune.safety import chat_structure
from paperqa_tune.scoring import corrects_premise, is_refusal


@dataclass(frozen=True)
class CurationRules:
    """What a kept turn must satisfy (generate_qa.py's curation flags, whose defaults these are)."""
    min_grounding: float = 0.5     # share of an answerable pair's answer content words found in its text
    dedup_threshold: float = 0.8   # word-overlap (Jaccard) at which a question is a near-duplicate
    min_question_chars: int = 10
    max_question_chars: int = 400
    min_answer_chars: int = 15
    max_answer_chars: int = 1500
    turns: int = 1                 # Q&A turns per conversation (rejects of conversations name the turn)


def skip_too_long(papers: list[dict], limit: int) -> tuple[list[dict], list[dict]]:
    """(papers to work on, rejects of those whose title + abstract exceed --max_abstract_chars). Such a paper would
    be sent whole in its request and again in a repair, and copied into every eval question's context."""
    kept, rejects = [], []
    for p in papers:
        n = len(p["title"]) + len(p["abstract"])
        if n <= limit:
            kept.append(p)
        else:
            rejects.append({"paper_id": p["id"], "stage": "input", "where": p["_where"],
                            "reason": f"too_long: title and abstract have {n:,} chars, more than --max_abstract_chars "
                                      f"{limit:,}; raise --max_abstract_chars to keep this paper"})
    if not kept:
        longest = max(papers, key=lambda p: len(p["title"]) + len(p["abstract"]))
        raise InputError(f"every paper is longer than --max_abstract_chars {limit:,} (the longest has "
                         f"{len(longest['title']) + len(longest['abstract']):,} chars, at {longest['_where']}); raise "
                         "--max_abstract_chars if these really are abstracts")
    return kept, rejects


# Error messages and refusals that a careless pipeline would keep as answers
_ERROR_TEXT_RE = re.compile(r"^\s*(error|exception|traceback|i'm sorry|sorry, |i cannot|i can't)\b|"
                            r"internal server error|rate limit (exceeded|reached)|as an ai (language )?model", re.I)


def check_pair(p: dict, abstract: str, rules: CurationRules) -> str | None:
    """The reason this pair is dropped, or None (chat markers, length, error text, grounding, edge-case behaviour).
    A pair holding a chat role marker or special token is rejected, not cleaned: rendered into training text the
    marker would end the turn or open a fake one, and a pair that needed one is not worth repairing."""
    q, a = p["question"], p["answer"]
    for part, text in (("question", q), ("answer", a)):
        marker = chat_structure(text)
        if marker:
            return f"chat_markers: the {part} holds the chat marker {marker!r}"
    if not rules.min_question_chars <= len(q) <= rules.max_question_chars:
        return f"length: question has {len(q)} chars (allowed {rules.min_question_chars}-{rules.max_question_chars})"
    if not rules.min_answer_chars <= len(a) <= rules.max_answer_chars:
        return f"length: answer has {len(a)} chars (allowed {rules.min_answer_chars}-{rules.max_answer_chars})"
    if _ERROR_TEXT_RE.search(q) or _ERROR_TEXT_RE.search(a):
        return "error_text: looks like an error message, not a Q&A pair"
    invented = numbers(a) - numbers(abstract) - numbers(q)
    if invented:
        return f"ungrounded_number: answer has {', '.join(sorted(invented))} which the abstract does not"
    if p["type"] in ANSWERABLE:
        g = grounding(a, abstract)
        if g < rules.min_grounding:
            return (f"ungrounded: only {g:.0%} of the answer's content words are in the abstract "
                    f"(< {rules.min_grounding:.0%})")
    elif p["type"] == "unanswerable" and not is_refusal(a):
        return "no_refusal: an unanswerable question's answer must say the abstract does not give it"
    elif p["type"] == "false_premise" and not corrects_premise(a):
        return "no_correction: a false-premise question's answer must correct the premise"
    return None


def curate(convs: list[dict], units: dict[str, dict], rules: CurationRules, counts: Counter,
           rejects: list[dict]) -> list[dict]:
    """Per-turn checks, then exact and near-duplicate removal of opening questions (within a paper, then across
    papers). A conversation is cut before its first failing turn (the later turns build on it); one whose first
    turn fails is dropped."""
    def drop(c, k, reason, dropped_after=0):
        counts[reason.split(":")[0]] += 1
        t, section = c["turns"][k], units[c["unit"]]["section"]
        extra = {"turn": k + 1, "later_turns_dropped": dropped_after} if rules.turns > 1 else {}
        if section != "abstract":
            extra["section"] = section
        rejects.append({"paper_id": c["paper_id"], "stage": "curate", "reason": reason, "type": t["type"],
                        "question": t["question"], "answer": t["answer"], **extra})

    kept, seen = [], {}
    by_paper: dict[str, list[str]] = defaultdict(list)
    for c in convs:
        unit = units[c["unit"]]
        for k, turn in enumerate(c["turns"]):
            reason = check_pair(turn, unit["abstract"], rules)
            if reason:
                drop(c, k, reason, len(c["turns"]) - k - 1)
                c = {**c, "turns": c["turns"][:k]}
                break
        if not c["turns"]:
            continue
        first = c["turns"][0]["question"]
        norm, reason = normalized(first), None
        if norm in seen:
            reason = f"duplicate: same question as one of paper {seen[norm]}"
        else:
            other = within_paper_duplicate(first, by_paper[c["paper_id"]], unit["title"], rules.dedup_threshold)
            if other is not None:
                reason = f"near_duplicate: close to {other!r}"
        if reason:
            drop(c, 0, reason, len(c["turns"]) - 1)
            continue
        seen[norm] = c["paper_id"]
        by_paper[c["paper_id"]].append(first)
        kept.append(c)
    dups = cross_group_near_duplicates([question_tokens(c["turns"][0]["question"]) for c in kept],
                                       [c["paper_id"] for c in kept], rules.dedup_threshold)
    for i, j in dups.items():
        drop(kept[i], 0, f"near_duplicate: close to {kept[j]['turns'][0]['question']!r} of paper "
                         f"{kept[j]['paper_id']}", len(kept[i]["turns"]) - 1)
    return [c for i, c in enumerate(kept) if i not in dups]


async def judge(judge_backend, convs: list[dict], units: dict[str, dict], min_score: float, stats: Stats,
                progress: Progress, counts: Counter, rejects: list[dict]) -> list[dict]:
    """Score each source text's surviving turns in one request; a conversation keeps its turns up to the first
    one scored below --min_score (or not scored)."""
    groups: dict[str, list[tuple[int, int]]] = defaultdict(list)  # unit -> (conversation, turn) in listing order
    for ci, c in enumerate(convs):
        groups[c["unit"]] += [(ci, k) for k in range(len(c["turns"]))]
    ids = list(groups)
    progress.start(len(ids), "judge")

    def on_done(k: int, out: Outcome) -> None:
        stats.add(out)
        progress.step()

    def usable(k: int, cached: Outcome) -> bool:  # a cached verdict missing a pair's score is asked again
        return set(judge_scores(cached)) >= set(range(1, len(groups[ids[k]]) + 1))

    msgs = [judge_messages(units[u], [convs[ci]["turns"][k] for ci, k in groups[u]]) for u in ids]
    outs = await judge_backend.complete(msgs, "scores", SCORES_SCHEMA, on_done, usable)
    progress.close()
    score_of: dict[tuple[int, int], tuple[float, str] | str] = {}
    for u, out in zip(ids, outs):
        scores = judge_scores(out)
        for n, pos in enumerate(groups[u], 1):
            score_of[pos] = scores.get(n, out.error or "missing in the reply")
    kept = []
    for ci, c in enumerate(convs):
        turns = []
        for k, t in enumerate(c["turns"]):
            got = score_of[(ci, k)]
            if isinstance(got, tuple) and got[0] >= min_score:
                turns.append({**t, "judge_score": got[0]})
                continue
            if isinstance(got, tuple):
                reason, key = f"judge_low_score: {got[0]:g} < {min_score:g} ({got[1]})", "judge_low_score"
            else:
                reason, key = f"judge_failed: no score ({got})", "judge_failed"
            counts[key] += 1
            stats.rejects += 1
            later = {"turn": k + 1, "later_turns_dropped": len(c["turns"]) - k - 1} if len(c["turns"]) > 1 else {}
            rejects.append({"paper_id": c["paper_id"], "stage": "judge", "reason": reason, "type": t["type"],
                            "question": t["question"], "answer": t["answer"], **later})
            break
        if turns:
            kept.append({**c, "turns": turns})
    return kept


def split_papers(paper_ids: list[str], spec: float, seed: int) -> set[str]:
    """Whole papers held out for evaluation: K papers, or a fraction when 0 < spec < 1."""
    n = len(paper_ids)
    k = round(spec * n) if 0 < spec < 1 else int(spec)
    k = max(1, k) if spec > 0 else 0
    k = min(k, n - 1) if n > 1 else 0
    return set(random.Random(seed).sample(paper_ids, k))


def knowledge_extras(unit_ids: list[str], n: int, edge_ratio: float, per_unit_max: int) -> dict[str, dict[str, int]]:
    """Extra pairs each training text is asked for, to be held back as knowledge questions: n in all (at most
    per_unit_max per text, so a few papers are not asked for dozens each), with the types of type_quotas(n,
    edge_ratio) interleaved (each type spread evenly over the sequence) and dealt to the texts in turn, so every
    text gives a mix."""
    n = min(n, per_unit_max * len(unit_ids))
    if n <= 0:
        return {}
    total = type_quotas(n, edge_ratio)
    slots = sorted(((k + 0.5) / c, i, t) for i, (t, c) in enumerate(total.items()) for k in range(c))
    extras: dict[str, dict[str, int]] = {}
    for j, (_, _, t) in enumerate(slots):
        got = extras.setdefault(unit_ids[j % len(unit_ids)], dict.fromkeys(TYPES, 0))
        got[t] += 1
    return extras


def hold_back_knowledge(convs: list[dict], train_quotas: dict[str, int], extras: dict[str, dict[str, int]],
                        turns: int) -> list[dict]:
    """convs (of training papers) with the held-back ones marked "set": "knowledge". Single pairs: per text and
    type, the first train_quotas[t] kept pairs stay training data, the next extras[t] are held back, any more stay
    training data; so training keeps its --edge_case_ratio even when the generator wrote fewer pairs than asked
    (the knowledge set is then the smaller). Conversations (turns > 1): the text's last conversations, about
    sum(extras) turns, always leaving it one for training (the training share is then only about right)."""
    by_unit: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(convs):
        by_unit[c["unit"]].append(i)
    held: set[int] = set()
    for unit, idx in by_unit.items():
        extra = extras.get(unit)
        if not extra:
            continue
        if turns == 1:
            for t in TYPES:
                of_type = [i for i in idx if convs[i]["turns"][0]["type"] == t]
                held.update(of_type[train_quotas.get(t, 0): train_quotas.get(t, 0) + extra[t]])
        else:
            k = min(len(idx) - 1, max(1, round(sum(extra.values()) / turns)))
            held.update(idx[len(idx) - k:] if k > 0 else [])
    return [{**c, "set": "knowledge"} if i in held else c for i, c in enumerate(convs)]


def drop_near_training(convs: list[dict], units: dict[str, dict], threshold: float, counts: Counter,
                       rejects: list[dict]) -> list[dict]:
    """Knowledge questions must not repeat a training question: a held-back conversation is cut before its first
    turn whose question is the same (lowercased words) as any training question, or whose word overlap (Jaccard,
    the paper's title words left out, as curation's within-paper check) with a training question of the same
    paper reaches `threshold`; one cut before its first turn is dropped. Both are rejects ("near_training")."""
    train_q: dict[str, list[str]] = defaultdict(list)
    for c in convs:
        if c.get("set") != "knowledge":
            train_q[c["paper_id"]] += [t["question"] for t in c["turns"]]
    exact = {normalized(q) for qs in train_q.values() for q in qs}
    out = []
    for c in convs:
        if c.get("set") != "knowledge":
            out.append(c)
            continue
        title = units[c["unit"]]["title"]
        for k, t in enumerate(c["turns"]):
            same = t["question"] if normalized(t["question"]) in exact else \
                within_paper_duplicate(t["question"], train_q[c["paper_id"]], title, threshold)
            if same is not None:
                counts["near_training"] += 1
                rejects.append({"paper_id": c["paper_id"], "stage": "knowledge", "type": t["type"],
                                "reason": f"near_training: a knowledge question close to the training question "
                                          f"{same!r}", "question": t["question"], "answer": t["answer"]})
                c = {**c, "turns": c["turns"][:k]}
                break
        if c["turns"]:
            out.append(c)
    return out


@dataclass
class Plan:
    """Who is asked for what, decided before generation: the papers held out whole (the "unseen" set), each
    text's type quotas, and the extra pairs of training texts that become knowledge questions."""
    held_out: set[str]
    train: dict[str, int]                 # a training text's quotas: --pairs_per_abstract at --edge_case_ratio
    eval: dict[str, int]                  # a held-out text's: --eval_pairs_per_abstract at --eval_edge_case_ratio
    extras: dict[str, dict[str, int]]     # training text -> extra pairs per type, held back as knowledge questions
    quotas_of: dict[str, dict[str, int]]  # text -> what its request asks for

    @property
    def largest(self) -> dict[str, int]:
        return max(self.quotas_of.values(), key=lambda q: sum(q.values()), default=self.train)

    def summary(self) -> dict:
        asked = Counter()
        for q in self.extras.values():
            asked.update(q)
        return {"train": self.train, "eval": self.eval, "knowledge_asked": {t: asked[t] for t in self.train}}


def plan_requests(paper_ids: list[str], units: list[dict], *, eval_papers: float, seed: int, pairs: int,
                  edge_ratio: float, eval_pairs: int, eval_edge_ratio: float, knowledge: int, turns: int) -> Plan:
    """Hold out whole papers (no evaluation question shares its abstract with training) and size every request:
    held-out texts get eval_pairs at eval_edge_ratio (more pairs and edge cases than training ones: they are all
    questions, and a rate needs about 20 of its kind); training texts get `pairs` at edge_ratio plus their share
    of the `knowledge` questions (knowledge_extras, at most half as many again)."""
    held_out = split_papers(paper_ids, eval_papers, seed)
    per_text = conversations_per_source(pairs, turns) * turns
    train = type_quotas(per_text, edge_ratio)
    evalq = type_quotas(conversations_per_source(eval_pairs, turns) * turns, eval_edge_ratio)
    extras = knowledge_extras([u["unit"] for u in units if u["id"] not in held_out], knowledge, eval_edge_ratio,
                              max(1, per_text // 2))
    quotas_of = {u["unit"]: evalq if u["id"] in held_out else
                 {t: k + extras.get(u["unit"], {}).get(t, 0) for t, k in train.items()} for u in units}
    return Plan(held_out, train, evalq, extras, quotas_of)


def split_sets(convs: list[dict], plan: Plan, units: dict[str, dict], paper_order: list[str], turns: int,
               dedup_threshold: float, counts: Counter, rejects: list[dict]) -> list[dict]:
    """convs with the knowledge pairs of training papers marked (hold_back_knowledge), those close to a training
    question dropped, in paper order (each paper's conversations in their order).
    Near-duplicates: the rule that keeps two training pairs apart (dedup_threshold: word Jaccard against the
    paper's questions, title words left out), now between a knowledge question and every training one, follow-ups
    included. A stricter bar drops mere template twins ("What does X report about A?" / "... about B?"), which
    ask about different things: measured at 0.6, all 6 of 97 dropped on the sample abstracts were such twins."""
    marked = hold_back_knowledge([c for c in convs if c["paper_id"] not in plan.held_out], plan.train, plan.extras,
                                 turns)
    marked = drop_near_training(marked, units, dedup_threshold, counts, rejects)
    order = {pid: k for k, pid in enumerate(paper_order)}
    return sorted([c for c in convs if c["paper_id"] in plan.held_out] + marked, key=lambda c: order[c["paper_id"]])


@dataclass
class Tally:
    """What the stages count and drop: the manifest's statistics, the filters' counts and the rejects."""
    stats: Stats
    counts: Counter = field(default_factory=Counter)
    rejects: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.progress = Progress(self.stats)


@dataclass
class Kept:
    """What survived, split by paper: conversations kept, papers held out for evaluation, and the records."""
    generated: int           # Q&A turns the generator wrote
    convs: list[dict]
    with_pairs: list[str]    # papers that kept a pair, in input order
    held_out: set[str]
    train: list[dict]
    evals: list[dict]

    @property
    def turns(self) -> int:
        return sum(len(c["turns"]) for c in self.convs)


def set_notes(by_set_type: dict[str, dict[str, int]], enough: int = 20) -> list[str]:
    """A note for each evaluation set with fewer than `enough` unanswerable or false-premise questions, naming
    the flags that give more."""
    flags = {"unseen": "--eval_papers, --eval_pairs_per_abstract", "knowledge": "--knowledge_questions"}
    out = []
    for k, by_type in by_set_type.items():
        edge = [by_type.get(t, 0) for t in ("unanswerable", "false_premise")]
        if sum(by_type.values()) and min(edge) < enough:
            out.append(f"the {k} set has {edge[0]} unanswerable and {edge[1]} false-premise questions; a refusal or "
                       f"correction rate needs about {enough} to tell the models apart ({flags[k]}, "
                       "--eval_edge_case_ratio)")
    return out


def exchanges(turns: list[dict]) -> list[dict]:
    """Q&A turns as the user/assistant messages of a chat."""
    return [{"role": r, "content": t[k]} for t in turns for r, k in (("user", "question"), ("assistant", "answer"))]


def conversation_ids(convs: list[dict], turns: int) -> list[str]:
    """Each kept conversation's id, numbered within its paper: <paper>-q<n> for single pairs, <paper>-c<n> for
    conversations (their evaluation questions add -t<turn>)."""
    n_by_paper, ids = Counter(), []
    for c in convs:
        n_by_paper[c["paper_id"]] += 1
        ids.append(f"{c['paper_id']}-{'q' if turns == 1 else 'c'}{n_by_paper[c['paper_id']]}")
    return ids


def to_records(convs: list[dict], units: dict[str, dict], held_out: set[str], *, turns: int, system_prompt: str,
               backend: str, model: str) -> tuple[list[dict], list[dict]]:
    """(training chat records, evaluation questions): every turn of a held-out paper's conversations becomes a
    question of the "unseen" set, and every turn of a conversation hold_back_knowledge marked one of the
    "knowledge" set (its paper is in training); a follow-up has the turns before it as its "history"; the text it
    is grounded in is its context.
    turns: Q&A turns per conversation asked for; backend and model: who wrote them (each record's meta)."""
    train, evals = [], []
    for c, cid in zip(convs, conversation_ids(convs, turns)):
        pid, unit, conv = c["paper_id"], units[c["unit"]], c["turns"]
        section = {"section": unit["section"]} if unit.get("full_text") else {}
        if pid in held_out or c.get("set") == "knowledge":
            for k, t in enumerate(conv):
                evals.append({"id": cid if turns == 1 else f"{cid}-t{k + 1}", "question": t["question"],
                              "reference": t["answer"], "type": t["type"], "paper_id": pid,
                              "context": unit["abstract"], "set": "unseen" if pid in held_out else "knowledge",
                              "system": system_prompt, **section,
                              **({"history": exchanges(conv[:k])} if k else {})})
            continue
        meta = {"paper_id": pid, "type": conv[0]["type"], "backend": backend, "model": model, "id": cid,
                "title": unit["title"], "generator": "generate_qa.py", **section}
        if turns > 1:
            meta["turn_types"] = [t["type"] for t in conv]
        scores = [t["judge_score"] for t in conv if "judge_score" in t]
        if scores:
            meta["judge_score"] = min(scores)
        messages = qa_messages(conv[-1]["question"], conv[-1]["answer"], system_prompt, exchanges(conv[:-1]))
        train.append(chat_record(messages, meta))
    return train, evals


def quality_items(convs: list[dict], units: dict[str, dict], held_out: set[str], turns: int) -> list[dict]:
    """Every kept Q&A turn as paperqa_tune.qa.quality reads it: split, type, section, the text it is grounded in."""
    items = []
    for c, cid in zip(convs, conversation_ids(convs, turns)):
        unit = units[c["unit"]]
        for k, t in enumerate(c["turns"], 1):
            evaluated = c["paper_id"] in held_out or c.get("set") == "knowledge"
            items.append({"split": "eval" if evaluated else "train", "type": t["type"],
                          "section": unit["section"], "question": t["question"], "answer": t["answer"],
                          "source": unit["abstract"], "conversation": cid, "turn": k, "paper_id": c["paper_id"]})
    return items


def source_units(papers: list[dict]) -> list[dict]:
    """The texts requests are grounded in: a paper's abstract, or each section (part) of its full text. A unit is
    the paper dict the prompts read ("id" stays the paper's, "abstract" is the unit's text) with its own "unit"
    id and "section" name."""
    units = []
    for p in papers:
        if not p.get("sections"):
            units.append({**p, "unit": p["id"], "section": "abstract"})
            continue
        for k, s in enumerate(p["sections"], 1):  # numbered: two sections can share a name (e.g. "body")
            units.append({"id": p["id"], "title": p["title"], "abstract": s["text"], "_where": p["_where"],
                          "unit": f"{p['id']}#{k}:{s['name']}", "section": s["name"], "full_text": True})
    return units
