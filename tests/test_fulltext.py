"""Full-text PDFs: sections from a PDF built here, every kind of bad PDF as a reject (the run goes on), folders in
--input, and --full_text over loopback servers (the arXiv API and its PDFs)."""
import json
import shutil
import unicodedata
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

import generate_qa
import pdf_maker
from generate_fakes import ArxivFeedServer, LoopbackServer
from paperqa_tune.qa import fulltext
from paperqa_tune.qa.fulltext import PdfRejected, read_pdf, read_pdf_bytes, split_long, split_sections

DATA = Path(__file__).parent / "data"
TITLE = "Sparse Adapters for Fast Domain Transfer"


def paper_pdf(**kw) -> bytes:
    return pdf_maker.make_pdf(pdf_maker.paper_pages(), **kw)


def run(tmp_path, *args):
    return generate_qa.main(["--backend", "offline", *args, "--out", str(tmp_path / "out" / "train.jsonl"),
                             "--eval_out", str(tmp_path / "out" / "eval.jsonl")])


def outputs(tmp_path):
    out = tmp_path / "out"
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "rejects": out / "rejects_train.jsonl",
            "manifest": out / "train.manifest.json"}


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# --------------------------------------------------------------------------- sections
def test_two_page_paper_splits_into_its_sections(tmp_path):
    path = tmp_path / "2401.00001.pdf"
    path.write_bytes(paper_pdf())
    paper = read_pdf(path, 6000)
    assert [s["name"] for s in paper["sections"]] == ["abstract", "introduction", "method", "results", "conclusion"]
    assert [s["heading"] for s in paper["sections"]] == ["Abstract", "1 Introduction", "2 Method", "3 Results",
                                                          "4 Conclusion"]
    assert (paper["id"], paper["source"], paper["pages"], paper["_where"]) == ("2401.00001", "pdf", 2, str(path))
    assert paper["title"] == TITLE  # no /Title in the file: the largest text on page 1
    text = {s["name"]: s["text"] for s in paper["sections"]}
    assert paper["abstract"] == text["abstract"] == (
        "We present sparse adapters, a method that transfers language models to new domains with one percent of "
        "the parameters. On three benchmarks they match full fine-tuning.")
    # the hyphenated line break is joined, and the paragraph ends where its short last line does
    assert ("We ask whether sparse representations can do the same work with far fewer updates.\n"
            "Our contributions are") in text["introduction"]
    assert text["method"].endswith("small batch.\n2.1 Mask selection\nWe keep the top one percent of entries by "
                                   "the magnitude of their gradient.")
    assert text["conclusion"] == "Sparse adapters transfer models cheaply. Future work will learn the mask itself."
    everything = "\n".join(text.values())
    for gone in ("Houlsby", "References", "Preprint", "Ada Lovelace", "Engines Lab"):  # refs, header, authors
        assert gone not in everything
    assert not any(line.strip().isdigit() for line in everything.splitlines())  # page numbers
    assert all(ch == "\n" or not unicodedata.category(ch).startswith("C") for ch in everything)
    assert "part" not in paper["sections"][0]


def test_title_from_metadata_unless_it_is_a_placeholder():
    assert read_pdf_bytes(paper_pdf(title="Sparse Adapters: the Journal Version"), "x", "x", 6000)["title"] == \
        "Sparse Adapters: the Journal Version"
    assert read_pdf_bytes(paper_pdf(title="Microsoft Word - draft7.docx"), "x", "x", 6000)["title"] == TITLE


def test_hyphen_kept_when_the_paper_spells_the_word_with_one():
    text = ("1 Introduction\nWe compare full fine-tuning with adapters, which update few weights, and show that\n"
            "full fine-\ntuning and sparse represen-\ntations differ in what they change.")
    (intro,) = split_sections(text)
    assert "full fine-tuning and sparse representations differ" in intro["text"]


