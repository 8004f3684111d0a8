"""The offline generator: deterministic, rule-based Q&A pairs made from an abstract's own sentences, no LLM.

Each answer is (close to) a sentence of the abstract, so the pairs are grounded by construction; edge cases
come from templates (details abstracts rarely give) and from rewriting a sentence into a false premise
(the opposite finding, a wrong number). Used for the demo, the tests and the fake LLM server's replies.
"""
from __future__ import annotations

import hashlib
import re

from paperqa_tune.qa.prompts import ANSWERABLE, TYPES
from paperqa_tune.qa.textsim import NUMBER_RE, STOPWORDS, clean_text, within_paper_duplicate

OFFLINE_MODEL = "offline-rules-v1"  # the "model" name records of this generator carry

_ABBREVS = ("e.g.", "i.e.", "et al.", "vs.", "cf.", "Fig.", "Eq.", "approx.", "resp.", "etc.", "Sec.", "al.")
_METHOD_RE = re.compile(r"\b(we (propose|introduce|present|develop|design|apply|build|adopt|employ|leverage|combine|"
                        r"extend)|method|approach|architecture|algorithm|framework|objective|loss|technique|procedure|"
                        r"mechanism|module|layers?|encoder|decoder|based on|by (using|training|combining|adding|"
                        r"replacing|learning)|consists? of|relies on|uses?|using|trained|trains?|pre-?train\w*|"
                        r"fine-?tun\w*|freez\w*|inject\w*|condition\w*|retriev\w*|fetch\w*|quantiz\w*|"
                        r"backpropagat\w*|reparameteri\w*|optimi[sz]\w*|tiling|prompting|exemplars?|supervis\w*|"
                        r"reward|index|embedd\w*|attention|casts?|maps?|learns?)\b", re.I)
_RESULT_RE = re.compile(r"\d|\b(achiev|outperform|result|state-of-the-art|improv|accura|score|bleu|surpass|"
                        r"match|reach|gain|speed|reduc|exceed|better|faster|fewer|competitive)\w*", re.I)
_CONCEPT_RE = re.compile(r"\b(problem|challenge|limitation|motivat|because|however|allow|enabl|key|insight|"
                         r"important|crucial|remain|lack|difficult|costly|expensive|suggest|implication|understand|"
                         r"question|hypothes|idea|intuition|fundamental)\w*", re.I)
_CONTRIB_RE = re.compile(r"\b(we (propose|introduce|present|develop|describe)|this (paper|work) (proposes|introduces|"
                         r"presents|describes)|in this (paper|work))\b", re.I)
_EVAL_RE = re.compile(r"\b(evaluat\w*|experiment\w*|benchmarks?|we test|tested on|datasets?)\b", re.I)
_KP_STOP = STOPWORDS | frozenset("""show shows shown demonstrate demonstrates achieve achieves obtain obtains improve
improves outperform outperforms introduce introduces find finds make makes allow allows enable enables based new novel
approach method results result model models first further however moreover furthermore here thus therefore simple large
well since across without within through among able like called named task tasks way ways many much several various
different existing recent previous prior generate generates define defines develop develops provide provides require
requires learn learns predict predicts produce produces focus focuses include includes explore explores study studies
consider considers capture captures combine combines extend extends leverage leverages utilize utilizes exploit exploits
address addresses solve solves train trains optimize optimizes build builds design designs discover discovers infer
infers map maps modify modifies apply applies manipulate measure measures distinguish evaluate evaluates compare
compares analyze analyzes investigate investigates identify identifies detect detects estimate estimates compute
computes perform performs create creates construct constructs transfer adapt adapts align aligns support supports
reach reaches scale scales handle handles mitigate mitigates involve involves remain remains become becomes help helps
yield yields lead leads take takes stand stands rely relies contain contains consist consists reduce reduces increase
increases match matches surpass surpasses suggest suggests argue argues allowing enabling get gets beat beats give
gives need needs work works fit fits run runs set sets see sees lift lifts store stores show cannot""".split())
# -ing words that are usually nouns in ML abstracts (other -ing/-ed/-ly words end a key phrase)
_ING_NOUNS = frozenset("""learning training reasoning understanding modeling modelling processing embedding embeddings
computing engineering parsing tuning pretraining answering encoding decoding sampling testing prompting planning
clustering ranking labeling labelling captioning reading writing translating forecasting tracking mining
spotting""".split())
_ANTONYMS = (("outperforms", "underperforms"), ("outperform", "underperform"), ("improves", "degrades"),
             ("improve", "degrade"), ("increases", "decreases"), ("reduces", "increases"), ("faster", "slower"),
             ("fewer", "more"), ("better", "worse"), ("higher", "lower"), ("lower", "higher"), ("smaller", "larger"),
             ("larger", "smaller"), ("without", "only with"), ("efficient", "inefficient"),
             ("surpasses", "falls short of"))
