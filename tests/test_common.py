import json

import pytest

import common
from common import InputError, parse_chat, read_jsonl, render_zephyr

MSGS = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What does QLoRA quantise?"},
    {"role": "assistant", "content": "The frozen base model, to 4-bit NF4."},
]


def test_zephyr_form_round_trip():
    text = render_zephyr(MSGS)
    assert text == ("<|system|>\nYou are helpful.</s>\n<|user|>\nWhat does QLoRA quantise?</s>\n"
                    "<|assistant|>\nThe frozen base model, to 4-bit NF4.</s>\n")
    assert parse_chat(text) == MSGS


def test_seed_flat_form_parses():
    flat = "<|system|>You are helpful.<|user|>What does QLoRA quantise?<|assistant|>The frozen base model, to 4-bit NF4."
    assert parse_chat(flat) == MSGS
    assert parse_chat(render_zephyr(parse_chat(flat))) == MSGS


def test_multiline_content_survives():
    msgs = [{"role": "user", "content": "line one\n\nline two"}, {"role": "assistant", "content": "a\nb"}]
    assert parse_chat(render_zephyr(msgs)) == msgs


def test_generation_prompt():
    assert render_zephyr(MSGS[:2], add_generation_prompt=True).endswith("<|user|>\nWhat does QLoRA quantise?</s>\n<|assistant|>\n")


@pytest.mark.parametrize("bad", ["no markers here", "<|user|>\n</s>\n<|assistant|>\nx</s>\n", "junk<|user|>q<|assistant|>a"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_chat(bad)


def test_python_render_matches_real_template(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.chat_template == common.ZEPHYR_CHAT_TEMPLATE
    assert common.chat_text(tok, MSGS) == render_zephyr(MSGS)
    assert common.chat_text(tok, MSGS[:2], add_generation_prompt=True) == render_zephyr(MSGS[:2], add_generation_prompt=True)
    ids = common.encode_text(tok, render_zephyr(MSGS))
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.eos_token_id) == 3
    ids2 = common.encode_text(tok, tok.bos_token + render_zephyr(MSGS))
    assert ids2 == ids


def test_read_jsonl_reports_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2\n', encoding="utf-8")
    it = read_jsonl(p)
    assert next(it) == (1, {"a": 1})
    with pytest.raises(InputError, match=r"x.jsonl:3: malformed JSON"):
        next(it)


def test_read_jsonl_undecodable(tmp_path):
    p = tmp_path / "y.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=r"y.jsonl:2: not valid UTF-8"):
        list(read_jsonl(p))


def test_atomic_and_append(tmp_path):
    p = tmp_path / "o.jsonl"
    common.write_jsonl_atomic(p, [{"x": "é"}])
    common.append_jsonl(p, {"x": 2})
    with open(p, "a") as f:
        f.write('{"torn": ')  # a kill mid-line
    assert common.read_jsonl_tolerant(p) == [{"x": "é"}, {"x": 2}]


def test_check_outputs_free(tmp_path):
    p = tmp_path / "done.jsonl"
    common.check_outputs_free([p], overwrite=False)
    p.write_text("{}\n")
    with pytest.raises(InputError, match="--overwrite"):
        common.check_outputs_free([p], overwrite=False)
    common.check_outputs_free([p], overwrite=True)


def test_record_messages_both_fields():
    assert common.record_messages({"messages": MSGS}) == MSGS
    assert common.record_messages({"text": render_zephyr(MSGS)}) == MSGS
    with pytest.raises(ValueError, match="no assistant"):
        common.record_messages({"messages": MSGS[:2]})


def test_fake_server_with_real_client(openai_server):
    import openai

    from fake_openai import Reply

    openai_server.responder = lambda req, n: Reply(content=json.dumps({"n": n}))
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="test", max_retries=0)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert json.loads(r.choices[0].message.content) == {"n": 1}
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_read_jsonl_accepts_a_bom_and_names_folders_and_unreadable_files(tmp_path, monkeypatch):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"b": 2}\n')  # as Notepad and some exports save UTF-8
    assert list(read_jsonl(p)) == [(1, {"a": 1}), (2, {"b": 2})]
    with pytest.raises(InputError, match="is a folder"):
        list(read_jsonl(tmp_path))
    import builtins

    real_open = builtins.open

    def denied(file, *a, **k):
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", denied)  # tests run as root, where chmod 000 does not stop reads
    with pytest.raises(InputError, match=r"bom.jsonl: cannot read it \(Permission denied\)"):
        list(read_jsonl(p))