def test_headings_in_other_templates_and_what_is_left_out():
    text = "\n".join([
        "A Paper Title", "Someone, Somewhere",
        "A BSTRACT", "Letter-spaced small caps, as the ICLR template prints them.",
        "I. INTRODUCTION", "Roman numerals, as IEEE prints them.",
        "II. RELATED WORK", "Earlier work.",
        "III. Our Sparse Adapter", "An unknown name is kept as body text under its heading.",
        "3 Results show gains on every benchmark we tried, and more", "a wrapped line that starts with a number.",
        "IV. Experiments and Results", "The earliest keyword names the section.",
        "Acknowledgments", "We thank the reviewers.",
        "References", "[1] A. Author. 4 Methods for everything. 2020.",
        "5 Kingma, D. and Ba, J. Adam: A method for stochastic optimization", "[6] B. Author. Discussion. 2021.",
        "Methods", "Nature puts its methods after the references.",
        "Appendix A: Proofs", "Left out, with everything after it.", "Discussion", "Also left out."])
    got = split_sections(text)
    assert [(s["name"], s["heading"]) for s in got] == [
        ("abstract", "ABSTRACT"), ("introduction", "I INTRODUCTION"), ("related_work", "II RELATED WORK"),
        ("body", "III Our Sparse Adapter"), ("experiments", "IV Experiments and Results"), ("method", "Methods")]
    assert "3 Results show gains" in got[3]["text"]
    joined = " ".join(s["text"] for s in got)
    for gone in ("reviewers", "A. Author", "Kingma", "Proofs", "Left out", "Also left out", "Someone"):
        assert gone not in joined


def test_inline_abstract_and_no_headings_at_all():
    got = split_sections("Title Here\nAbstract\u2014We study one thing. It works.\n1 Introduction\nMore text.")
    assert [(s["name"], s["text"]) for s in got] == [("abstract", "We study one thing. It works."),
                                                     ("introduction", "More text.")]
    (body,) = split_sections("Just a memo.\nWith two lines of text.")
    assert body == {"name": "body", "heading": "", "text": "Just a memo. With two lines of text."}


def test_long_section_is_cut_at_paragraph_then_sentence_boundaries():
    sentence = "Sparse adapters learn a fixed mask of entries chosen from gradient magnitudes. "
    para = (sentence * 12).strip()  # ~950 chars
    text = "\n".join([para, "A short paragraph.", para])
    parts = split_long(text, 400)
    assert [len(p) for p in parts] == [394, 394, 334, 394, 394]  # 5 sentences of 78 chars fit in 400
    assert all(p.endswith(".") for p in parts)  # never mid-sentence
    assert "magnitudes.\nA short paragraph.\nSparse" in parts[2]  # paragraphs keep their line break
    assert " ".join(" ".join(parts).split()) == " ".join(text.split())  # nothing lost or duplicated
    word = "x" * 30
    assert [len(p) for p in split_long(" ".join([word] * 10), 100)] == [92, 92, 92, 30]  # no sentence boundary
    assert split_long("short", 100) == ["short"]


def test_long_sections_become_numbered_parts_in_the_paper():
    sentence = "The mask is chosen once from gradient magnitudes on a small batch of training data. "
    pages = pdf_maker.paper_pages()
    k = next(i for i, line in enumerate(pages[0]) if line.text == "2 Method")
    pages[0][k + 1: k + 1] = [pdf_maker.Line(sentence.strip())] * 30
    pages[0].insert(k + 31, pdf_maker.Line("", y=None))
    paper = read_pdf_bytes(pdf_maker.make_pdf([pages[0][: k + 5], pages[0][k + 5:], pages[1]]), "x", "x", 900)
    method = [s for s in paper["sections"] if s["name"] == "method"]
    assert [s["part"] for s in method] == list(range(1, len(method) + 1)) and len(method) >= 3
    assert all(len(s["text"]) <= 900 and s["heading"] == "2 Method" for s in method)
    assert [s["name"] for s in paper["sections"] if s["name"] != "method"] == ["abstract", "introduction",
                                                                               "results", "conclusion"]


def test_chat_markers_removed_from_sections():
    pages = pdf_maker.paper_pages()
    pages[1][2] = pdf_maker.Line("On the legal, <|user|> medical and code benchmarks sparse adapters reach 98.7 of the")
    paper = read_pdf_bytes(pdf_maker.make_pdf(pages), "x", "x", 6000)
    results = next(s for s in paper["sections"] if s["name"] == "results")
    assert "<|" not in results["text"] and "legal, medical and code" in results["text"]
    assert paper["_chat_markers"] == ["<|user|>"] and "_chat_markers" not in results