_LEAD_IN_RE = re.compile(r"^(as a result|however|next|moreover|furthermore|finally|also|specifically|in particular|"
                         r"in addition|to do so|in this (work|paper)|overall|thus|therefore|consequently|surprisingly|"
                         r"notably|importantly|additionally|then|second|first|third),?\s+", re.I)
# Details abstracts almost never give: (question, what the answer says is missing, words that mean it IS given)
_UNANSWERABLE = (
    ("How many GPUs were used to train the models in {ref}?", "how many GPUs were used for training", ("gpu", "tpu")),
    ("What learning rate did the authors of {ref} use?", "the learning rate", ("learning rate",)),
    ("What was the total compute cost in US dollars of the experiments in {ref}?",
     "the cost of the experiments in dollars", ("$", "dollar", "cost")),
    ("Which random seeds were used for the experiments in {ref}?", "the random seeds", ("seed",)),
    ("How many hours of wall-clock time did training take in {ref}?", "the wall-clock training time",
     ("hour", "days", "wall-clock")),
    ("Which funding agency supported the work in {ref}?", "who funded the work", ("fund", "grant")),
    ("What batch size was used for training in {ref}?", "the batch size", ("batch size",)),
    ("How many human annotators were involved in {ref}, and how were they paid?", "any human annotators or their pay",
     ("annotator", "crowd")),
    ("Under which software license is the code of {ref} released?", "the license of the code", ("license",)),
    ("Which optimizer and weight decay did {ref} use?", "the optimizer or weight decay",
     ("optimizer", "adam", "weight decay")),
)


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'$\\])", clean_text(text))
    out: list[str] = []
    for p in parts:
        if out and (out[-1].endswith(_ABBREVS) or len(out[-1]) < 25):
            out[-1] += " " + p
        else:
            out.append(p)
    return [s for s in out if len(s) >= 15]


def _as_answer(sentence: str) -> str:
    """Third person, so the answer reads as a statement about the paper."""
    s = re.sub(r"^We\b", "The authors", sentence)
    s = re.sub(r"^Our\b", "Their", s)
    s = re.sub(r"\bwe\b", "the authors", s)
    s = re.sub(r"\bour\b", "their", s)
    s = re.sub(r"\bus\b", "them", s)
    return s if s.endswith((".", "!", "?")) else s + "."


def _clause(sentence: str) -> str:
    s = _LEAD_IN_RE.sub("", _as_answer(sentence).rstrip(".!? "))
    return s[0].lower() + s[1:] if s[:1].isupper() and not s[1:2].isupper() else s


def _skip_word(w: str) -> bool:
    low = w.lower()
    if not w or "$" in w or "\\" in w or low in _KP_STOP or not re.search(r"[A-Za-z]", w):
        return True
    if w[0].islower() and "-" not in w and len(w) > 4:  # adverbs, participles: "typically", "introduced", "using"
        return low.endswith("ly") or (low.endswith("ed") and not low.endswith("eed")) or \
            (low.endswith("ing") and low not in _ING_NOUNS)
    return False


def keyphrase(sentence: str) -> str | None:
    """The most specific run of 1-4 content words (names, acronyms, hyphenated terms score high)."""
    runs, run = [], []
    for i, raw in enumerate(sentence.split()):
        w = raw.strip(".,;:!?()[]\"'")
        breaks = raw != w and not raw.startswith(w)  # punctuation before the word
        if _skip_word(w) or breaks:
            if run:
                runs.append(run)
            run = [] if _skip_word(w) else [(i, w)]
        else:
            run.append((i, w))
        if raw != raw.rstrip(".,;:!?)]\"'"):  # punctuation after the word ends the run
            if run:
                runs.append(run)
            run = []
    if run:
        runs.append(run)

    def score(word: str, pos: int) -> float:
        s = 1.0
        if any(c.isupper() for c in word[1:]) or (word[0].isupper() and pos > 0):
            s += 1.0
        if len(word) > 6:
            s += 0.5
        if "-" in word or any(c.isdigit() for c in word):
            s += 0.5
        return s

    best, best_score = None, 0.0
    for run in runs:
        for a in range(len(run)):
            for b in range(a + 1, min(a + 4, len(run)) + 1):
                window = run[a:b]
                sc = sum(score(w, i) for i, w in window) + 0.3 * len(window)
                if sc > best_score:
                    best, best_score = window, sc
    if not best or (len(best) == 1 and len(best[0][1]) < 4):
        return None
    words = [w for _, w in best]
    if best[0][0] == 0 and words[0][:1].isupper() and not any(c.isupper() for c in words[0][1:]):
        words[0] = words[0].lower()
    return " ".join(words)


