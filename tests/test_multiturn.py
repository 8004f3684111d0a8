"""generate_qa.py --turns N: conversations whose follow-ups build on earlier answers, from the offline backend and
from an LLM; curated, split and written per conversation; trained with every answer in the loss; evaluated
turn by turn with the earlier turns as history."""
import json
from pathlib import Path

import pytest

import common
import eval_compare
import generate_qa
from fake_openai import FakeOpenAI, Reply
from generate_fakes import request_paper
from paperqa_tune.train import chats as C
from paperqa_tune.qa import prompts
from paperqa_tune.generation import prompt_ids
from paperqa_tune.loading import load_tokenizer
from paperqa_tune.qa.offline_qa import offline_conversations

DATA = Path(__file__).parent / "data"


def load(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def exchanges(record):
    msgs = record["messages"][1:] if record["messages"][0]["role"] == "system" else record["messages"]
    return [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs), 2)]


def test_offline_conversations_follow_up_on_the_earlier_answer():
    paper = load(DATA / "abstracts.jsonl")[0]
    convs = offline_conversations(paper, prompts.type_quotas(12, 0.2), 3)
    assert len(convs) == 4 and all(len(c) == 3 for c in convs)
    turn_types = [t["type"] for c in convs for t in c]
    assert sorted(turn_types) == sorted(t for t, k in prompts.type_quotas(12, 0.2).items() for _ in range(k))
    assert any(t["type"] in prompts.EDGE_CASES for c in convs for t in c[1:])  # an edge case as a follow-up
    for c in convs:
        assert "this paper" not in c[0]["question"]  # the opening question stands on its own
        for turn in c[1:]:
            assert turn["question"].startswith(("Following up on", "A follow-up:"))
            assert paper["title"] not in turn["question"]