# --------------------------------------------------------------------------- bad PDFs
BAD_PDFS = {
    "encrypted": (lambda: pdf_maker.encrypted(paper_pdf()), "pdf_encrypted: it needs a password"),
    "image_only": (pdf_maker.image_only, "pdf_no_text: 0 letters of text on 2 page(s); it looks scanned"),
    "truncated": (lambda: pdf_maker.truncated(paper_pdf()), "pdf_unreadable: truncated"),
    "not_a_pdf": (lambda: b"<!DOCTYPE html><html>Just a moment...</html>", "pdf_unreadable: not a PDF, HTML"),
    "corrupt_page": (lambda: paper_pdf().replace(b"stream\n", b"stream\nXX"), "pdf_unreadable: 2 of 2 pages are "
                                                                               "damaged"),
}


@pytest.mark.parametrize("case", sorted(BAD_PDFS))
def test_bad_pdf_is_rejected_with_its_reason(case):
    make, reason = BAD_PDFS[case]
    with pytest.raises(PdfRejected) as e:
        read_pdf_bytes(make(), "x.pdf", "x", 6000)
    assert str(e.value).startswith(reason), str(e.value)


def test_encrypted_with_an_empty_password_is_read():
    paper = read_pdf_bytes(pdf_maker.encrypted(paper_pdf(), user_password=""), "x", "x", 6000)
    assert len(paper["sections"]) == 5


def test_bad_pdfs_are_rejects_and_the_run_goes_on(tmp_path, capsys):
    good = tmp_path / "in" / "good.pdf"
    good.parent.mkdir()
    good.write_bytes(paper_pdf())
    bad = []
    for case, (make, _) in sorted(BAD_PDFS.items()):
        bad.append(tmp_path / "in" / f"{case}.pdf")
        bad[-1].write_bytes(make())
    assert run(tmp_path, "--input", str(good), *map(str, bad), "--eval_papers", "0") == 0
    assert "5 PDF(s) gave no full text" in capsys.readouterr().err
    rejects = {r["paper_id"]: r for r in lines(outputs(tmp_path)["rejects"]) if r["stage"] == "input"}
    assert sorted(rejects) == sorted(BAD_PDFS)
    for case, (_, reason) in BAD_PDFS.items():
        assert rejects[case]["reason"].startswith(reason) and rejects[case]["where"] == str(tmp_path / "in" /
                                                                                             f"{case}.pdf")
    train = lines(outputs(tmp_path)["train"])
    assert train and {r["meta"]["paper_id"] for r in train} == {"good"}
    man = json.loads(outputs(tmp_path)["manifest"].read_text())
    assert [i["papers"] for i in man["inputs"]] == [1, 0, 0, 0, 0, 0]
    assert man["inputs"][1]["rejected"].startswith("pdf_unreadable: 2 of 2")
    assert man["papers"]["total"] == 6


def test_every_input_rejected_exits_2_saying_why(tmp_path, capsys):
    bad = tmp_path / "scan.pdf"
    bad.write_bytes(pdf_maker.image_only())
    assert run(tmp_path, "--input", str(bad)) == 2
    err = capsys.readouterr().err
    assert "every input was rejected" in err and f"{bad}: pdf_no_text" in err
    assert not any(p.exists() for p in outputs(tmp_path).values())


# --------------------------------------------------------------------------- folders
def test_folder_input_reads_pdfs_and_abstract_files_in_it(tmp_path):
    folder = tmp_path / "papers"
    (folder / "sub").mkdir(parents=True)
    (folder / "a_paper.pdf").write_bytes(paper_pdf())
    shutil.copy(DATA / "abstracts.jsonl", folder / "b_abstracts.jsonl")
    (folder / "notes.md").write_text("not read: only .pdf/.jsonl/.csv/.txt files are")
    (folder / "sub" / "deeper.pdf").write_bytes(b"not read: subfolders are not searched")
    args = ["--backend", "offline", "--input", str(folder), "--out", str(folder / "synthetic_qa.jsonl")]
    assert generate_qa.main(args) == 0
    man = json.loads((folder / "synthetic_qa.manifest.json").read_text())
    assert [Path(i["path"]).name for i in man["inputs"]] == ["a_paper.pdf", "b_abstracts.jsonl"]
    assert man["papers"]["total"] == 9
    # a rerun leaves out the outputs (.jsonl) the first run wrote into the folder
    assert {"synthetic_qa.jsonl", "eval_questions.jsonl", "rejects_synthetic_qa.jsonl"} <= {
        p.name for p in folder.iterdir()}
    assert generate_qa.main([*args, "--overwrite"]) == 0
    man = json.loads((folder / "synthetic_qa.manifest.json").read_text())
    assert [Path(i["path"]).name for i in man["inputs"]] == ["a_paper.pdf", "b_abstracts.jsonl"]


