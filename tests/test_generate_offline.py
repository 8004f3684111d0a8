"""generate_qa.py: the offline backend, curation filters, near-duplicate removal and the split by paper."""
import json
import random
from collections import Counter
from pathlib import Path

import pytest

import common
import generate_qa
from paperqa_tune.qa.curation import CurationRules, check_pair, curate, split_papers
from paperqa_tune.qa import offline_qa, prompts
from paperqa_tune.scoring import is_refusal
from paperqa_tune.qa.textsim import cross_group_near_duplicates, jaccard, question_tokens

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def load(path):
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines()]


def run_offline(tmp_path, *args, inputs=(DATA / "abstracts.jsonl",)):
    out = tmp_path / "out"
    rc = generate_qa.main(["--backend", "offline", "--input", *map(str, inputs), "--out", str(out / "train.jsonl"),
                           "--eval_out", str(out / "eval.jsonl"), *args])
    return rc, out


def assert_split_is_clean(train, evals, threshold=0.8):
    """Unseen questions come from papers with no training record; knowledge questions from papers with some; no
    evaluation question is the same as, or a near-duplicate of, a training question (title words left out, as
    the curation compares a paper's own questions; the across-papers check compares the whole question)."""
    train_papers = {r["meta"]["paper_id"] for r in train}
    unseen = [e for e in evals if e["set"] == "unseen"]
    knowledge = [e for e in evals if e["set"] == "knowledge"]
    assert len(unseen) + len(knowledge) == len(evals)
    assert not train_papers & {e["paper_id"] for e in unseen}
    assert {e["paper_id"] for e in knowledge} <= train_papers
    train_q = [(r["meta"]["paper_id"], r["meta"]["title"], r["messages"][1]["content"]) for r in train]
    exact = {" ".join(q.lower().split()) for _, _, q in train_q}
    for e in evals:
        assert " ".join(e["question"].lower().split()) not in exact, e["question"]
        for pid, title, q in train_q:
            drop = question_tokens(title) if pid == e["paper_id"] else frozenset()
            assert jaccard(question_tokens(e["question"]) - drop, question_tokens(q) - drop) < threshold, \
                (e["question"], q)


def test_offline_backend_records_follow_the_contract(tmp_path):
    rc, out = run_offline(tmp_path, "--eval_papers", "2")
    assert rc == 0
    train, evals = load(out / "train.jsonl"), load(out / "eval.jsonl")
    assert len(train) + len(evals) >= 8 * 10
    for r in train:
        assert common.record_messages(r) == r["messages"]
        assert r["text"] == common.render_zephyr(r["messages"])
        assert r["messages"][0] == {"role": "system", "content": common.DEFAULT_SYSTEM_PROMPT}
        assert r["meta"]["backend"] == "offline" and r["meta"]["model"] == offline_qa.OFFLINE_MODEL
        assert r["meta"]["type"] in prompts.TYPES
    assert set(Counter(r["meta"]["type"] for r in train)) == set(prompts.TYPES)
    for e in evals:
        assert set(e) == {"id", "question", "reference", "type", "paper_id", "context", "system", "set"}
        assert e["system"] == common.DEFAULT_SYSTEM_PROMPT  # evaluation prompts as training did
    unseen = [e for e in evals if e["set"] == "unseen"]
    assert len({e["paper_id"] for e in unseen}) == 2 and len({e["type"] for e in unseen}) >= 4
    assert len({e["id"] for e in evals}) == len(evals)
    assert_split_is_clean(train, evals)

    man = json.loads((out / "train.manifest.json").read_text())
    assert man["backend"] == "offline" and len(man["prompt_sha256"]) == 64
    assert man["counts"]["train"] == len(train) and man["counts"]["eval"] == len(evals)
    assert sum(man["counts"]["train_by_type"].values()) == len(train)
    assert man["counts"]["generated"] - man["counts"]["kept"] == sum(man["counts"]["filters"].values())
    assert man["estimated_cost_usd"]["this_run"] == 0
    assert not (out / ".cache").exists()  # nothing to cache without an LLM


@pytest.mark.numerics
def test_offline_is_deterministic_and_system_prompt_configurable(tmp_path):
    _, a = run_offline(tmp_path / "a")
    _, b = run_offline(tmp_path / "b")
    assert (a / "train.jsonl").read_bytes() == (b / "train.jsonl").read_bytes()
    assert (a / "eval.jsonl").read_bytes() == (b / "eval.jsonl").read_bytes()
    _, c = run_offline(tmp_path / "c", "--system_prompt", "Be brief.", "--eval_papers", "0.25", "--seed", "3")
    train = load(c / "train.jsonl")
    assert {r["messages"][0]["content"] for r in train} == {"Be brief."}
    assert len({e["paper_id"] for e in load(c / "eval.jsonl") if e["set"] == "unseen"}) == 2  # 25% of 8 papers