def _sentence_type(i: int, s: str) -> str:
    scores = {"methodology": len(_METHOD_RE.findall(s)), "factual": len(_RESULT_RE.findall(s)),
              "conceptual": len(_CONCEPT_RE.findall(s)) + (1 if i == 0 else 0)}
    return max(scores, key=lambda t: (scores[t], t == "factual"))


def _false_premises(ref: str, sents: list[str], src: str = "abstract") -> list[tuple[str, str]]:
    out = []
    by_len = sorted((s for s in sents if len(s) <= 240), key=len) + [s for s in sents if len(s) > 240]
    for s in by_len:  # the opposite finding
        for word, opposite in _ANTONYMS:
            if re.search(rf"\b{re.escape(word)}\b", s):
                swapped = re.sub(rf"\b{re.escape(word)}\b", opposite, s, count=1)
                out.append((f"Why does {ref} find that {_clause(swapped)}?",
                            f"That premise is incorrect: the {src} says the opposite. {_as_answer(s)}"))
                break
    for s in by_len:  # a wrong number
        m = next((m for m in NUMBER_RE.finditer(s) if not re.fullmatch(r"(19|20)\d\d", m.group())), None)
        if m:
            val = float(m.group().replace(",", ""))
            alt = val * 2 if val >= 2 else val + 3
            alt_s = f"{alt:g}" if "." in m.group() else str(int(alt))
            wrong = s[: m.start()] + alt_s + s[m.end():]
            out.append((f"Why does {ref} report that {_clause(wrong)}?",
                        f"That premise is incorrect: the {src} gives {m.group()}, not {alt_s}. {_as_answer(s)}"))
    contrib = next((s for s in sents if _CONTRIB_RE.search(s)), sents[min(1, len(sents) - 1)])
    kp = keyphrase(contrib) or "the proposed approach"
    out.append((f"Why do the authors of {ref} conclude that {kp} does not work?",
                f"That premise is false: the {src} does not say that {kp} fails. {_as_answer(contrib)}"))
    return out


def _paper_ref(paper: dict, sents: list[str]) -> str:
    """How the questions name the paper: its quoted title; an untitled paper (plain-text input) by its first
    sentence's key phrase, not its file position."""
    title = paper["title"]
    return f'"{title}"' if title else f"the paper on {keyphrase(sents[0]) or 'paper ' + paper['id']}"


