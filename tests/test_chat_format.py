"""A model with a chat template of its own (ChatML with a default system prompt of its own, like SmolLM2's),
the same at every stage: exact label masks, the same prompt at training, evaluation and inference, an explicit
system prompt always; and the stops and repetition penalty decoding takes from the chat format and the model."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import eval_compare as ec  # noqa: E402
import quick_infer  # noqa: E402
import train_qlora_hf as T  # noqa: E402
from paperqa_tune import generation  # noqa: E402
from paperqa_tune.generation import Decoding, generate_batch, prompt_ids, resolve_repetition_penalty  # noqa: E402
from paperqa_tune.loading import generation_defaults, load_tokenizer, run_tokenizer  # noqa: E402
from paperqa_tune.messages import DEFAULT_SYSTEM_PROMPT, ZEPHYR_MARKERS, chat_stops, chat_text  # noqa: E402
from paperqa_tune.runs import read_run  # noqa: E402
from paperqa_tune.train import chats as C  # noqa: E402
from paperqa_tune.train.packing import IGNORE  # noqa: E402
from tools.make_tiny_model import CHATML_DEFAULT_SYSTEM  # noqa: E402

SYS = "You answer questions about papers."
Q1, A1 = "What does QLoRA quantise?", "The frozen base model, to 4-bit NF4."
Q2, A2 = "And what is trained?", "Only the low-rank adapters."


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tok(tiny_chatml_model):
    return load_tokenizer(tiny_chatml_model, "right")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chatml_pieces(system, turns):
    """Oracle: the ChatML text cut into (text, trained) pieces -- each answer and its <|im_end|> trained; the
    system and user turns, every "<|im_start|>assistant\\n" header and the newline after <|im_end|> not."""
    pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for q, a in turns:
        pieces += [(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", False), (a + "<|im_end|>", True),
                   ("\n", False)]
    return pieces


def oracle(tok, pieces):
    ids, labels = [], []
    for text, trained in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    assert tok("".join(p for p, _ in pieces), add_special_tokens=False)["input_ids"] == ids  # pieces = whole
    return ids, labels


def test_chatml_masks_exact_and_explicit_system(tok, tmp_path):
    """Only each answer and its <|im_end|> are labelled, token for token; a record without a system turn is
    trained with the project's prompt, never the template's own default."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]},
        {"messages": [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
                      {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                      {"role": "assistant", "content": A2}]}])
    samples, _ = C.build_samples(tok, C.load_chats(data), 4096, data)
    want = [oracle(tok, chatml_pieces(DEFAULT_SYSTEM_PROMPT, [(Q1, A1)])),
            oracle(tok, chatml_pieces(SYS, [(Q1, A1), (Q2, A2)]))]
    assert [(s["input_ids"], s["labels"]) for s in samples] == want
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for s in samples:  # every <|im_end|> of an answer trained, every other not; the BOS (<|im_start|>) once, first
        ends = [i for i, t in enumerate(s["input_ids"]) if t == end]
        trained_ends = [s["labels"][i] != IGNORE for i in ends]
        assert sum(trained_ends) == sum(m["role"] == "assistant" for m in s["messages"])
        assert s["input_ids"][0] == tok.bos_token_id
    text = tok.decode(samples[0]["input_ids"])
    assert DEFAULT_SYSTEM_PROMPT in text and CHATML_DEFAULT_SYSTEM not in text


def test_inspect_marks_chatml_answers(tiny_chatml_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": Q1},
                                                            {"role": "assistant", "content": A1}]}])
    assert T.main(["--jsonl", str(data), "--model", str(tiny_chatml_model), "--inspect", "1"]) == 0
    out = capsys.readouterr().out
    assert f"<|im_start|>assistant\n⟦{A1}<|im_end|>⟧" in out.replace("⟧⟦", "")
    sample = out.split("--- line 1")[1]
    assert "⟦" not in sample.split("<|im_start|>assistant")[0]  # nothing of the system or user turn is trained
    assert DEFAULT_SYSTEM_PROMPT in sample and CHATML_DEFAULT_SYSTEM not in sample


@pytest.fixture(scope="module")
def chatml_run(tiny_chatml_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "qa.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": f"What does paper {i} say?"},
                                     {"role": "assistant", "content": f"Paper {i} says {i + 2} percent."}]}
                       for i in range(24)])
    out = tmp_path_factory.mktemp("runs") / "chatml-run"
    assert T.main(["--jsonl", str(data), "--model", str(tiny_chatml_model), "--out", str(out), "--no-bf16",
                   "--batch", "4", "--grad_accum", "1", "--max_steps", "2", "--logging_steps", "1000"]) == 0
    return out, data


def test_one_prompt_at_every_stage(chatml_run, monkeypatch, capsys):
    """run_config.json records the model's own template and its stops; the eval and inference prompt (with
    the generation header) is the prefix of the training text and tokens of the same chat, with the system
    prompt training used (the project's, as the data had none)."""
    out, data = chatml_run
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["chat_template_source"] == "model" and "<|im_start|>" in cfg["chat_template"]
    assert (cfg["end_of_turn"], cfg["stop_strings"], cfg["system_prompt"]) == ("<|im_end|>", [], DEFAULT_SYSTEM_PROMPT)
    run = read_run(out)
    tok = run_tokenizer(run)
    assert tok.chat_template == cfg["chat_template"]
    chat = C.load_chats(data)[0]["messages"]
    train_text = chat_text(tok, chat)
    train = C.tokenize_chat(tok, chat, 4096)
    q = chat[1]["content"]
    eval_system = ec.system_for({"system": ec.NO_SYSTEM}, run, None)
    eval_text = chat_text(tok, [{"role": "system", "content": eval_system}, {"role": "user", "content": q}],
                          add_generation_prompt=True)
    assert train_text.startswith(eval_text) and eval_text.endswith("<|im_start|>assistant\n")
    eval_ids = prompt_ids(tok, q, eval_system)
    first_trained = next(i for i, lab in enumerate(train["labels"]) if lab != IGNORE)
    assert eval_ids == train["input_ids"][:first_trained]

    seen = []
    real = quick_infer.generate_batch
    monkeypatch.setattr(quick_infer, "generate_batch",
                        lambda model, tk, batch, dec, *a: seen.append((batch[0], dec)) or real(model, tk, batch, dec, *a))
    assert quick_infer.main(["--adapter", str(out), "--prompt", q, "--max_new_tokens", "3"]) == 0
    assert seen[0][0] == eval_ids
    err = capsys.readouterr().err
    assert f"system prompt: {DEFAULT_SYSTEM_PROMPT}" in err
    # the tiny model's generation_config.json sets no penalty: the project default, said and used
    assert seen[0][1].repetition_penalty == generation.DEFAULT_REPETITION_PENALTY and "the project default" in err