def test_offline_pairs_are_grounded_and_edge_cases_behave():
    papers = generate_qa.read_abstract_file(DATA / "abstracts.jsonl")
    quotas = prompts.type_quotas(12, 0.2)
    rules = CurationRules()  # generate_qa.py's flag defaults
    for paper in papers:
        pairs = offline_qa.offline_pairs(paper, quotas)
        assert len(pairs) == 12, paper["id"]
        got = Counter(p["type"] for p in pairs)
        assert all(got[t] == quotas[t] for t in prompts.EDGE_CASES)
        assert all(got[t] >= 1 for t in prompts.ANSWERABLE)  # a short type lends its quota to the others
        for p in pairs:
            assert check_pair(p, paper["abstract"], rules) is None, p
            assert paper["title"] in p["question"]
        assert max(Counter(p["answer"] for p in pairs).values()) <= 2  # a sentence answers at most two questions


@pytest.mark.parametrize("n,ratio", [(12, 0.2), (10, 0.2), (5, 0.0), (3, 1.0), (8, 0.5)])
def test_type_quotas(n, ratio):
    q = prompts.type_quotas(n, ratio)
    assert sum(q.values()) == n
    edge = q["unanswerable"] + q["false_premise"]
    assert abs(edge - n * ratio) <= 1 and (ratio > 0 or edge == 0)


ABSTRACT = ("QLoRA finetunes a 65B parameter model on a single 48GB GPU. It backpropagates through a frozen 4-bit "
            "quantized model into low-rank adapters.")


@pytest.mark.parametrize("pair,reason", [
    ({"type": "factual", "question": "How large a model does QLoRA finetune?",
      "answer": "A 65B parameter model on a single 48GB GPU."}, None),
    ({"type": "factual", "question": "What GPU does QLoRA need?",
      "answer": "An 80GB GPU is needed."}, "ungrounded_number"),
    ({"type": "conceptual", "question": "Why does QLoRA matter for biology?",
      "answer": "It revolutionises protein folding pipelines and drug discovery workflows worldwide."}, "ungrounded"),
    ({"type": "unanswerable", "question": "What learning rate does QLoRA use?",
      "answer": "It uses a learning rate that works well."}, "no_refusal"),
    ({"type": "unanswerable", "question": "What learning rate does QLoRA use?",
      "answer": "The abstract does not state the learning rate."}, None),
    ({"type": "false_premise", "question": "Why does QLoRA need eight GPUs for the 65B model?",
      "answer": "It uses eight GPUs for the 65B model."}, "no_correction"),
    ({"type": "false_premise", "question": "Why does QLoRA need 8 GPUs for the 65B model?",
      "answer": "That premise is wrong: it needs a single 48GB GPU, not 8."}, None),
    ({"type": "factual", "question": "Q?", "answer": "A 65B parameter model on a single 48GB GPU."}, "length"),
    ({"type": "factual", "question": "What went wrong with the request?",
      "answer": "Error: rate limit reached for requests."}, "error_text"),
])
def test_check_pair_filters(pair, reason):
    rules = CurationRules()  # generate_qa.py's flag defaults
    got = check_pair(pair, ABSTRACT, rules)
    assert (got.split(":")[0] if got else None) == reason, got


def test_prefix_filter_join_matches_brute_force():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    sets = [frozenset(rng.sample(vocab, rng.randint(3, 9))) for _ in range(300)]
    sets += [s | {"extra"} for s in sets[:40]]  # plant near-duplicates
    groups = [i % 7 for i in range(len(sets))]
    for t in (0.5, 0.8, 1.0):
        fast = cross_group_near_duplicates(sets, groups, t)
        kept, slow = [], {}
        for i, s in enumerate(sets):
            hit = next((j for j in kept if groups[j] != groups[i] and jaccard(s, sets[j]) >= t), None)
            if hit is None:
                kept.append(i)
            else:
                slow[i] = hit
        assert set(fast) == set(slow)