def offline_pairs(paper: dict, quotas: dict[str, int], dedup_threshold: float = 0.8) -> list[dict]:
    """Deterministic pairs from the abstract's own sentences: each answer is (close to) a sentence of it. A
    section of the full text (paper["section"]) works the same way; the answers then name that section."""
    title = paper["title"]
    section = paper.get("section", "abstract")
    src = "abstract" if section == "abstract" else f"{section.replace('_', ' ')} section"
    sents = split_sentences(paper["abstract"]) or [paper["abstract"]]
    ref = _paper_ref(paper, sents)
    # a full-text section: questions name the section too, or every section would ask the same questions
    owner = f"The {src} of {ref}"
    if src != "abstract":
        ref = owner = f"the {src} of {ref}"
    cands: dict[str, list[tuple[str, str]]] = {t: [] for t in TYPES}

    contrib = next((s for s in sents if _CONTRIB_RE.search(s)), None)
    first = sents[0] if len(sents[0]) > 60 or len(sents) == 1 else f"{sents[0]} {sents[1]}"
    cands["conceptual"].append((f"What problem does {ref} address?", _as_answer(first)))
    if contrib:
        cands["conceptual"].append((f"What is the main contribution of {ref}?", _as_answer(contrib)))
    if len(sents) > 2:
        cands["conceptual"].append((f"What is the overall conclusion of {ref}?", _as_answer(sents[-1])))
    results = [s for s in sents if re.search(r"\d", s)][:2]
    if results:
        cands["factual"].append((f"What quantitative results does {ref} report?", " ".join(map(_as_answer, results))))
    ev = next((s for s in sents if _EVAL_RE.search(s)), None)
    if ev:
        cands["methodology"].append((f"How is the work in {ref} evaluated?", _as_answer(ev)))
    how = max(sents, key=lambda s: len(_METHOD_RE.findall(s)))
    if _METHOD_RE.search(how):
        cands["methodology"].append((f"How does the method described in {ref} work?", _as_answer(how)))

    templates = {
        "factual": ["What does {ref} report about {kp}?", "According to {ref}, what is found regarding {kp}?"],
        "methodology": ["How does {ref} approach {kp}?", "What technique does {ref} describe regarding {kp}?"],
        "conceptual": ["Why does {kp} matter in {ref}?", "What idea about {kp} does {ref} put forward?"],
    }
    for i, s in enumerate(sents):
        kp = keyphrase(s)
        if not kp or kp in ref:
            continue
        t = _sentence_type(i, s)
        for j, tpl in enumerate(templates[t]):
            cands[t].append((tpl.format(ref=ref, kp=kp), _as_answer(s)))
        other = "factual" if t != "factual" else "conceptual"
        cands[other].append((templates[other][i % 2].format(ref=ref, kp=kp), _as_answer(s)))

    low = paper["abstract"].lower()
    start = int(hashlib.sha256(paper["id"].encode()).hexdigest(), 16)
    for k in range(len(_UNANSWERABLE)):
        q, missing, given = _UNANSWERABLE[(start + k) % len(_UNANSWERABLE)]
        if not any(g in low for g in given):
            answer = (f"{owner[:1].upper()}{owner[1:]} does not state {missing}. It gives no information on this, "
                      f"so it cannot be answered from the {src}.")
            cands["unanswerable"].append((q.format(ref=ref), answer))
    cands["false_premise"] = _false_premises(ref, sents, src)

    chosen: list[dict] = []

    def take(t: str, limit: int, reuse: int) -> None:
        """Add candidates of type t up to `limit`, skipping near-duplicate questions and over-used answers."""
        for cand in list(cands[t]):
            if sum(1 for p in chosen if p["type"] == t) >= limit or (
                    t in ANSWERABLE and sum(1 for p in chosen if p["type"] in ANSWERABLE) >= want):
                return
            q, a = cand
            if sum(1 for p in chosen if p["answer"] == a) >= reuse:
                continue
            cands[t].remove(cand)
            if within_paper_duplicate(q, [p["question"] for p in chosen], title, dedup_threshold) is None:
                chosen.append({"type": t, "question": q, "answer": a})

    # Types take turns so that none uses up the sentences; each sentence answers at most two questions
    # (three if there is no other way); a type with too few candidates lends its quota to the others.
    want = sum(quotas.get(t, 0) for t in ANSWERABLE)
    for reuse in (2, 3):
        for turn in range(1, max(quotas.values(), default=0) + 1):
            for t in TYPES:
                take(t, min(turn, quotas.get(t, 0)), reuse)
        for t in ANSWERABLE * 3:
            have = sum(1 for p in chosen if p["type"] in ANSWERABLE)
            if have >= want:
                break
            take(t, sum(1 for p in chosen if p["type"] == t) + 1, reuse)
    order = {t: i for i, t in enumerate(TYPES)}
    chosen.sort(key=lambda p: order[p["type"]])
    return chosen



def _as_follow_up(question: str, ref: str, earlier_answer: str) -> str:
    """A standalone question rewritten as a follow-up: the paper is "this paper" now, and the question opens on a
    key phrase of the answer just given, so the turn only reads right after it."""
    q = question.replace(ref, "this paper")
    kp = keyphrase((split_sentences(earlier_answer) or [earlier_answer])[0])
    lead = f"Following up on {kp}:" if kp else "A follow-up:"
    return f"{lead} {q[:1].lower()}{q[1:]}"


def offline_conversations(paper: dict, quotas: dict[str, int], turns: int, dedup_threshold: float = 0.8
                          ) -> list[list[dict]]:
    """offline_pairs dealt into conversations of `turns` turns: conversation c takes pairs c, c + n, c + 2n ...
    (pairs come sorted by type, so edge cases fall on later turns as follow-ups, where a user most often asks
    for what the text does not give). Later turns are rewritten as follow-ups of the answer before them."""
    pairs = offline_pairs(paper, quotas, dedup_threshold)
    if turns == 1:
        return [[p] for p in pairs]
    ref = _paper_ref(paper, split_sentences(paper["abstract"]) or [paper["abstract"]])
    n = max(1, len(pairs) // turns)
    convs = [pairs[c::n][:turns] for c in range(n)]
    out = []
    for conv in convs:
        turned = [dict(conv[0])]
        for pair in conv[1:]:
            turned.append({**pair, "question": _as_follow_up(pair["question"], ref, turned[-1]["answer"])})
        out.append(turned)
    return out
