"""Section-grounded pairs: a PDF the test builds becomes one request per section, pairs carry meta.section, and an
evaluation question's context is its section's text (offline backend and an LLM over the loopback server)."""
import dataclasses
import json
from pathlib import Path

import generate_qa
import pdf_maker
from fake_openai import FakeOpenAI, Reply
from generate_fakes import good_reply, request_paper
from paperqa_tune.qa.fulltext import read_pdf

SECTIONS = ["abstract", "introduction", "method", "results", "conclusion"]


def lines(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]


def renamed(pages, words):
    """The same paper with other words (another title and method), so the two papers' questions differ."""
    def swap(text):
        for a, b in words.items():
            text = text.replace(a, b)
        return text
    return [[dataclasses.replace(line, text=swap(line.text)) for line in page] for page in pages]


def two_papers(tmp_path):
    """Two PDFs (so one can be held out) with the same layout, different words and ids."""
    other = {"Sparse": "Gated", "sparse": "gated", "Adapters": "Routers", "adapters": "routers",
             "adapter": "router", "Domain Transfer": "Task Routing"}
    paths = []
    for pid, pages in (("2401.00001", pdf_maker.paper_pages()), ("2401.00002", renamed(pdf_maker.paper_pages(), other))):
        path = tmp_path / f"{pid}.pdf"
        path.write_bytes(pdf_maker.make_pdf(pages))
        paths.append(path)
    return paths


def check_section_outputs(out, pdfs):
    train, evals = lines(out / "train.jsonl"), lines(out / "eval.jsonl")
    assert {r["meta"]["section"] for r in train} <= set(SECTIONS)
    assert len({r["meta"]["section"] for r in train}) >= 3
    unseen = [e for e in evals if e["set"] == "unseen"]  # knowledge questions are about trained papers, by design
    assert unseen and {e["paper_id"] for e in unseen}.isdisjoint({r["meta"]["paper_id"] for r in train})
    texts = {(p.stem, s["name"]): s["text"] for p in pdfs for s in read_pdf(p, 6000)["sections"]}
    for e in evals:  # both sets: a question's context is its own paper's section text, not the abstract
        assert e["context"] == texts[(e["paper_id"], e["section"])]
    man = json.loads((out / "train.manifest.json").read_text())
    by_section = man["counts"]["by_section"]
    assert set(by_section) <= set(SECTIONS) and sum(by_section.values()) == man["counts"]["kept"]
    quality = json.loads((out / "train.quality.json").read_text())  # the reviewer's report agrees
    assert quality["by_section"] == by_section and quality["totals"]["turns"] == man["counts"]["kept"]
    assert (out / "train.quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return train, evals


def test_offline_pdf_pairs_are_grounded_in_their_section(tmp_path):
    pdfs = two_papers(tmp_path)
    out = tmp_path / "out"
    rc = generate_qa.main(["--backend", "offline", "--input", *map(str, pdfs), "--out", str(out / "train.jsonl"),
                           "--eval_out", str(out / "eval.jsonl"), "--eval_papers", "1", "--pairs_per_abstract", "4"])
    assert rc == 0
    train, _ = check_section_outputs(out, pdfs)
    # an unanswerable answer names the section it was grounded in
    refusals = [r["messages"][-1]["content"] for r in train if r["meta"]["type"] == "unanswerable"
                and r["meta"]["section"] != "abstract"]
    assert refusals and all(" section of " in a for a in refusals)


def test_llm_gets_one_request_per_section(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    pdfs = two_papers(tmp_path)
    seen = []

    def responder(req, n):
        seen.append(request_paper(req)["section"])
        return Reply(content=good_reply(req))

    out = tmp_path / "out"
    with FakeOpenAI(responder) as srv:
        rc = generate_qa.main(["--input", *map(str, pdfs), "--base_url", srv.base_url, "--model", "fake-model",
                               "--out", str(out / "train.jsonl"), "--eval_out", str(out / "eval.jsonl"),
                               "--eval_papers", "1", "--concurrency", "2", "--timeout", "20", "--max_tokens", "2000",
                               "--pairs_per_abstract", "4"])
        method = next(r for r in srv.requests if '<section name="method">' in r["messages"][1]["content"])
    assert rc == 0
    assert sorted(seen) == sorted(SECTIONS * 2)  # every section of both papers, once
    prompt = method["messages"][1]["content"]
    assert "</section>" in prompt and '"method" section of the paper\'s full text' in prompt
    check_section_outputs(out, pdfs)