def test_offline_turns_write_conversations_and_history_questions(tmp_path):
    out = tmp_path / "out"
    rc = generate_qa.main(["--backend", "offline", "--input", str(DATA / "abstracts.jsonl"), "--turns", "3",
                           "--out", str(out / "train.jsonl"), "--eval_out", str(out / "eval.jsonl"),
                           "--eval_papers", "2"])
    assert rc == 0
    train, evals = load(out / "train.jsonl"), load(out / "eval.jsonl")
    assert train and evals
    for r in train:
        assert r["text"] == common.render_zephyr(r["messages"])  # the Zephyr template, every turn closed by </s>
        assert r["text"].count("<|assistant|>\n") == len(exchanges(r)) == len(r["meta"]["turn_types"])
        assert r["meta"]["type"] == r["meta"]["turn_types"][0]
        assert common.record_messages(r) == r["messages"]
    assert {len(exchanges(r)) for r in train} == {3}
    # every turn of a held-out conversation is a question; a follow-up carries the turns before it
    by_conv = {}
    for e in evals:
        conv, turn = e["id"].rsplit("-t", 1)
        by_conv.setdefault(conv, []).append((int(turn), e))
    unseen = {e["paper_id"] for e in evals if e["set"] == "unseen"}  # knowledge questions: training papers'
    assert len(unseen) == 2 and not unseen & {r["meta"]["paper_id"] for r in train}
    for turns in by_conv.values():
        turns.sort(key=lambda x: x[0])
        for k, (n, e) in enumerate(turns):
            assert n == k + 1
            want = [m for _, p in turns[:k] for m in (
                {"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["reference"]})]
            assert e.get("history", []) == want
    man = json.loads((out / "train.manifest.json").read_text())
    assert man["turns"] == 3 and man["counts"]["conversations"] == len(train) + len(by_conv)
    assert man["counts"]["kept"] == sum(len(exchanges(r)) for r in train) + len(evals)
    quality = json.loads((out / "train.quality.json").read_text())
    assert quality["by_turn"] == {"1": len(train) + len(by_conv), "2": len(train) + len(by_conv),
                                  "3": len(train) + len(by_conv)}


def test_training_masks_every_answer_of_a_generated_conversation(tiny_model, tmp_path):
    out = tmp_path / "out"
    assert generate_qa.main(["--backend", "offline", "--input", str(DATA / "abstracts.jsonl"), "--turns", "3",
                             "--out", str(out / "train.jsonl"), "--eval_papers", "1"]) == 0
    tok = load_tokenizer(tiny_model, "right")
    chats = C.load_chats(out / "train.jsonl")
    samples, _ = C.build_samples(tok, chats[:5], 4096, out / "train.jsonl")
    for chat, s in zip(chats, samples):
        answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        runs, cur = [], []
        for t, label in zip(s["input_ids"], s["labels"]):
            if label != -100:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        assert len(runs) == 3  # each answer (and its </s>) trained, nothing between them
        for run, answer in zip(runs, answers):
            assert tok.decode(run).replace(" ", "") == (answer + "</s>").replace(" ", "")


def conversations_reply(req, turns, spoil=None):
    """A generation reply with conversations made by the offline generator from the request's own paper."""
    p = request_paper(req)
    convs = offline_conversations(p, p["quotas"], turns)
    if spoil:
        spoil(convs)
    return json.dumps({"conversations": [{"turns": c} for c in convs]})


def llm_args(out, srv, *extra):
    return ["--input", str(DATA / "abstracts.jsonl"), "--base_url", srv.base_url, "--model", "fake-model",
            "--out", str(out / "train.jsonl"), "--eval_out", str(out / "eval.jsonl"), "--concurrency", "2",
            "--timeout", "20", "--max_tokens", "2000", *extra]


def test_llm_conversations_cut_before_a_failing_turn(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")

    def spoil(convs):
        convs[0][1]["answer"] = "It reports 987654 tokens per second."  # a number the abstract does not give
        convs[1][1] = {"type": "factual", "question": "", "answer": "x"}  # an invalid turn: cut in parsing

    def responder(req, n):
        assert "response_format" not in req or req["response_format"]["json_schema"]["name"] == "qa_conversations"
        return Reply(content=conversations_reply(req, 2, spoil))

    out = tmp_path / "out"
    with FakeOpenAI(responder) as srv:
        assert generate_qa.main(llm_args(out, srv, "--turns", "2", "--eval_papers", "0",
                                         "--knowledge_questions", "0")) == 0
        assert "6 conversations about this paper, each of 2 turns" in srv.requests[0]["messages"][1]["content"]
    train = load(out / "train.jsonl")
    rejects = load(out / "rejects_train.jsonl")
    n_papers = len(load(DATA / "abstracts.jsonl"))
    ungrounded = [r for r in rejects if r["reason"].startswith("ungrounded_number")]
    invalid = [r for r in rejects if r["stage"] == "invalid_pair"]
    assert len(ungrounded) == n_papers and all(r["turn"] == 2 and r["later_turns_dropped"] == 0 for r in ungrounded)
    assert len(invalid) == n_papers and all(r["reason"].startswith("turn 2:") for r in invalid)
    lengths = sorted(len(exchanges(r)) for r in train)
    assert lengths.count(1) == 2 * n_papers and set(lengths) == {1, 2}  # both spoiled conversations kept turn 1
    assert all("987654" not in a for r in train for _, a in exchanges(r))


def test_eval_reads_history_and_prompts_with_it(tiny_model, tmp_path):
    hist = [{"role": "user", "content": "What does it do?"}, {"role": "assistant", "content": "It adapts models."}]
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "How?", "history": hist}) + "\n"
                    + json.dumps({"id": "b", "question": "Why?"}) + "\n")
    qs = eval_compare.read_questions(path)
    assert qs[0]["history"] == hist and qs[1]["history"] == []
    tok = load_tokenizer(tiny_model, "left")
    with_history = tok.decode(prompt_ids(tok, "How?", "sys", hist))
    assert with_history.index("What does it do?") < with_history.index("It adapts models.") < with_history.index(
        "How?")
    assert prompt_ids(tok, "How?", "sys") == prompt_ids(tok, "How?", "sys", [])


@pytest.mark.parametrize("history", ['[{"role": "assistant", "content": "x"}]', '"not a list"', '[{"role": "user"}]'])
def test_eval_bad_history_names_the_line(tmp_path, history):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "Q?"}) + "\n"
                    + '{"id": "b", "question": "Q2?", "history": ' + history + "}\n")
    with pytest.raises(common.InputError, match=r"q\.jsonl:2: 'history'"):
        eval_compare.read_questions(path)


def test_held_out_conversations_become_one_question_per_turn():
    from paperqa_tune.runs import heldout_questions

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    sample = {"messages": msgs, "type": "factual", "turn_types": ["factual", "unanswerable"], "group": "p1", "line": 3}
    q1, q2 = heldout_questions([sample])
    assert (q1["id"], q1["type"], "history" in q1) == ("val-1-t1", "factual", False)
    assert (q2["id"], q2["type"], q2["reference"]) == ("val-1-t2", "unanswerable", "A2")
    assert q2["history"] == msgs[1:3] and q2["system"] == "S"
