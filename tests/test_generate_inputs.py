"""generate_qa.py: input formats, arXiv ingestion over loopback, and every kind of bad input (exit 2, no outputs)."""
import argparse
import json
import re
import socket
import time
from pathlib import Path

import pytest

import generate_qa
from generate_fakes import ArxivFeedServer

DATA = Path(__file__).parent / "data"


def outputs(tmp_path):
    return [tmp_path / "out" / n for n in ("train.jsonl", "eval.jsonl", "train.manifest.json", "rejects_train.jsonl")]


def run(tmp_path, *args):
    return generate_qa.main([*args, "--out", str(tmp_path / "out" / "train.jsonl"),
                             "--eval_out", str(tmp_path / "out" / "eval.jsonl")])


def test_help_shows_every_flag_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        generate_qa.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo line wrapping
    for action in generate_qa.build_parser()._actions:
        if action.help != argparse.SUPPRESS:  # the hidden dashed aliases
            for opt in action.option_strings:
                assert opt in text
    for shown in ("default: openai", "default: 12", "default: 0.2", "default: data/synthetic_qa.jsonl",
                  "(default: beside --out: eval_questions.jsonl", generate_qa.ARXIV_API_URL):
        assert shown in text
    assert "(default: None)" not in text and "default: False" not in text
    fmt = generate_qa.build_parser()._get_formatter()
    for action in generate_qa.build_parser()._actions:  # each flag says its default once, and says what it does
        if action.option_strings and action.help != argparse.SUPPRESS:
            assert fmt._get_help_string(action).count("(default:") <= 1 and action.help, action.option_strings


def test_dashed_flag_spellings_still_parse_but_are_not_listed(capsys):
    parser = generate_qa.build_parser()
    for dashed, underscored in ((["--max-tokens", "5"], ["--max_tokens", "5"]),
                                (["--arxiv-ids", "2305.14314,2106.09685"], ["--arxiv_ids", "2305.14314,2106.09685"]),
                                (["--trust-remote-code"], ["--trust_remote_code"]),
                                (["--eval-papers", "0.5"], ["--eval_papers", "0.5"])):
        assert vars(parser.parse_args(dashed)) == vars(parser.parse_args(underscored))
    assert parser.parse_args(["--max-tokens", "5"]).max_tokens == 5
    with pytest.raises(SystemExit):
        generate_qa.main(["--help"])
    text = capsys.readouterr().out
    assert "--max_tokens" in text and "--max-tokens" not in text
    # no dashed flag listed anywhere, the docstring included (argparse's --no-<flag> negations aside)
    assert not re.search(r"--(?!no-)[a-z]+-[a-z]", text)


def test_reads_jsonl_csv_and_text_together(tmp_path):
    rc = run(tmp_path, "--backend", "offline", "--input", str(DATA / "abstracts.jsonl"), str(DATA / "abstracts.csv"),
             "--input", str(DATA / "abstracts.txt"))
    assert rc == 0
    man = json.loads((tmp_path / "out" / "train.manifest.json").read_text())
    assert [i["papers"] for i in man["inputs"]] == [8, 3, 2]
    assert all(len(i["sha256"]) == 64 for i in man["inputs"])
    assert man["papers"]["total"] == 13
    ids = {json.loads(l)["meta"]["paper_id"] for l in (tmp_path / "out" / "train.jsonl").read_text().splitlines()}
    ids |= {json.loads(l)["paper_id"] for l in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()}
    assert {"1706.03762", "2005.14165", "abstracts-1", "abstracts-2"} <= ids


def test_file_readers_keep_extra_keys_and_clean_whitespace(tmp_path):
    csv_papers = generate_qa.read_abstract_file(DATA / "abstracts.csv")
    assert csv_papers[0]["year"] == "2020" and csv_papers[0]["id"] == "2005.14165"
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"title": "  A\n  title ", "abstract": "  Line one\nline two.  ", "venue": "X"}) + "\n")
    (paper,) = generate_qa.read_abstract_file(p)
    assert (paper["id"], paper["title"], paper["abstract"], paper["venue"]) == ("a-1", "A title", "Line one line two.", "X")
    txt = generate_qa.read_abstract_file(DATA / "abstracts.txt")
    assert [t["id"] for t in txt] == ["abstracts-1", "abstracts-2"] and txt[1]["_where"].endswith("abstracts.txt:7")


