"""eval_compare.py on the tiny model: scores, spreadsheet-safe CSV (pandas + LibreOffice), resume,
judge in both orders, fast path == reference path, bad inputs."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

import eval_compare as ec
from paperqa_tune.generation import Decoding, generate_batch, left_pad, prompt_ids
from paperqa_tune.loading import attach_adapter, dequantize_, load_run_base, merged_model, run_tokenizer
from paperqa_tune.runs import read_run
from common import read_jsonl_tolerant
from paperqa_tune.evaluate import report
from numerics import assert_greedy_agrees, four_bit_dtype, logit_tolerance, teacher_forced_logits
from common import DEFAULT_SYSTEM_PROMPT

TOKENS = 8

QUESTIONS = [
    {"id": "f1", "type": "factual", "question": "What method does the paper propose?",
     "reference": "Low-rank adapters with four-bit quantization.", "paper_id": "p1",
     "context": "We propose QLoRA, low-rank adapters on a four-bit quantized model."},
    {"id": "c1", "type": "conceptual", "question": "Why does quantization help fine-tuning? Über-café, naïve.",
     "reference": "It reduces memory so larger models fit.", "paper_id": "p1", "context": "Quantization saves memory."},
    {"id": "m1", "type": "methodology", "question": "=SUM(A1:A3) how is accuracy measured?",
     "reference": "-1 On question answering benchmarks.\nAcross several tasks.", "paper_id": "p2",
     "context": "Accuracy on QA benchmarks."},
    {"id": "u1", "type": "unanswerable", "question": "What dataset size is used?",
     "reference": "The abstract does not state the dataset size.", "paper_id": "p2", "context": "No size given."},
    {"id": "fp1", "type": "false_premise", "question": "Why does the paper use eight-bit weights?",
     "reference": "It does not; it uses four-bit weights.", "paper_id": "p3", "context": "Four-bit NF4 weights."},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def make_run(tiny_model: Path, out: Path, system_prompt: str | None = None, bf16: bool = True) -> Path:
    """A run folder as train_qlora_hf.py writes it, with a random (non-zero) LoRA so outputs change."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    args = {"bf16": bf16, "max_seq_len": 512, "lora_r": 8}
    if system_prompt:
        args["system_prompt"] = system_prompt
    (out / "run_config.json").write_text(json.dumps({"base_model": str(tiny_model), "args": args,
                                                     "versions": {}, "data_sha256": "0" * 64}))
    return out


def write_questions(path: Path, rows=QUESTIONS) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    return make_run(tiny_model, tmp_path_factory.mktemp("run") / "tiny-qlora")


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """One full `main()` run (auto mode = reference path on CPU); later tests read or reuse it."""
    d = tmp_path_factory.mktemp("eval")
    q = write_questions(d / "eval_questions.jsonl")
    out = d / "out" / "evaluation.csv"
    rc = ec.main(["--adapter", str(tiny_run), "--questions", str(q), "--out", str(out),
                  "--max_new_tokens", str(TOKENS)])
    assert rc == 0
    return {"dir": d, "questions": q, "out": out, "paths": ec.output_paths(out)}