def test_duplicates_removed_within_and_across_papers():
    papers = {"p1": {"abstract": ABSTRACT, "title": "QLoRA"}, "p2": {"abstract": ABSTRACT, "title": "Other"}}
    ans = "A 65B parameter model on a single 48GB GPU."
    pairs = [
        {"paper_id": "p1", "type": "factual", "question": "How large a model does QLoRA finetune on one GPU?", "answer": ans},
        {"paper_id": "p1", "type": "factual", "question": "How large a model does QLoRA finetune on one GPU?", "answer": ans},
        {"paper_id": "p1", "type": "factual", "question": "How large a model does QLoRA finetune on a GPU?", "answer": ans},
        {"paper_id": "p2", "type": "factual", "question": "how large a model does QLoRA finetune on one GPU", "answer": ans},
        {"paper_id": "p2", "type": "factual", "question": "How large a model does QLoRA finetune on one single GPU?", "answer": ans},
        {"paper_id": "p2", "type": "factual", "question": "Which GPU does QLoRA fit a 65B model on?", "answer": ans},
    ]
    counts, rejects = Counter(), []
    units = {pid: {**p, "id": pid, "unit": pid, "section": "abstract"} for pid, p in papers.items()}
    convs = [{"paper_id": p["paper_id"], "unit": p["paper_id"], "turns": [p]} for p in pairs]
    kept = curate(convs, units, CurationRules(), counts, rejects)
    assert [c["turns"][0]["question"] for c in kept] == [pairs[0]["question"], pairs[5]["question"]]
    assert counts == {"duplicate": 2, "near_duplicate": 2}
    assert all(r["stage"] == "curate" for r in rejects)


def test_split_holds_out_whole_papers():
    ids = [f"p{i}" for i in range(10)]
    assert len(split_papers(ids, 3, 0)) == 3
    assert len(split_papers(ids, 0.2, 0)) == 2
    assert split_papers(ids, 3, 1) == split_papers(ids, 3, 1)
    assert split_papers(["only"], 3, 0) == set()
    assert len(split_papers(ids[:2], 3, 0)) == 1
    assert split_papers(ids, 0, 0) == set()


SAMPLE = ROOT / "data" / "sample_abstracts.jsonl"


@pytest.mark.skipif(not SAMPLE.exists(), reason="data/sample_abstracts.jsonl not written yet")
@pytest.mark.parametrize("seed", [0, 1])
def test_defaults_on_sample_abstracts_give_enough_questions_per_set(tmp_path, seed):
    """The README's offline demo, with default flags: >= 300 training pairs whose edge share is what
    --edge_case_ratio asks for, and in EACH evaluation set >= 20 unanswerable, >= 20 false-premise and >= 40
    answerable questions (what a rate needs before its interval can tell base and fine-tuned apart)."""
    rc, out = run_offline(tmp_path, "--seed", str(seed), inputs=(SAMPLE,))
    assert rc == 0
    train, evals = load(out / "train.jsonl"), load(out / "eval.jsonl")
    assert len(train) >= 300
    edge = sum(r["meta"]["type"] in prompts.EDGE_CASES for r in train) / len(train)
    quota = prompts.type_quotas(12, 0.2)  # --pairs_per_abstract 12 at --edge_case_ratio 0.2, per paper
    assert edge == pytest.approx(sum(quota[t] for t in prompts.EDGE_CASES) / 12, abs=0.02)
    for name in ("unseen", "knowledge"):
        got = Counter(e["type"] for e in evals if e["set"] == name)
        answerable = sum(got[t] for t in prompts.ANSWERABLE)
        assert got["unanswerable"] >= 20 and got["false_premise"] >= 20 and answerable >= 40, (name, got)
    assert len({e["paper_id"] for e in evals if e["set"] == "unseen"}) == 8
    assert_split_is_clean(train, evals)
    man = json.loads((out / "train.manifest.json").read_text())
    assert man["counts"]["eval_by_set_type"] == {k: dict(Counter(e["type"] for e in evals if e["set"] == k))
                                                 for k in ("unseen", "knowledge")}


@pytest.mark.parametrize("answer,refuses", [
    ("The abstract does not state the learning rate.", True),
    ("The abstract doesn't specify which optimizer was used.", True),
    ("No information about the hardware is given.", True),
    ("This cannot be determined from the abstract.", True),
    ("The model does not use dropout and trains for a week.", False),
    ("It uses the standard learning rate.", False),
])
def test_refusal_detection(answer, refuses):
    assert is_refusal(answer) == refuses