BAD_INPUTS = {
    "malformed_jsonl": ("x.jsonl", b'{"id": "1", "abstract": "Fine."}\n{"id": "2", "abstract": "cut\n', r"x.jsonl:2: malformed JSON"),
    "missing_abstract": ("x.jsonl", b'{"id": "1", "title": "T"}\n', r"x.jsonl:1: no 'abstract' field"),
    "empty_abstract": ("x.jsonl", b'{"id": "1", "abstract": "Fine."}\n{"id": "2", "abstract": "  "}\n', r"x.jsonl:2: empty abstract"),
    "undecodable_jsonl": ("x.jsonl", b'{"id": "1", "abstract": "caf\xe9"}\n', r"x.jsonl:1: not valid UTF-8"),
    "undecodable_txt": ("x.txt", b"First abstract.\n\nSecond \xff\xfe abstract.\n", r"x.txt:3: not valid UTF-8"),
    "undecodable_csv": ("x.csv", b"id,abstract\n1,ok\n2,caf\xe9\n", r"x.csv:3: not valid UTF-8"),
    "unknown_csv_columns": ("x.csv", b"paper,text\n1,Some text.\n", r"x.csv:1: unknown CSV columns \['paper', 'text'\]"),
    "empty_csv_abstract": ("x.csv", b'id,title,abstract\n1,T,"Fine, really."\n2,T2,\n', r"x.csv:3: empty abstract"),
    "unknown_suffix": ("x.docx", b"PK", r"x.docx: unknown input type .docx"),
    "duplicate_id": ("x.jsonl", b'{"id": "7", "abstract": "One."}\n{"id": "7", "abstract": "Two."}\n',
                     r"x.jsonl:2: id '7' already used at .*x.jsonl:1"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_naming_the_line_and_writes_nothing(tmp_path, capsys, case):
    name, content, message = BAD_INPUTS[case]
    (tmp_path / name).write_bytes(content)
    assert run(tmp_path, "--backend", "offline", "--input", str(tmp_path / name)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not any(p.exists() for p in outputs(tmp_path))


def test_missing_file_and_bad_arguments_reported_together(tmp_path, capsys):
    assert run(tmp_path, "--backend", "offline", "--input", str(tmp_path / "nope.jsonl")) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    assert run(tmp_path, "--backend", "offline", "--edge_case_ratio", "1.5", "--concurrency", "0",
               "--arxiv_ids", "not-an-id", "--eval_papers", "2.5") == 2
    err = capsys.readouterr().err
    for flag in ("--edge_case_ratio", "--concurrency", "--arxiv_ids", "--eval_papers"):
        assert flag in err
    assert not any(p.exists() for p in outputs(tmp_path))


def test_missing_api_key_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert run(tmp_path, "--input", str(DATA / "abstracts.jsonl")) == 2
    assert "OPENAI_API_KEY is not set" in capsys.readouterr().err
    assert run(tmp_path, "--backend", "offline", "--judge_model", "m", "--input", str(DATA / "abstracts.jsonl")) == 2
    assert not any(p.exists() for p in outputs(tmp_path))


def test_unreachable_server_fails_fast_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.time()
    rc = run(tmp_path, "--input", str(DATA / "abstracts.jsonl"), "--base_url", f"http://127.0.0.1:{port}/v1")
    assert rc == 2 and time.time() - t < 15
    assert "cannot reach the server" in capsys.readouterr().err
    assert not any(p.exists() for p in outputs(tmp_path))


def test_existing_outputs_need_overwrite(tmp_path, capsys):
    args = ("--backend", "offline", "--input", str(DATA / "abstracts.jsonl"))
    train = tmp_path / "out" / "train.jsonl"
    train.parent.mkdir()
    train.write_text("finished work\n")
    assert run(tmp_path, *args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert train.read_text() == "finished work\n"
    assert run(tmp_path, *args, "--overwrite") == 0
    assert train.read_text() != "finished work\n"


def test_arxiv_ids_and_query_from_recorded_feed(tmp_path):
    with ArxivFeedServer(DATA / "arxiv_feed.xml") as srv:
        rc = run(tmp_path, "--backend", "offline", "--arxiv_ids", "2310.06825v1,2205.14135", "--eval_papers", "1",
                 "--arxiv_api_url", srv.url)
        assert rc == 0
        assert "id_list=2310.06825v1%2C2205.14135" in srv.urls[0]
        train = [json.loads(l) for l in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
        evals = [json.loads(l) for l in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
        assert {r["meta"]["paper_id"] for r in train} | {e["paper_id"] for e in evals} == {"2310.06825", "2205.14135"}
        context = {e["context"] for e in evals}.pop()
        assert "\n" not in context and not context.startswith(" ")  # the feed's hard wraps are undone
        man = json.loads((tmp_path / "out" / "train.manifest.json").read_text())
        assert man["inputs"][0]["arxiv_ids"] == ["2310.06825v1", "2205.14135"]

        rc = run(tmp_path, "--backend", "offline", "--arxiv_query", "cat:cs.CL", "--max_papers", "2",
                 "--arxiv_api_url", srv.url, "--overwrite")
        assert rc == 0 and "search_query=cat%3Acs.CL" in srv.urls[1]
        man = json.loads((tmp_path / "out" / "train.manifest.json").read_text())
        assert man["papers"]["total"] == 2


def test_arxiv_unknown_id_exits_2(tmp_path, capsys):
    with ArxivFeedServer(DATA / "arxiv_feed.xml") as srv:
        assert run(tmp_path, "--backend", "offline", "--arxiv_ids", "2310.06825,2401.00001", "--arxiv_api_url", srv.url) == 2
    assert "no paper for id(s) 2401.00001" in capsys.readouterr().err
    assert not any(p.exists() for p in outputs(tmp_path))