# --------------------------------------------------------------------------- LibreOffice read-back
def libreoffice_cells(csv_path: Path, workdir: Path) -> list[list[tuple[str, bool]]]:
    """Open the CSV in LibreOffice Calc (headless, UTF-8 import as a user picks it), save as xlsx and
    return every cell as (text, is_formula)."""
    soffice = shutil.which("soffice") or shutil.which("libreoffice")
    if not soffice:
        pytest.skip(reason="LibreOffice is not installed (apt-get install libreoffice-calc-nogui); "
                    "spreadsheet read-back not checked")
    outdir = workdir / "lo-out"
    subprocess.run([soffice, f"-env:UserInstallation={(workdir / 'lo-profile').as_uri()}", "--headless",
                    "--infilter=CSV:44,34,76,1", "--convert-to", "xlsx", "--outdir", str(outdir), str(csv_path)],
                   check=True, timeout=180, capture_output=True)
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(outdir / (csv_path.stem + ".xlsx")) as z:
        shared = []
        if "xl/sharedStrings.xml" in z.namelist():
            for si in ElementTree.fromstring(z.read("xl/sharedStrings.xml")).findall("m:si", ns):
                shared.append("".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t")))
        sheet = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
    rows = []
    for row in sheet.find("m:sheetData", ns).findall("m:row", ns):
        cells: dict[int, tuple[str, bool]] = {}
        for c in row.findall("m:c", ns):
            col = 0
            for ch in re.match(r"[A-Z]+", c.get("r")).group(0):
                col = col * 26 + ord(ch) - 64
            v, f = c.find("m:v", ns), c.find("m:f", ns)
            if c.get("t") == "s":
                text = shared[int(v.text)]
            elif c.get("t") == "inlineStr":
                text = "".join(t.text or "" for t in c.iter(f"{{{ns['m']}}}t"))
            else:
                text = v.text if v is not None else ""
            cells[col - 1] = (text, f is not None)
        rows.append([cells.get(i, ("", False)) for i in range(max(cells) + 1 if cells else 0)])
    return rows


def expected_cell(v) -> str:
    s = report.safe_cell(v)
    return "" if s == "" else str(s)


def unsanitize(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(report.FORMULA_START) else cell


def check_spreadsheet(path: Path, rows: list[dict], columns: list[str], workdir: Path, text_cols=None) -> None:
    """pandas and LibreOffice both read back exactly the (sanitised) text; no cell is a formula."""
    import pandas as pd

    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf"), "UTF-8 BOM missing"
    df = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    assert list(df.columns) == columns
    assert len(df) == len(rows)
    text_cols = text_cols or [c for c in columns if all(isinstance(r.get(c), str) for r in rows)]
    for i, r in enumerate(rows):
        for c in text_cols:
            assert df.at[i, c] == expected_cell(r[c]), (c, df.at[i, c], r[c])
    cells = libreoffice_cells(path, workdir)
    assert [t for t, _ in cells[0]] == columns
    assert not any(is_f for row in cells for _, is_f in row), "a cell became a formula in LibreOffice"
    for i, r in enumerate(rows, 1):
        for j, c in enumerate(columns):
            if c in text_cols:
                got = cells[i][j][0] if j < len(cells[i]) else ""
                assert got == expected_cell(r[c]), (c, got, r[c])


# --------------------------------------------------------------------------- spreadsheet safety
CRAFTED = ["=1+1", "nul\x00bell\x07", "+SUM(1,2)", "-2+3", "@SUM(A1)", "\tTAB=1", "\rCR", "=HYPERLINK(\"http://x\",\"y\")",
           "café — naïve Über 東京", "line one\nline two, with comma", 'say "quoted"', "normal answer", "'already"]


def test_csv_writer_is_spreadsheet_safe(tmp_path):
    rows = [{"id": f"r{i}", "type": "factual", "question": f"q{i}", "reference": "ref",
             "base_answer": text, "finetuned_answer": text[::-1], "base_token_f1": 0.25, "ft_token_f1": None}
            for i, text in enumerate(CRAFTED)]
    cols = ["id", "type", "question", "reference", "base_answer", "finetuned_answer", "base_token_f1", "ft_token_f1"]
    path = tmp_path / "crafted.csv"
    report.write_csv(path, rows, cols)
    assert report.safe_cell("=1+1") == "'=1+1" and report.safe_cell(-0.5) == -0.5 and report.safe_cell(float("nan")) == ""
    check_spreadsheet(path, rows, cols, tmp_path)

    # Control: the same text unsanitised does become a formula in LibreOffice, so the check above bites.
    if shutil.which("soffice"):
        raw = tmp_path / "raw.csv"
        with open(raw, "w", encoding="utf-8-sig", newline="") as f:
            csv.writer(f).writerows([["a"], ["=1+1"]])
        assert libreoffice_cells(raw, tmp_path / "raw")[1][0] == ("2", True)


# --------------------------------------------------------------------------- full run
def test_full_run_outputs(evaluated, tmp_path):
    import pandas as pd

    paths = evaluated["paths"]
    for k in ("csv", "marking", "summary", "plot", "cache"):
        assert paths[k].is_file(), k
    df = pd.read_csv(paths["csv"], encoding="utf-8-sig", keep_default_na=False, dtype=str)
    assert list(df.columns[:6]) == ["id", "type", "question", "reference", "base_answer", "finetuned_answer"]
    assert list(df["id"]) == [q["id"] for q in QUESTIONS]
    assert (df["base_answer"] != df["finetuned_answer"]).any(), "the random LoRA must change some answer"
    for side in ("base", "finetuned"):
        for m in ("behaviour", "correct", "score", "token_f1", "rougeL", "words", "new_tokens"):
            assert f"{side}_{m}" in df.columns
        assert set(df[f"{side}_behaviour"]) <= {"answered", "refused", "corrected_premise", "degenerate", "empty"}
        assert set(df[f"{side}_correct"]) <= {"0", "1"}
    assert set(df["finetuned_vs_base"]) <= {"win", "tie", "loss"}
    marking = pd.read_csv(paths["marking"], encoding="utf-8-sig", keep_default_na=False, dtype=str)
    assert list(marking.columns) == ["id", "type", "question", "reference", "base_answer", "finetuned_answer", "winner"]
    assert (marking["winner"] == "").all()
    summary = json.loads(paths["summary"].read_text())
    assert list(summary)[0] == "verdict" and summary["verdict"] == "no clear difference"
    assert "too few" in summary["evidence"]["reason"]  # 5 questions can never make a verdict
    assert set(summary["by_type"]) == {q["type"] for q in QUESTIONS} | {"all"}
    assert summary["by_type"]["all"]["n"] == len(QUESTIONS)
    assert summary["timing"]["mode"] == "reference"
    assert summary["system_prompt"] == DEFAULT_SYSTEM_PROMPT
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = list(csv.DictReader(open(paths["csv"], encoding="utf-8-sig", newline="")))
    orig = {q["id"]: q for q in QUESTIONS}
    # the formula-looking question and the multi-line reference survive in both readers
    written = [{**r, "question": orig[r["id"]]["question"], "reference": orig[r["id"]]["reference"]} for r in rows]
    check_spreadsheet(paths["csv"], written, list(rows[0]), tmp_path, text_cols=list(rows[0])[:6])


def test_finished_outputs_need_overwrite(evaluated, tiny_run, capsys, monkeypatch):
    args = ["--adapter", str(tiny_run), "--questions", str(evaluated["questions"]), "--out", str(evaluated["out"]),
            "--max_new_tokens", str(TOKENS)]
    assert ec.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(ec, "load_run_base", lambda *a, **k: calls.append(1))
    assert ec.main(args + ["--overwrite"]) == 0  # everything cached: no model load at all
    assert calls == []


@pytest.mark.numerics
def test_resume_after_interrupt(tiny_run, tmp_path, monkeypatch, capsys):
    """Killed after 2 of 4 base answers: the rerun generates only the 6 missing answers."""
    qcsv = tmp_path / "questions.csv"
    qcsv.write_text("question\nWhat is proposed?\nWhy four bits?\nWhich benchmarks?\nHow many layers?\n",
                    encoding="utf-8")
    out = tmp_path / "res" / "evaluation.csv"
    argv = ["--adapter", str(tiny_run), "--questions", str(qcsv), "--out", str(out), "--mode", "fast",
            "--batch_size", "1", "--max_new_tokens", "6"]
    real = generate_batch
    calls = []

    def dying(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ec, "generate_batch", dying)
    assert ec.main(argv) == 130
    assert "resume" in capsys.readouterr().err
    assert not out.exists()
    cached = read_jsonl_tolerant(ec.output_paths(out)["cache"])
    assert len(cached) == 2 and {r["model"] for r in cached} == {"base"}

    calls.clear()
    monkeypatch.setattr(ec, "generate_batch", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    assert ec.main(argv) == 0
    assert sum(calls) == 4 * 2 - 2
    assert "cached answers: base 2, fine-tuned 0" in capsys.readouterr().out
    summary = json.loads(ec.output_paths(out)["summary"].read_text())
    assert summary["timing"]["mode"] == "fast" and summary["by_type"]["unknown"]["n"] == 4
    assert summary["by_type"]["all"]["base"]["token_f1"] is None  # no reference column: no F1


def test_judge_both_orders(evaluated, tiny_run, tmp_path, openai_server, monkeypatch):
    """The judge sees each pair twice (A/B swapped) with the abstract; a content-based judge gives a
    consistent winner, a position-biased judge ("always A") cancels to a tie."""
    import pandas as pd

    out = tmp_path / "j" / "evaluation.csv"
    out.parent.mkdir()
    shutil.copy(evaluated["paths"]["cache"], ec.output_paths(out)["cache"])  # reuse answers: no generation
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-42")

    def pick(req, n):
        text = req["messages"][-1]["content"]
        a = text.split("\nAnswer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
        b = text.split("\n\nAnswer B:\n", 1)[1]
        w = "tie" if a == b else ("A" if a > b else "B")
        return ec_reply(json.dumps({"winner": w, "reason": f"picked {w}"}))

    openai_server.responder = pick
    argv = ["--adapter", str(tiny_run), "--questions", str(evaluated["questions"]), "--out", str(out),
            "--max_new_tokens", str(TOKENS), "--judge_model", "fake-model", "--judge_base_url", openai_server.base_url,
            "--judge_rubric", "none", "--no-judge_claims"]  # the pairwise judge alone
    assert ec.main(argv) == 0
    assert openai_server.count == 2 * len(QUESTIONS)
    raw = {(r["id"], r["model"]): r["answer"] for r in read_jsonl_tolerant(ec.output_paths(out)["cache"])
           if r["model"] != "judge"}
    shown_first: dict[str, list[str]] = {}
    for req in openai_server.requests:
        user = req["messages"][-1]["content"]
        assert req["model"] == "fake-model" and req["temperature"] == 0
        q = next(q for q in QUESTIONS if f"Question: {q['question']}" in user)
        assert q["context"] in user and q["reference"] in user  # grounded in the abstract
        shown_first.setdefault(q["id"], []).append(user.split("\nAnswer A:\n", 1)[1].split("\n\nAnswer B:\n")[0])
    df = pd.read_csv(out, encoding="utf-8-sig", keep_default_na=False, dtype=str)
    for _, r in df.iterrows():
        b, f = raw[r["id"], "base"], raw[r["id"], "finetuned"]
        assert sorted(shown_first[r["id"]]) == sorted([b, f])  # each answer shown first once
        expected = "tie" if b == f else ("base" if b > f else "finetuned")
        assert r["judge_winner"] == expected and r["judge_consistent"] == "1"
        assert "[base shown first" in r["judge_reason"]
    summary = json.loads(ec.output_paths(out)["summary"].read_text())
    pw = summary["judge"]["pairwise"]
    assert pw["n"] == len(QUESTIONS) and pw["failed"] == 0
    assert pw["finetuned"] + pw["base"] + pw["tie"] == pytest.approx(1.0)
    for p in out.parent.iterdir():
        assert b"sk-test-secret-42" not in p.read_bytes(), f"API key leaked into {p}"

    # position-biased judge: verdicts are cached per order, so a new judge model name forces new calls
    openai_server.responder = lambda req, n: ec_reply('{"winner": "A", "reason": "first is better"}')
    argv[argv.index("fake-model")] = "biased-model"
    assert ec.main(argv + ["--overwrite"]) == 0
    df = pd.read_csv(out, encoding="utf-8-sig", keep_default_na=False, dtype=str)
    assert set(df["judge_winner"]) == {"tie"} and set(df["judge_consistent"]) == {"0"}


def ec_reply(content: str):
    from fake_openai import Reply

    return Reply(content=content)


# --------------------------------------------------------------------------- fast path == reference
def both_paths(run_dir: Path, max_new_tokens: int = 12) -> dict:
    """Logits and greedy outputs of the reference path (4-bit + PEFT adapter, base via disable_adapter)
    and the fast path (dequantised dense base, then merge_and_unload), on the same prompts and batch."""
    import torch

    run = read_run(run_dir)
    tok = run_tokenizer(run)
    prompts = [prompt_ids(tok, q["question"], run.system_prompt) for q in QUESTIONS]
    dec = Decoding(max_new_tokens=max_new_tokens)
    r: dict = {"prompts": prompts}
    ref = attach_adapter(load_run_base(run), run.adapter)
    ids, mask = left_pad(prompts, tok.pad_token_id, next(ref.parameters()).device)
    keep = mask.bool()

    def logits(model):
        return model(input_ids=ids, attention_mask=mask).logits.float()[keep].cpu()

    def greedy(model, d=dec):
        return [x[2] for x in generate_batch(model, tok, prompts, d)]

    dynamic = Decoding(max_new_tokens=max_new_tokens, cache="dynamic")
    with torch.no_grad():
        with ref.disable_adapter():
            r["ref_base_logits"], r["ref_base"] = logits(ref), greedy(ref)
        r["ref_ft_logits"], r["ref_ft"] = logits(ref), greedy(ref)
        fast = load_run_base(run)
        dequantize_(fast)
        assert not any("4bit" in type(m).__name__ for m in fast.modules())
        r["base_logits"], r["base"], r["base_dynamic"] = logits(fast), greedy(fast), greedy(fast, dynamic)
        fast = merged_model(run, fast)
        assert not any("lora" in n for n, _ in fast.named_parameters())
        r["ft_logits"], r["ft"], r["ft_dynamic"] = logits(fast), greedy(fast), greedy(fast, dynamic)
    r["ref_model"], r["fast_model"] = ref, fast
    return r


def check_fast_path(r: dict, dtype) -> dict:
    """The promises of the fast path against the reference, in `dtype`: logits within the kernels' rounding
    tolerance (numerics.logit_tolerance, at the precision the 4-bit kernels really compute in), greedy answers
    the same except at the reference's near-ties, and the adapter's effect far above the tolerance (so agreement
    is not vacuous). Returns the figures."""
    ref = r["ref_model"]
    tol = logit_tolerance(ref, four_bit_dtype(ref, dtype), r["ref_ft_logits"].abs().max().item())
    f = {"tol": tol, "base_diff": (r["base_logits"] - r["ref_base_logits"]).abs().max().item(),
         "ft_diff": (r["ft_logits"] - r["ref_ft_logits"]).abs().max().item(),
         "effect": (r["ref_ft_logits"] - r["ref_base_logits"]).abs().max().item()}
    assert f["base_diff"] <= tol and f["ft_diff"] <= tol and 10 * tol < f["effect"], f
    prompts = r["prompts"]
    f["split"] = assert_greedy_agrees(ref, prompts, r["base"], r["ref_base"], tol, ref_ctx=ref.disable_adapter)
    f["split"] += assert_greedy_agrees(ref, prompts, r["base_dynamic"], r["ref_base"], tol, ref_ctx=ref.disable_adapter)
    f["split"] += assert_greedy_agrees(ref, prompts, r["ft"], r["ref_ft"], tol)
    f["split"] += assert_greedy_agrees(r["fast_model"], prompts, r["ft_dynamic"], r["ft"], tol)
    assert r["ft"] != r["base"]  # and the adapter does change the answers
    # teacher-forced on the reference's greedy tokens, the fast path picks the same token wherever the
    # reference's choice is clear by more than twice the tolerance
    clear = agree = 0
    for p, ids in zip(prompts, r["ref_ft"]):
        ref_l, fast_l = teacher_forced_logits(ref, p, ids), teacher_forced_logits(r["fast_model"], p, ids)
        assert (ref_l - fast_l).abs().max().item() <= tol
        top = ref_l.topk(2, dim=-1).values
        sel = (top[:, 0] - top[:, 1]) > 2 * tol
        clear += int(sel.sum())
        agree += int((ref_l.argmax(-1) == fast_l.argmax(-1))[sel].sum())
    assert clear >= 5 and agree == clear, (agree, clear)
    f.update(clear=clear, agree=agree)
    print(f"fast vs reference ({dtype}): {f}")
    return f


@pytest.mark.numerics
def test_fast_path_matches_reference_fp32(tiny_model, tmp_path):
    """Computing in fp32 the merge is exact to float rounding: this checks the fast path's logic (every 4-bit
    layer dequantised right, LoRA scaling, merge) to fp32's tolerance, and that --cache dynamic agrees."""
    import torch

    check_fast_path(both_paths(make_run(tiny_model, tmp_path / "fp32-run", bf16=False)), torch.float32)


@pytest.mark.numerics
def test_fast_path_matches_reference_bf16(tiny_run):
    """The production dtype: the merge rounds W + BA to bf16 once and our decoding loop's attention rounds
    differently from SDPA's (fp32 softmax over bf16 scores), so greedy text may leave the reference's only
    where the reference itself nearly tied."""
    import torch

    check_fast_path(both_paths(tiny_run), torch.bfloat16)


# --------------------------------------------------------------------------- inputs
def test_read_questions_csv_and_jsonl(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("\ufeffQuestion , Reference,TYPE\n\"Multi\nline?\",ref,Factual\nSecond?,,\n", encoding="utf-8")
    qs = ec.read_questions(p)
    assert [(q["id"], q["question"], q["reference"], q["type"]) for q in qs] == [
        ("q1", "Multi\nline?", "ref", "factual"), ("q2", "Second?", "", "unknown")]
    qs = ec.read_questions(write_questions(tmp_path / "q.jsonl"))
    assert [q["id"] for q in qs] == [q["id"] for q in QUESTIONS] and qs[0]["context"]


@pytest.mark.parametrize("case,content,message", [
    ("no_question_column", ("q.csv", "prompt,reference\nWhat?,x\n"), "no 'question' column"),
    ("empty_csv", ("q.csv", ""), "no 'question' column"),
    ("header_only_csv", ("q.csv", "question,reference\n"), "no questions"),
    ("empty_jsonl", ("q.jsonl", "\n\n"), "no questions"),
    ("malformed_jsonl", ("q.jsonl", '{"question": "ok"}\n{"question": "broken"\n'), "q.jsonl:2: malformed JSON"),
    ("jsonl_without_question", ("q.jsonl", '{"question": "ok"}\n{"prompt": "x"}\n'), "q.jsonl:2: missing or empty 'question'"),
    ("missing_file", None, "questions file not found"),
    ("unknown_set", ("q.jsonl", '{"question": "ok", "set": "unseen"}\n{"question": "b", "set": "training"}\n'),
     "q.jsonl:2: 'set' is 'training'; use one of unseen, knowledge"),
])
def test_bad_questions_exit_2(case, content, message, tiny_run, tmp_path, capsys):
    path = tmp_path / "missing.jsonl"
    if content:
        path = tmp_path / content[0]
        path.write_text(content[1], encoding="utf-8")
    rc = ec.main(["--adapter", str(tiny_run), "--questions", str(path), "--out", str(tmp_path / "o" / "e.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_bad_adapter_exit_2(tmp_path, capsys):
    q = write_questions(tmp_path / "q.jsonl")
    assert ec.main(["--adapter", str(tmp_path / "nope"), "--questions", str(q)]) == 2
    assert "adapter folder not found" in capsys.readouterr().err
    (tmp_path / "notarun").mkdir()
    assert ec.main(["--adapter", str(tmp_path / "notarun"), "--questions", str(q)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert ec.main(["--adapter", str(tmp_path / "nope"), "--questions", str(q), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


def test_judge_needs_key(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    q = write_questions(tmp_path / "q.jsonl")
    assert ec.main(["--adapter", str(tiny_run), "--questions", str(q), "--judge_model", "m"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err


def test_run_config_resolution(tiny_run, tmp_path):
    run = read_run(tiny_run)
    assert run.base_model and run.dtype == "bfloat16" and run.adapter_sha
    assert read_run(tiny_run, "other/base").base_model == "other/base"
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    (bare / "run_config.json").unlink()
    assert read_run(bare).base_model == json.loads((bare / "adapter_config.json").read_text())["base_model_name_or_path"]
    custom = make_run(Path(run.base_model), tmp_path / "custom", system_prompt="Answer in one word.")
    assert read_run(custom).system_prompt == "Answer in one word."
    cfg = json.loads((custom / "run_config.json").read_text())
    for flags, dtype in (({"bf16": None}, "bfloat16"), ({"bf16": False}, "float32"), ({"bf16": None, "fp16": True}, "float16")):
        cfg["args"].update(flags)
        (custom / "run_config.json").write_text(json.dumps(cfg))
        assert read_run(custom).dtype == dtype  # what training's --bf16/--fp16 asked for (loading.requested_precision)


def test_run_folder_samples_are_the_unseen_set_and_the_missing_set_is_named(tiny_run, tmp_path, capsys):
    """No questions file beside the training data: the run folder's held-out samples are asked, as the 'unseen'
    set, and one line says the 'knowledge' set is missing."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    held = [{k: v for k, v in q.items() if k != "set"} for q in QUESTIONS]
    write_questions(run / "eval_questions.jsonl", held)
    out = tmp_path / "o" / "evaluation.csv"
    assert ec.main(["--adapter", str(run), "--out", str(out), "--max_new_tokens", "4", "--n", "3"]) == 0
    printed = capsys.readouterr()
    assert sum("the 'knowledge' set (new questions about papers in training) is missing" in line
               for line in printed.out.splitlines()) == 1
    assert "name no evaluation set" not in printed.err  # they are known to be unseen: no note
    summary = json.loads(out.with_name("summary.json").read_text())
    assert list(summary["sets"]) == ["unseen"] and summary["sets"]["unseen"]["n"] == 3
    assert summary["sets_missing"] == ["knowledge"]