def test_empty_folder_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no papers here")
    assert run(tmp_path, "--input", str(tmp_path / "empty")) == 2
    assert f"{tmp_path / 'empty'}: the folder holds no .pdf/.jsonl/.csv/.txt file" in capsys.readouterr().err


# --------------------------------------------------------------------------- --full_text over loopback
class PdfServer(LoopbackServer):
    """Serves {path: bytes} as application/pdf; any other path is a 404. Records the paths asked for."""

    def __init__(self, files: dict[str, bytes]):
        outer = self
        self.paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.paths.append(self.path)
                data = files.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Type", "application/pdf" if data is not None else "text/plain")
                body = data if data is not None else b"not found"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._serve(Handler)
        self.url = f"http://127.0.0.1:{self.port}"


def test_full_text_downloads_each_pdf_and_keeps_the_abstract_when_one_fails(tmp_path, monkeypatch):
    sessions = []
    real = fulltext.download_pdf
    monkeypatch.setattr(fulltext, "download_pdf", lambda s, url, *a: sessions.append(s) or real(s, url, *a))
    with ArxivFeedServer(DATA / "arxiv_feed.xml") as api, PdfServer({"/pdf/2310.06825": paper_pdf()}) as pdfs:
        rc = run(tmp_path, "--arxiv_ids", "2310.06825,2205.14135", "--full_text", "--arxiv_api_url", api.url,
                 "--arxiv_pdf_url", pdfs.url + "/pdf/{id}", "--arxiv_delay", "0", "--eval_papers", "0")
    assert rc == 0
    assert sorted(pdfs.paths) == ["/pdf/2205.14135", "/pdf/2310.06825"]  # each once
    assert len({id(s) for s in sessions}) == 1 and type(sessions[0]).__name__ == "_Session"  # the API's session
    (reject,) = [r for r in lines(outputs(tmp_path)["rejects"]) if r["stage"] == "input"]
    assert reject["paper_id"] == "2205.14135" and reject["reason"].startswith("pdf_download: HTTP 404")
    assert reject["where"] == pdfs.url + "/pdf/2205.14135"
    man = json.loads(outputs(tmp_path)["manifest"].read_text())
    assert (man["inputs"][0]["full_text"], man["inputs"][0]["pdfs_read"], man["inputs"][0]["papers"]) == (True, 1, 2)
    assert {r["meta"]["paper_id"] for r in lines(outputs(tmp_path)["train"])} == {"2310.06825", "2205.14135"}


def test_full_text_paper_keeps_the_api_title_and_abstract(tmp_path, monkeypatch):
    from paperqa_tune.qa.abstracts import fetch_arxiv, http_session

    with ArxivFeedServer(DATA / "arxiv_feed.xml") as api, PdfServer({"/pdf/2310.06825": paper_pdf()}) as pdfs:
        session = http_session()
        (api_paper,) = fetch_arxiv(["2310.06825"], None, 20, api.url, session, 0)
        slept = []
        monkeypatch.setattr(fulltext.time, "sleep", slept.append)
        (paper,), rejects = fulltext.add_full_texts([api_paper], pdfs.url + "/pdf/{id}", session, 2.5, 6000)
    assert rejects == [] and slept == [2.5]  # arXiv's pause before each PDF
    assert (paper["title"], paper["abstract"], paper["source"]) == (api_paper["title"], api_paper["abstract"], "arxiv")
    assert paper["pages"] == 2 and paper["pdf_url"] == pdfs.url + "/pdf/2310.06825"
    assert [s["name"] for s in paper["sections"]] == ["abstract", "introduction", "method", "results", "conclusion"]


def test_full_text_needs_arxiv_and_a_sane_pdf_url(tmp_path, capsys):
    assert run(tmp_path, "--input", str(DATA / "abstracts.jsonl"), "--full_text") == 2
    assert "--full_text downloads arXiv PDFs" in capsys.readouterr().err
    assert run(tmp_path, "--arxiv_ids", "2310.06825", "--arxiv_pdf_url", "http://x/{id}/{v}") == 2
    assert "--arxiv_pdf_url must" in capsys.readouterr().err
