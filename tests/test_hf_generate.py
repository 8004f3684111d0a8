"""generate_qa.py --backend hf on a tiny random model: the grammar writes exactly the pairs and types each request
asked for (prompts.request_schema), a batch's decoding shows progress as it goes, and the manifest says how many
pairs were kept and why the others were dropped."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import common  # noqa: E402
import generate_qa  # noqa: E402
from paperqa_tune.generation import Decoding, chat_prompt_ids, generate_batch  # noqa: E402
from paperqa_tune.qa.prompts import (DIALOGUES_SCHEMA, PAIRS_SCHEMA, TYPES, generation_messages,  # noqa: E402
                                     request_schema, type_order, type_quotas)

DATA = Path(__file__).parent / "data"
ABSTRACTS = ("We fine-tune a 65B model on one 48GB GPU with 4-bit NF4 weights and low-rank adapters.\n\n"
             "Low-rank adapters train a small number of parameters and keep the base weights frozen.\n\n"
             "A sparse mixture of eight experts routes each token to two of them and matches a dense 70B model.\n")


def types_of(content: str, turns: int) -> list[str]:
    obj = json.loads(content)
    if turns == 1:
        return [p["type"] for p in obj["pairs"]]
    return [t["type"] for c in obj["conversations"] for t in c["turns"]]


def test_type_order_deals_the_quota_round_robin():
    assert type_order(type_quotas(12, 0.2)) == ["factual", "conceptual", "methodology", "unanswerable",
                                                "false_premise", "factual", "conceptual", "methodology",
                                                "factual", "conceptual", "methodology", "factual"]
    assert type_order({"factual": 1, "unanswerable": 3}) == ["factual", "unanswerable", "unanswerable",
                                                             "unanswerable"]
    for n, ratio in ((5, 0.4), (7, 0.0), (3, 1.0), (1, 0.2)):
        quotas = type_quotas(n, ratio)
        assert Counter(type_order(quotas)) == Counter({t: k for t, k in quotas.items() if k})


def test_request_schema_fixes_the_count_and_each_type():
    from paperqa_tune.qa.grammar import bounded

    quotas = type_quotas(5, 0.4)
    pairs = bounded(request_schema(quotas), 5, 1, {"question": 50, "answer": 90})["properties"]["pairs"]
    assert (pairs["minItems"], pairs["maxItems"], pairs["items"]) == (5, 5, False)
    assert [p["properties"]["type"]["enum"] for p in pairs["prefixItems"]] == [[t] for t in type_order(quotas)]
    assert all(p["properties"]["answer"]["maxLength"] == 90 for p in pairs["prefixItems"])
    convs = request_schema(type_quotas(6, 0.4), turns=3)["properties"]["conversations"]
    assert len(convs["prefixItems"]) == 2 and all(len(c["properties"]["turns"]["prefixItems"]) == 3
                                                  for c in convs["prefixItems"])
    assert "maxItems" not in PAIRS_SCHEMA["properties"]["pairs"]  # the shared schemas are left as they were
    assert "prefixItems" not in DIALOGUES_SCHEMA["properties"]["conversations"]


def test_each_row_of_a_batch_gets_its_own_count_and_types(tiny_model, one_torch_thread):
    """Three requests with three different quotas decoded in one batch: every reply has exactly its own."""
    from transformers import AutoModelForCausalLM

    from paperqa_tune.loading import load_tokenizer
    from paperqa_tune.qa.grammar import JsonGrammar, bounded

    tok = load_tokenizer(tiny_model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    grammar = JsonGrammar(tok, model.get_output_embeddings().weight.shape[0])
    quotas = [type_quotas(2, 0.0), type_quotas(4, 0.5), type_quotas(3, 1.0)]
    paper = {"id": "p1", "title": "Adapters", "abstract": ABSTRACTS.split("\n\n")[0], "section": "abstract"}
    prompts = [chat_prompt_ids(tok, generation_messages(paper, q)) for q in quotas]
    schemas = [bounded(request_schema(q), 1, 1, {"question": 20, "answer": 20}) for q in quotas]
    out = generate_batch(model, tok, prompts, Decoding(max_new_tokens=400), constraint=grammar.batch(schemas, 3, "cpu"))
    for q, (text, _, ids) in zip(quotas, out):
        assert ids[-1] == tok.eos_token_id, text
        assert types_of(text, 1) == type_order(q), text


def run_hf(tmp_path, *args, turns=1):
    abstracts = tmp_path / "abstracts.txt"
    abstracts.write_text(ABSTRACTS, encoding="utf-8")
    out = tmp_path / "out"
    rc = generate_qa.main(["--backend", "hf", "--model", str(Path(args[0])), "--input", str(abstracts),
                           "--pairs_per_abstract", "5", "--edge_case_ratio", "0.4", "--turns", str(turns),
                           "--max_tokens", "700", "--max_question_chars", "30", "--max_answer_chars", "30",
                           "--batch_size", "2", "--eval_papers", "0", "--knowledge_questions", "0",
                           "--out", str(out / "train.jsonl"),
                           "--eval_out", str(out / "eval.jsonl"), *args[1:]])
    return rc, out


@pytest.mark.parametrize("turns", [1, 2])
def test_hf_replies_hold_exactly_the_requested_pairs_and_types(tmp_path, tiny_model, one_torch_thread, capsys, turns):
    """The random model has no preference worth keeping: without the per-request schema it writes any number of
    items of any types. Every reply, first or repair, holds the quota, type by type, in the dealt order; and a
    batch shows its progress on stderr (not a terminal here: plain lines) from the first batch on."""
    rc, out = run_hf(tmp_path, tiny_model, turns=turns)
    assert rc in (0, 1)  # random text rarely survives curation; the replies are what is checked
    quotas = type_quotas(generate_qa.conversations_per_source(5, turns) * turns, 0.4)
    replies = common.read_jsonl_tolerant(out / ".cache" / "train.jsonl")
    assert len(replies) >= 3
    for r in replies:
        assert r["finish_reason"] == "stop", r["content"]
        got = types_of(r["content"], turns)
        assert Counter(got) == Counter({t: k for t, k in quotas.items() if k}) and got == type_order(quotas)
    err = capsys.readouterr().err
    assert "hf batch 1/2: decoding 2 request(s)" in err
    assert "hf batch 2/2:" in err and "3/3 requests done" in err and "tok/s" in err
    first_done = err.index("hf batch 1/2:")
    assert err.index("1/2:", first_done) < err.index("hf batch 2/2")  # batch 1's line before batch 2 starts


def test_a_live_bar_moves_while_the_first_batch_decodes(tiny_model, one_torch_thread):
    """With a tqdm bar (a terminal), the round's bar shows the batch's tokens and tokens/s from its first token,
    before any request of the batch is done."""
    from transformers import AutoModelForCausalLM

    from paperqa_tune.llm import Progress, Stats, _DecodeMeter
    from paperqa_tune.loading import load_tokenizer
    from paperqa_tune.qa.grammar import JsonGrammar, bounded

    tok = load_tokenizer(tiny_model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    screen = io.StringIO()
    progress = Progress(Stats(), file=screen)
    progress.start(3, "generate")
    meter = _DecodeMeter(progress, tok.eos_token_id, batches=1, total=3, every_s=30.0)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("a", "bb", "ccc")]
    meter.start(prompts, 60)
    schema = bounded(request_schema(type_quotas(2, 0.0)), 1, 1, {"question": 20, "answer": 20})
    generate_batch(model, tok, prompts, Decoding(max_new_tokens=60), streamer=meter,
                   constraint=JsonGrammar(tok, model.get_output_embeddings().weight.shape[0]).batch(schema, 3, "cpu"))
    shown = screen.getvalue()
    progress.close()
    assert "0/3" in shown and "batch=1/1" in shown and "batch_tokens=3," in shown  # the first step, on screen
    assert "tok/s=" in shown and meter.tokens > 3


def test_manifest_says_the_kept_rate_and_why_pairs_were_dropped(tmp_path):
    out = tmp_path / "out"
    assert generate_qa.main(["--backend", "offline", "--input", str(DATA / "abstracts.jsonl"), "--eval_papers", "0",
                             "--max_answer_chars", "160", "--out", str(out / "train.jsonl"),
                             "--eval_out", str(out / "eval.jsonl")]) == 0
    counts = json.loads((out / "train.manifest.json").read_text())["counts"]
    rejects = [json.loads(line) for line in (out / "rejects_train.jsonl").read_text().splitlines()]
    dropped = [r for r in rejects if r["stage"] == "curate"]
    assert dropped and counts["generated"] > counts["kept"] > 0
    assert counts["kept_rate"] == round(counts["kept"] / counts["generated"], 4)
    assert sum(counts["dropped_by_type"].values()) == len(dropped) == counts["generated"] - counts["kept"]
    for key, n in counts["dropped_by_type"].items():
        t, reason = key.split(": ")
        assert t in TYPES and n == sum(r["type"] == t and r["reason"].startswith(reason) for r in dropped)
