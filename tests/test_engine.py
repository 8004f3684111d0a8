"""The shared decoding loop (paperqa_tune/engine.py) against transformers' own model.generate, and the
JSON-schema grammar (paperqa_tune/qa/grammar.py) on the hf backend of generate_qa.py."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import common  # noqa: E402
import generate_qa  # noqa: E402
from paperqa_tune import engine  # noqa: E402
from paperqa_tune.generation import Decoding, generate_batch, prompt_ids  # noqa: E402
from paperqa_tune.qa.prompts import DIALOGUES_SCHEMA, PAIRS_SCHEMA  # noqa: E402

pytestmark = pytest.mark.numerics  # our decoding loop against generate: token for token

QUESTIONS = ["What does the paper propose?", "How is memory reduced in four-bit training with low-rank adapters, "
             "and why does it matter for a single GPU?", "Why?"]


@pytest.fixture(scope="module")
def model_and_tok(tiny_model, one_torch_thread):
    from paperqa_tune.loading import load_tokenizer
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tok


def prompts(tok):
    return [prompt_ids(tok, q, common.DEFAULT_SYSTEM_PROMPT) for q in QUESTIONS]  # three widths: left padding


def hf(dec: Decoding) -> Decoding:
    return Decoding(**{**dec.__dict__, "cache": "dynamic"})  # the same settings through model.generate


@pytest.mark.parametrize("dec", [Decoding(max_new_tokens=24), Decoding(max_new_tokens=24, min_new_tokens=24),
                                 Decoding(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.8)],
                         ids=["greedy", "min_new_tokens", "sampled"])
def test_loop_writes_what_generate_writes(model_and_tok, dec):
    model, tok = model_and_tok
    ours = generate_batch(model, tok, prompts(tok), dec, seed=7)
    assert ours == generate_batch(model, tok, prompts(tok), hf(dec), seed=7)
    assert ours == generate_batch(model, tok, prompts(tok), dec, seed=7)  # and again: nothing leaks between calls
    assert all(n == 24 for _, n, _ in ours)


def test_rows_stop_at_eos_and_the_rest_go_on(model_and_tok):
    """Make EOS the model's favourite where row 0 would write its 5th token: that row stops there, the others
    run on, exactly as generate does it (finished rows are padded, never decoded into the text)."""
    model, tok = model_and_tok
    dec = Decoding(max_new_tokens=20)
    first = generate_batch(model, tok, prompts(tok), dec)
    head = model.lm_head.weight
    saved = head[tok.eos_token_id].clone()
    try:
        with torch.no_grad():
            head[tok.eos_token_id] = head[first[0][2][4]] * 1.5
        ours = generate_batch(model, tok, prompts(tok), dec)
        theirs = generate_batch(model, tok, prompts(tok), hf(dec))
    finally:
        with torch.no_grad():
            head[tok.eos_token_id] = saved
    assert ours == theirs
    lengths = [n for _, n, _ in ours]
    assert lengths[0] == 5 and ours[0][2][-1] == tok.eos_token_id and max(lengths) > 5


@pytest.mark.parametrize("padded", [False, True])
def test_penalty_is_transformers_repetition_penalty(padded):
    """The same logits through transformers' RepetitionPenaltyLogitsProcessor and ours: the same bits (the same
    element-wise ops in the same dtype), left padding skipped as generate skips it."""
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 9), generator=g)
    pads = torch.tensor([0, 3, 0, 8]) if padded else torch.zeros(4, dtype=torch.long)
    real = torch.arange(9)[None, :] >= pads[:, None]
    # row by row on the row's real tokens: what generate does with left padding, in every transformers 5.x (the
    # per-row prompt_ignore_length tensor only exists in recent releases)
    theirs = torch.cat([RepetitionPenaltyLogitsProcessor(1.3)(ids[i:i + 1, int(pads[i]):], logits[i:i + 1].clone())
                        for i in range(4)])
    ours = engine.penalise_(logits.clone(), engine.seen_tokens(ids, real, 50)[:, :-1], 1.3)
    assert torch.equal(ours, theirs) and not torch.equal(ours, logits)


@pytest.mark.parametrize("dec", [Decoding(max_new_tokens=24, repetition_penalty=1.8),
                                 Decoding(max_new_tokens=24, repetition_penalty=0.7, min_new_tokens=24),
                                 Decoding(max_new_tokens=24, repetition_penalty=1.3, do_sample=True, temperature=0.9,
                                          top_p=0.8)], ids=["greedy", "favoured", "sampled"])
def test_penalised_loop_writes_what_generate_writes(model_and_tok, dec):
    """Our loop with a repetition penalty against model.generate(repetition_penalty=...) on left-padded prompts,
    token for token; and greedily the penalty changes the answers (it is applied at all; a sampled draw from the
    random model's near-flat distribution may not move)."""
    model, tok = model_and_tok
    ours = generate_batch(model, tok, prompts(tok), dec, seed=7)
    assert ours == generate_batch(model, tok, prompts(tok), hf(dec), seed=7)
    if dec.do_sample:
        return
    plain = generate_batch(model, tok, prompts(tok), Decoding(**{**dec.__dict__, "repetition_penalty": 1.0}), seed=7)
    assert [ids for *_, ids in ours] != [ids for *_, ids in plain]
    if dec.repetition_penalty > 1:  # fewer repeated tokens in each answer
        assert sum(len(ids) - len(set(ids)) for *_, ids in ours) < sum(len(ids) - len(set(ids)) for *_, ids in plain)


def test_eager_attention_gets_an_additive_mask(model_and_tok):
    model, tok = model_and_tok
    dec = Decoding(max_new_tokens=12)
    sdpa = generate_batch(model, tok, prompts(tok), dec)
    model.config._attn_implementation = "eager"
    try:
        assert generate_batch(model, tok, prompts(tok), dec) == sdpa
    finally:
        model.config._attn_implementation = "sdpa"


def test_models_the_loop_does_not_know_decode_through_generate(model_and_tok, capsys):
    model, tok = model_and_tok
    assert engine.supports(model, 100) is None
    model.config.sliding_window = 40  # Mistral's window: our full-causal mask would be wrong past it
    try:
        assert "sliding window" in engine.supports(model, 100)
        out = generate_batch(model, tok, prompts(tok), Decoding(max_new_tokens=30))
        assert out == generate_batch(model, tok, prompts(tok), Decoding(max_new_tokens=30, cache="dynamic"))
    finally:
        model.config.sliding_window = None
    assert "decoding through model.generate" in capsys.readouterr().err


def test_supports_names_each_model_it_leaves_to_generate():
    from types import SimpleNamespace as NS

    def model(model_type="mistral", devices=("cpu",), **flags):
        params = [torch.zeros(1, device="meta") if d == "meta" else torch.zeros(1) for d in devices]
        return NS(config=NS(model_type=model_type, sliding_window=None), parameters=lambda: iter(params), **flags)

    assert engine.supports(model(), 64) is None and engine.supports(model("llama"), 64) is None
    assert "gemma2" in engine.supports(model("gemma2"), 64)
    assert "quantized" in engine.supports(model(is_loaded_in_4bit=True), 64)
    assert "2 devices" in engine.supports(model(devices=("cpu", "meta")), 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run by bench/gpu_smoke.sh)")
def test_cuda_graph_replay_writes_what_eager_steps_write(tiny_model):
    from transformers import AutoModelForCausalLM

    from paperqa_tune.loading import load_tokenizer

    tok = load_tokenizer(tiny_model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda().eval()
    for penalty in (1.0, 1.5):  # the penalty is applied to the graph's output logits, outside the captured step
        dec = Decoding(max_new_tokens=32, repetition_penalty=penalty)
        graphed = generate_batch(model, tok, prompts(tok), dec)
        eager = generate_batch(model, tok, prompts(tok), Decoding(**{**dec.__dict__, "cuda_graphs": False}))
        assert graphed == eager == generate_batch(model, tok, prompts(tok), hf(dec))


# --------------------------------------------------------------------------- the grammar
def test_bounded_schema_writes_the_request_shape():
    from paperqa_tune.qa.grammar import bounded

    pairs = bounded(PAIRS_SCHEMA, 6, 1, {"question": 50, "answer": 90})
    arr = pairs["properties"]["pairs"]
    assert (arr["minItems"], arr["maxItems"]) == (1, 6)
    assert arr["items"]["properties"]["question"]["maxLength"] == 50
    assert arr["items"]["properties"]["answer"]["maxLength"] == 90
    assert "maxLength" not in arr["items"]["properties"]["type"]
    assert "maxItems" not in PAIRS_SCHEMA["properties"]["pairs"]  # the shared schema itself is left as it was
    convs = bounded(DIALOGUES_SCHEMA, 2, 3)["properties"]["conversations"]
    turns = convs["items"]["properties"]["turns"]
    assert (convs["maxItems"], turns["minItems"], turns["maxItems"]) == (2, 3, 3)


def valid(obj, schema) -> bool:
    """A small validator for the keywords our schemas use."""
    t = schema.get("type")
    if t == "object":
        props = schema["properties"]
        return isinstance(obj, dict) and set(obj) == set(schema["required"]) and \
            all(valid(obj[k], props[k]) for k in obj)
    if t == "array":
        return isinstance(obj, list) and schema.get("minItems", 0) <= len(obj) <= schema.get("maxItems", 10**9) and \
            all(valid(x, schema["items"]) for x in obj)
    if t == "string":
        return isinstance(obj, str) and len(obj) <= schema.get("maxLength", 10**9) and \
            ("enum" not in schema or obj in schema["enum"])
    return True


@pytest.mark.parametrize("turns", [1, 2])
def test_hf_backend_replies_always_parse_under_the_grammar(tmp_path, tiny_model, one_torch_thread, turns):
    """The tiny random model writes garbage; constrained, every reply is JSON of the bounded schema and ends
    with EOS. Unconstrained (the control), the same model's replies never parse."""
    from paperqa_tune.qa.grammar import bounded

    abstracts = tmp_path / "abstracts.txt"  # one paragraph per abstract
    abstracts.write_text("We fine-tune a 65B model on one 48GB GPU with 4-bit NF4 weights and low-rank adapters.\n\n"
                         "Low-rank adapters train a small number of parameters and keep the base weights frozen.\n",
                         encoding="utf-8")
    replies = {}
    for constrained in (True, False):
        out = tmp_path / f"out-{constrained}"
        generate_qa.main(["--backend", "hf", "--model", str(tiny_model), "--input", str(abstracts),
                          "--pairs_per_abstract", "2", "--turns", str(turns), "--max_tokens", "200",
                          "--max_question_chars", "30", "--max_answer_chars", "40", "--temperature", "0",
                          "--batch_size", "3", "--eval_papers", "0", "--knowledge_questions", "0",
                          "--out", str(out / "train.jsonl"),
                          "--eval_out", str(out / "eval.jsonl")]
                         + ([] if constrained else ["--no-constrained_decoding"]))
        replies[constrained] = common.read_jsonl_tolerant(out / ".cache" / "train.jsonl")
    schema = bounded(PAIRS_SCHEMA if turns == 1 else DIALOGUES_SCHEMA, 2 if turns == 1 else 1, turns,
                     {"question": 30, "answer": 40})
    assert len(replies[True]) >= 2  # a request per abstract (+ repairs: garbage pairs fail generate_qa's checks)
    for r in replies[True]:
        assert r["finish_reason"] == "stop" and valid(json.loads(r["content"]), schema), r["content"]
        assert list(json.loads(r["content"])) == list(schema["properties"])  # keys in the schema's order

    def parses(text):
        try:
            return valid(json.loads(text), schema)
        except ValueError:
            return False
    assert not any(parses(r["content"]) for r in replies[False])


def test_hf_backend_resumed_from_a_partial_cache_equals_the_uninterrupted_run(tmp_path, tiny_model,
                                                                              one_torch_thread):
    """A killed generate_qa run leaves some replies cached; the rerun must write what an uninterrupted run writes.
    Replies are sampled and depend on their batch (padding, shapes): this holds because the batches are fixed by
    the requests' order, whatever was cached, so each missing reply is made in the same batch as before."""
    abstracts = tmp_path / "abstracts.txt"
    abstracts.write_text("\n\n".join(f"Paper {i} fine-tunes a {i + 3}B model with {'low-rank ' * (i % 3)}adapters "
                                      f"and reports {i + 40} points." for i in range(5)) + "\n", encoding="utf-8")

    def run(name: str, cached: list[str] | None = None) -> dict:
        out = tmp_path / name
        if cached is not None:
            (out / ".cache").mkdir(parents=True)
            (out / ".cache" / "train.jsonl").write_text("".join(cached), encoding="utf-8")
        assert generate_qa.main(["--backend", "hf", "--model", str(tiny_model), "--input", str(abstracts),
                                 "--pairs_per_abstract", "2", "--max_tokens", "120", "--max_question_chars", "30",
                                 "--max_answer_chars", "40", "--batch_size", "2", "--eval_papers", "0",
                                 "--out", str(out / "train.jsonl"), "--eval_out", str(out / "eval.jsonl")]) in (0, 1)
        lines = (out / ".cache" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        return {"lines": lines, "replies": {json.loads(l)["key"]: json.loads(l)["content"] for l in lines}}

    full = run("full")
    assert len(full["replies"]) >= 5
    resumed = run("resumed", full["lines"][::2])  # every other reply cached: both batches were cut short
    assert resumed["replies"] == full["replies"]
    for name in ("train.jsonl", "rejects_train.jsonl"):
        a, b = tmp_path / "full" / name, tmp_path / "resumed" / name
        assert a.exists() == b.exists() and (not a.exists() or a.read_bytes() == b.read_bytes()), name


def test_grammar_bars_special_and_control_tokens(model_and_tok):
    """Tokens the JSON grammar would let into a string but that break the reply: special tokens other than EOS
    (decoding drops them) and control bytes (json.loads refuses them unescaped)."""
    from paperqa_tune.qa.grammar import JsonGrammar

    model, tok = model_and_tok
    vocab = model.get_output_embeddings().weight.shape[0]
    grammar = JsonGrammar(tok, vocab + 5)  # logits wider than the tokenizer: the extra ids are never allowed

    def kept(i):
        return bool(int(grammar.keep[0, i // 32]) >> (i % 32) & 1)

    control = tok.convert_tokens_to_ids("Ĉ")  # byte-level BPE's piece for the byte 0x08 (backspace)
    word = tok.encode("model", add_special_tokens=False)[0]
    assert kept(tok.eos_token_id) and kept(word)
    assert not kept(tok.bos_token_id) and not kept(tok.unk_token_id) and not kept(control)
    assert not any(kept(i) for i in range(vocab, vocab + 5))


def test_the_grammar_constrains_generate_the_same_way(model_and_tok):
    """Where our loop does not run (here --cache dynamic), the same grammar goes to model.generate as a logits
    processor: the same constrained tokens, every reply JSON of the schema."""
    from paperqa_tune.qa.grammar import JsonGrammar, bounded

    model, tok = model_and_tok
    grammar = JsonGrammar(tok, model.get_output_embeddings().weight.shape[0])
    schema = bounded(PAIRS_SCHEMA, 2, 1, {"question": 30, "answer": 40})
    ours = generate_batch(model, tok, prompts(tok), Decoding(max_new_tokens=200),
                          constraint=grammar.batch(schema, 3, "cpu"))
    theirs = generate_batch(model, tok, prompts(tok), Decoding(max_new_tokens=200, cache="dynamic"),
                            constraint=grammar.batch(schema, 3, "cpu"))
    assert ours == theirs
    assert all(ids[-1] == tok.eos_token_id and valid(json.loads(text), schema) for text, _, ids in ours)


@pytest.mark.parametrize("error, said", [(ImportError("No module named 'xgrammar'"), "pip install -r requirements.txt"),
                                         (RuntimeError("unsupported vocabulary"), "cannot read this tokenizer")])
def test_without_a_usable_grammar_the_run_stops_with_what_to_do(tmp_path, tiny_model, monkeypatch, capsys, error,
                                                               said):
    import paperqa_tune.qa.grammar as grammar

    def broken(*a, **k):
        raise error
    monkeypatch.setattr(grammar, "JsonGrammar", broken)
    abstracts = tmp_path / "a.txt"
    abstracts.write_text("Low-rank adapters train few parameters and keep the base weights frozen.\n")
    rc = generate_qa.main(["--backend", "hf", "--model", str(tiny_model), "--input", str(abstracts),
                           "--out", str(tmp_path / "out" / "train.jsonl"),
                           "--eval_out", str(tmp_path / "out" / "e.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and said in err and "--no-constrained_decoding" in err and "Traceback" not in err