def test_repetition_penalty_source(tiny_chatml_model, tmp_path):
    assert generation_defaults(tiny_chatml_model).get("eos_token_id") is not None  # save_pretrained wrote one
    assert resolve_repetition_penalty(None, generation_defaults(tiny_chatml_model)) == (
        generation.DEFAULT_REPETITION_PENALTY, "the project default")
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.3}))
    assert resolve_repetition_penalty(None, generation_defaults(tmp_path)) == (
        1.3, "the model's generation_config.json")
    assert resolve_repetition_penalty(1.0, generation_defaults(tmp_path)) == (1.0, "--repetition_penalty")
    assert generation_defaults(tmp_path / "missing") == {}


def test_bad_repetition_penalty_is_refused(capsys):
    assert quick_infer.main(["--prompt", "x", "--repetition_penalty", "0"]) == 2
    assert "--repetition_penalty must be > 0" in capsys.readouterr().err


def test_stops_of_each_chat_format(tok, tiny_model):
    zephyr = load_tokenizer(tiny_model, "left")
    assert chat_stops(zephyr) == {"end_of_turn": "</s>", "eos_token_ids": [zephyr.eos_token_id],
                                  "stop_strings": list(ZEPHYR_MARKERS)}
    assert chat_stops(tok) == {"end_of_turn": "<|im_end|>", "eos_token_ids": [tok.eos_token_id], "stop_strings": []}
    # a template whose end-of-turn token is not the tokenizer's EOS: both end an answer
    other = load_tokenizer(tiny_model, "left")
    other.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<unk>\n{% endfor %}"
                           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    assert chat_stops(other)["eos_token_ids"] == [other.eos_token_id, other.unk_token_id]


class Force:
    """A constraint (engine.decode's protocol, as qa/grammar.BatchGrammar) that makes the model write `ids`
    and then whatever it likes: here, the tokens of an answer that goes on into a turn marker."""

    def __init__(self, ids, rows):
        self.ids, self.at = ids, [0] * rows

    def fill(self):
        pass

    def apply_(self, logits):
        for i, k in enumerate(self.at):
            if k < len(self.ids):
                logits[i].fill_(float("-inf"))
                logits[i, self.ids[k]] = 0.0

    def accept(self, tokens):
        self.at = [k + 1 for k in self.at]
        return []

    def hf_processor(self):
        from transformers import LogitsProcessor

        force = self

        class P(LogitsProcessor):
            def __call__(self, input_ids, scores):
                force.apply_(scores)
                force.at = [k + 1 for k in force.at]
                return scores

        return P()


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_answer_cut_at_a_turn_marker(tiny_model, cache):
    """The default template's markers are text to a base model: one that writes "<|user|>" after its answer
    stops there (not at max_new_tokens), and the answer is cut before it -- in our loop and in generate's."""
    from transformers import AutoModelForCausalLM

    zephyr = load_tokenizer(tiny_model, "left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    forced = zephyr("Paris.\n<|user|>\nAnd then?", add_special_tokens=False)["input_ids"]
    prompt = prompt_ids(zephyr, "Where?", SYS)
    dec = Decoding(max_new_tokens=30, cache=cache, stop_strings=tuple(chat_stops(zephyr)["stop_strings"]))
    [(text, n, ids)] = generate_batch(model, zephyr, [prompt], dec, constraint=Force(forced, 1))
    assert text == "Paris."
    assert n < len(forced) and ids == forced[:n] and "<|user|>" in zephyr.decode(ids)
    assert "<|user|>" not in zephyr.decode(ids[:-1])  # the token that completed the marker is the last
    plain = Decoding(max_new_tokens=30, cache=cache)
    [(text, n, _)] = generate_batch(model, zephyr, [prompt], plain, constraint=Force(forced, 1))
    assert "<|user|>" in text and n == 30  # without the stops it runs on


def test_stop_criteria_for_a_vocabulary_transformers_cannot_index(tiny_model):
    """transformers' StopStringCriteria cannot build its tables for a word-level vocabulary ("substring not found",
    seen with bench_eval's tokenizer); model.generate then stops through our own watcher of each row's tail."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, StopStringCriteria

    from paperqa_tune.generation import stop_criteria

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 100)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    crit = stop_criteria(words, ["t7"], rows=2)
    assert not isinstance(crit, StopStringCriteria)
    assert crit(torch.tensor([[4, 5], [4, 6]]), None).tolist() == [False, False]
    assert crit(torch.tensor([[4, 5, 8], [4, 6, 7]]), None).tolist() == [False, True]
    assert isinstance(stop_criteria(load_tokenizer(tiny_model, "left"), ["<|user|>"], rows=1), StopStringCriteria)