def test_error_text_filter_spares_papers_about_rate_limits():
    rules = CurationRules()  # generate_qa.py's flag defaults
    abstract = "We study API rate limiting and key rotation for web services under heavy load."
    ok = {"type": "factual", "question": "What does the paper study about web services?",
          "answer": "API rate limiting and key rotation for web services under heavy load."}
    assert check_pair(ok, abstract, rules) is None
    bad = dict(ok, answer="I'm sorry, I cannot help with API rate limiting for web services.")
    assert check_pair(bad, abstract, rules).startswith("error_text")


def test_eval_questions_go_beside_out_by_default(tmp_path, monkeypatch):
    """--out DIR/x.jsonl puts the held-out questions in DIR, never into data/ behind the user's back."""
    monkeypatch.chdir(tmp_path)
    for name, expected in (("synthetic_qa.jsonl", "eval_questions.jsonl"), ("x.jsonl", "x_eval_questions.jsonl")):
        out = tmp_path / "runs" / name
        assert generate_qa.main(["--backend", "offline", "--input", str(DATA / "abstracts.jsonl"),
                                 "--out", str(out)]) == 0
        assert (out.parent / expected).is_file() and common.eval_questions_path(out) == out.parent / expected
    assert not (tmp_path / "data").exists()


def test_both_sets_on_small_input_and_manifest_counts(tmp_path):
    """tests/data: 8 papers, 2 held out. Knowledge questions are about training papers, never a training
    question; the manifest counts each set by type; --knowledge_questions 0 leaves only the unseen set and puts
    the training papers' edge cases as they are (the same quotas per paper)."""
    rc, out = run_offline(tmp_path / "a", "--eval_papers", "2", "--knowledge_questions", "20")
    assert rc == 0
    train, evals = load(out / "train.jsonl"), load(out / "eval.jsonl")
    by_set = Counter(e["set"] for e in evals)
    assert by_set["unseen"] > 0 and 10 <= by_set["knowledge"] <= 20
    assert_split_is_clean(train, evals)
    for e in evals:
        assert e["context"] and e["reference"] and e["type"] in prompts.TYPES
    man = json.loads((out / "train.manifest.json").read_text())
    assert man["counts"]["eval_by_set"] == dict(by_set)
    for k in ("unseen", "knowledge"):
        assert man["counts"]["eval_by_set_type"][k] == dict(Counter(e["type"] for e in evals if e["set"] == k))
    assert sum(man["quotas"]["knowledge_asked"].values()) == 20
    # every training paper keeps its training quota per type (the knowledge pairs are on top)
    quota = man["quotas"]["train"]
    for pid in {r["meta"]["paper_id"] for r in train}:
        got = Counter(r["meta"]["type"] for r in train if r["meta"]["paper_id"] == pid)
        assert all(got[t] == quota[t] for t in prompts.EDGE_CASES), (pid, got)

    rc, none = run_offline(tmp_path / "b", "--eval_papers", "2", "--knowledge_questions", "0")
    assert rc == 0
    evals0 = load(none / "eval.jsonl")
    assert {e["set"] for e in evals0} == {"unseen"}
    assert [e["question"] for e in evals0] == [e["question"] for e in evals if e["set"] == "unseen"]
    edge = lambda recs: Counter(r["meta"]["type"] for r in recs if r["meta"]["type"] in prompts.EDGE_CASES)
    assert edge(load(none / "train.jsonl")) == edge(train)  # the answerable ones may differ: a type lends its quota


def test_knowledge_near_duplicates_of_training_are_dropped():
    """A held-back pair whose question repeats a training question of its paper (all but a word) is a reject,
    not a knowledge question; a different question about the same paper stays."""
    from paperqa_tune.qa.curation import drop_near_training

    units = {"p1": {"title": "QLoRA", "abstract": ABSTRACT}}
    ans = "A 65B parameter model on a single 48GB GPU."
    conv = lambda q, s=None: {"paper_id": "p1", "unit": "p1", "turns": [{"type": "factual", "question": q,
                                                                         "answer": ans}], **({"set": s} if s else {})}
    convs = [conv("How large a model does QLoRA finetune on one GPU?"),
             conv("How large a model does QLoRA finetune on one single GPU?", "knowledge"),
             conv("How LARGE a model does QLoRA finetune on one GPU", "knowledge"),
             conv("Which kind of adapters does QLoRA backpropagate into?", "knowledge")]
    counts, rejects = Counter(), []
    kept = drop_near_training(convs, units, 0.8, counts, rejects)
    assert [c["turns"][0]["question"] for c in kept] == [convs[0]["turns"][0]["question"],
                                                         convs[3]["turns"][0]["question"]]
    assert counts == {"near_training": 2} and all(r["stage"] == "knowledge" for r in rejects)
