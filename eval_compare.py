"""Did fine-tuning help? Answer held-out questions with the base model and the fine-tuned adapter,
score both, and write a spreadsheet a person can check.

    python eval_compare.py                                     # models/zephyr-7b-qlora on data/eval_questions.jsonl
    python eval_compare.py --adapter models/my-run --n 20 --out outputs/my-run/evaluation.csv
    python eval_compare.py --judge_model gpt-4o-mini           # + pairwise LLM judge (key: OPENAI_API_KEY)
    python eval_compare.py --mode reference --batch_size 1     # the seed's way: 4-bit + LoRA, one at a time

One model load serves both sides. The base is loaded in 4-bit exactly as training loaded it. Then:
  fast path (auto on a CUDA GPU with room for bf16 weights): dequantise the 4-bit weights to bf16 --
    the very values training's forward pass computed with -- answer as the base, merge the LoRA into
    those weights (PEFT merge_and_unload) and answer as the fine-tuned model;
  reference path (CPU, small GPUs): 4-bit + PEFT adapter, base answers under `disable_adapter()`.
On an H100 the fast path answers 100 questions x 2 models x 256 tokens of a 7B model in 50 s, load
included, ~190x the seed's per-token speed (bench/README.md); on the tiny test model it gives the same
greedy tokens as the reference path in fp32 and logits within 0.03 in bf16 (tests/test_eval_compare.py).
Both sides use the training chat template (common.qa_messages -> common.chat_text), the same decoding,
and batched generation with left padding. Answers go to an append-only cache next to the output
(<out stem>.cache.jsonl, keyed by question, prompt, model and decoding), so an interrupted run resumes
where it stopped; delete the cache to force regeneration.

Writes <out> (one row per question: answers, token-F1, ROUGE-L, refusal, false-premise correction,
length, judge verdict), <out stem>_for_marking.csv (empty `winner` column), summary.json and
results_bar.png beside it, and prints a summary by question type. The CSVs are spreadsheet-safe:
UTF-8 with BOM, cells that a spreadsheet would run as a formula get a leading apostrophe.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (DEFAULT_SYSTEM_PROMPT, InputError, append_jsonl, atomic_write_text, chat_text,
                    check_outputs_free, corrects_premise, encode_text, is_refusal, nf4_config, qa_messages,
                    read_jsonl, read_jsonl_tolerant, run_main, sha256_file, sha256_text, write_json_atomic)

DEFAULT_ADAPTER = "models/zephyr-7b-qlora"
DEFAULT_QUESTIONS = "data/eval_questions.jsonl"
DEFAULT_OUT = "outputs/evaluation.csv"
TYPES = ("factual", "conceptual", "methodology", "unanswerable", "false_premise")
SIDES = (("base", "base"), ("finetuned", "ft"))  # (cache/model name, column prefix)


# --------------------------------------------------------------------------- questions
def read_questions(path: Path) -> list[dict]:
    """Questions from JSONL ({"id","question","reference","type","paper_id","context"}) or CSV
    (header with question[,reference,type,id,context]). InputError names file:line on bad input."""
    if not path.is_file():
        raise InputError(f"{path}: questions file not found; create it with generate_qa.py or pass --questions")
    rows: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
            if "question" not in fields:
                raise InputError(f"{path}: no 'question' column (header: {fields or 'empty'}); the first row "
                                 "must name the columns, e.g. question,reference,type")
            reader.fieldnames = fields
            for rec in reader:
                rows.append((f"{path}:{reader.line_num}", {k: v for k, v in rec.items() if k}))
    else:
        for lineno, rec in read_jsonl(path):
            rows.append((f"{path}:{lineno}", rec))
    if not rows:
        raise InputError(f"{path}: no questions in the file")
    out, seen = [], {}
    for i, (where, rec) in enumerate(rows, 1):
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{where}: missing or empty 'question'")
        qid = str(rec.get("id") or "").strip() or f"q{i}"
        if qid in seen and seen[qid] != q:
            raise InputError(f"{where}: id {qid!r} already used by another question; ids must be unique")
        seen[qid] = q
        out.append({"id": qid, "question": q.strip(), "reference": str(rec.get("reference") or "").strip(),
                    "type": str(rec.get("type") or "").strip().lower() or "unknown",
                    "paper_id": str(rec.get("paper_id") or ""), "context": str(rec.get("context") or "")})
    return out


# --------------------------------------------------------------------------- run folder and model
@dataclass
class Run:
    adapter: Path
    base_model: str
    args: dict = field(default_factory=dict)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    dtype: str = "bfloat16"         # compute dtype of training
    adapter_sha: str = ""


def read_run(adapter: str | Path, base_model: str | None = None) -> Run:
    """Everything later stages need from a run folder (models/<run>/), checked up front."""
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise InputError(f"{adapter}: adapter folder not found; train one with train_qlora_hf.py "
                         "or pass --adapter models/<run>")
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"{adapter}: no adapter_config.json here; --adapter must be a run folder "
                         "written by train_qlora_hf.py (PEFT save_pretrained)")

    def load_json(p: Path) -> dict:
        try:
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: malformed JSON ({e.msg} at line {e.lineno})") from None

    cfg, acfg = load_json(adapter / "run_config.json"), load_json(adapter / "adapter_config.json")
    args = cfg.get("args") or {}
    base = base_model or cfg.get("base_model") or acfg.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{adapter}: cannot tell the base model (no run_config.json base_model, no "
                         "adapter_config.json base_model_name_or_path); pass --base_model")
    # train_qlora_hf.resolve_precision: --fp16 wins, --no-bf16 means fp32, otherwise bf16 (fp16 on GPUs
    # without bf16, which torch_dtype() repeats here)
    dtype = "float16" if args.get("fp16") else "float32" if args.get("bf16") is False else "bfloat16"
    weights = adapter / "adapter_model.safetensors"
    return Run(adapter=adapter, base_model=str(base), args=args,
               system_prompt=args.get("system_prompt") or DEFAULT_SYSTEM_PROMPT, dtype=dtype,
               adapter_sha=sha256_file(weights) if weights.is_file() else "")


def load_tokenizer(run: Run):
    from transformers import AutoTokenizer

    src = run.adapter if (run.adapter / "tokenizer_config.json").is_file() else run.base_model
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer from {src}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def torch_dtype(run: Run):
    import torch

    dtype = getattr(torch, run.dtype)
    if dtype is torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        print("warning: this GPU has no bf16; computing in fp16", file=sys.stderr)
        dtype = torch.float16
    return dtype


def load_base(run: Run):
    """The base model as training loads it (train_qlora_hf.load_model): NF4, double quant, the training
    compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(run)
    kw: dict = {"dtype": dtype, "quantization_config": nf4_config(dtype)}
    if torch.cuda.is_available():
        kw["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(run.base_model, **kw)
    except OSError as e:
        raise InputError(f"cannot load base model {run.base_model}: {e}; pass --base_model") from None
    model.eval()
    return model


def dequantize_(model) -> None:
    """Replace every bnb Linear4bit by an nn.Linear holding bnb.functional.dequantize_4bit(weight) in the
    compute dtype: bit for bit the matrix the 4-bit layer multiplies by in training and inference."""
    if getattr(model, "hf_quantizer", None) is None:
        return  # already dense
    import torch

    model.dequantize(dtype=model.dtype)  # transformers' dequantize_and_replace; drops quantization_config
    model.is_loaded_in_4bit = False
    for p in model.parameters():
        p.requires_grad_(False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attach_adapter(model, run: Run):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(run.adapter), is_trainable=False).eval()


def merged_model(run: Run, model=None):
    """Dense model with the LoRA merged in: base (dequantised if it was 4-bit) + merge_and_unload."""
    model = model if model is not None else load_base(run)
    dequantize_(model)
    return attach_adapter(model, run).merge_and_unload()


def bytes_to_dequantize(model) -> int:
    """Extra device memory the fast path needs: dense weights minus the packed 4-bit ones."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    extra = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            packed = m.weight.data.numel() * m.weight.data.element_size()
            extra += m.in_features * m.out_features * model.dtype.itemsize - packed
    return extra


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def free_cuda_bytes() -> int:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def choose_mode(requested: str, model, n_seqs: int, seq_len: int) -> str:
    """auto: fast when a CUDA GPU has room for the dense weights plus the KV cache of a few batches."""
    import torch

    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "reference"
    need = bytes_to_dequantize(model) + kv_bytes_per_token(model) * seq_len * min(n_seqs, 16) + (2 << 30)
    return "fast" if free_cuda_bytes() > need else "reference"


def auto_batch_size(model, n: int, seq_len: int) -> int:
    import torch

    if not torch.cuda.is_available():
        return min(n, 8)
    # KV cache and activations of a batch stay within half of what is free: the rest is headroom.
    per_seq = kv_bytes_per_token(model) * seq_len * 2
    return max(1, min(n, 256, int(free_cuda_bytes() * 0.5 // per_seq)))


# --------------------------------------------------------------------------- generation
@dataclass
class Decoding:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    cache: str = "static"           # KV cache allocated once per batch; "dynamic" grows (and allocates) per step
    compile: bool = False           # torch.compile the decoding step (needs the static cache)

    def key(self) -> dict:
        k = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            k.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return k

    def kwargs(self, tokenizer) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if self.min_new_tokens:
            kw["min_new_tokens"] = self.min_new_tokens
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:  # silence the model's own sampling defaults, which greedy decoding ignores
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.cache == "static" or self.compile:
            kw["cache_implementation"] = "static"
            # transformers compiles the decoding step whenever the cache is static on a GPU, unless told not to
            kw["disable_compile"] = not self.compile
        return kw


def prompt_ids(tokenizer, question: str, system: str) -> list[int]:
    """Exactly the training format: system + user turns, then the assistant header."""
    text = chat_text(tokenizer, qa_messages(question, system=system), add_generation_prompt=True)
    return encode_text(tokenizer, text)


def left_pad(batch: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids.to(device), mask.to(device)


def generate_batch(model, tokenizer, batch: list[list[int]], dec: Decoding) -> list[tuple[str, int, list[int]]]:
    """Greedy/sampled answers for a batch of prompt ids: [(text, generated tokens incl. EOS, token ids)]."""
    import torch

    ids, mask = left_pad(batch, tokenizer.pad_token_id, next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **dec.kwargs(tokenizer))
    eos = tokenizer.eos_token_id
    results = []
    for row in out[:, ids.shape[1]:].tolist():
        n = row.index(eos) + 1 if eos in row else len(row)
        results.append((tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n, row[:n]))
    return results


class AnswerCache:
    """Append-only JSONL of generated answers (and judge verdicts), keyed so a rerun reuses them."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:  # a kill can leave a torn last line: start the next one clean
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self.data = {r["key"]: r for r in read_jsonl_tolerant(path) if "key" in r}

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, record: dict) -> None:
        append_jsonl(self.path, record)
        self.data[record["key"]] = record


def answer_key(q: dict, prompt: list[int], model_name: str, dec: Decoding) -> str:
    return sha256_text(json.dumps({"id": q["id"], "prompt": sha256_text(json.dumps(prompt)), "model": model_name,
                                   "decoding": dec.key()}, sort_keys=True))[:32]


def generate_missing(model, tokenizer, todo: list[tuple[str, dict, list[int]]], side: str, dec: Decoding,
                     batch_size: int, cache: AnswerCache) -> dict:
    """Generate answers for (key, question, prompt ids) not yet cached, longest prompts first, writing
    each batch to the cache as soon as it is done. Returns timing for the summary."""
    from tqdm import tqdm
    from transformers import set_seed

    todo = sorted(todo, key=lambda t: -len(t[2]))
    tokens, t0 = 0, time.perf_counter()
    for start in tqdm(range(0, len(todo), batch_size), desc=f"{side} answers", unit="batch", disable=not todo):
        chunk = todo[start:start + batch_size]
        if dec.do_sample:
            set_seed(dec.seed + start)
        for (key, q, _), (text, n, _) in zip(chunk, generate_batch(model, tokenizer, [c[2] for c in chunk], dec)):
            cache.put({"key": key, "id": q["id"], "model": side, "answer": text, "new_tokens": n})
            tokens += n
    _sync()
    return {"questions": len(todo), "new_tokens": tokens, "seconds": round(time.perf_counter() - t0, 3)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- scores
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NON_WORD = re.compile(r"[^0-9a-z]+")
def normalize_tokens(text: str) -> list[str]:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, split on whitespace."""
    return _ARTICLES.sub(" ", _NON_WORD.sub(" ", text.lower())).split()


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_tokens(pred), normalize_tokens(ref)
    if not p or not r:
        return float(p == r)
    common: dict[str, int] = {}
    for t in r:
        common[t] = common.get(t, 0) + 1
    overlap = 0
    for t in p:
        if common.get(t, 0) > 0:
            overlap += 1
            common[t] -= 1
    if not overlap:
        return 0.0
    prec, rec = overlap / len(p), overlap / len(r)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on lower-cased alphanumeric tokens (rouge-score's default tokenizer, no stemming)."""
    p, r = _NON_WORD.sub(" ", pred.lower()).split(), _NON_WORD.sub(" ", ref.lower()).split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)  # LCS by dynamic programming, one row at a time
    for tp in p:
        cur = [0]
        for j, tr in enumerate(r, 1):
            cur.append(prev[j - 1] + 1 if tp == tr else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def score_answer(answer: str, q: dict) -> dict:
    """Per-answer scores. behaviour_ok: refusal for unanswerable, correction for false_premise, a real
    answer (no refusal) for every answerable type."""
    refused = is_refusal(answer)
    s = {"token_f1": token_f1(answer, q["reference"]) if q["reference"] else None,
         "rougeL": rouge_l(answer, q["reference"]) if q["reference"] else None,
         "refusal": int(refused), "premise_corrected": None, "words": len(answer.split())}
    if q["type"] == "unanswerable":
        s["behaviour_ok"] = int(refused)
    elif q["type"] == "false_premise":
        s["premise_corrected"] = int(corrects_premise(answer))
        s["behaviour_ok"] = s["premise_corrected"]
    else:
        s["behaviour_ok"] = int(not refused)
    return s


METRICS = ("token_f1", "rougeL", "refusal", "premise_corrected", "behaviour_ok", "words")


# --------------------------------------------------------------------------- judge
JUDGE_SYSTEM = (
    "You compare two answers to a question about a scientific paper. Judge only against the paper's "
    "abstract: prefer the answer that is correct and supported by it; if the abstract does not contain the "
    "answer, prefer the answer that says so; if the question rests on a false premise, prefer the answer "
    "that corrects it. Ignore length and style. Reply with JSON only: "
    '{"winner": "A" | "B" | "tie", "reason": "<one sentence>"}'
)


def judge_prompt(q: dict, a: str, b: str) -> str:
    ref = f"\n\nReference answer (written from the abstract): {q['reference']}" if q["reference"] else ""
    return (f"Abstract:\n{q['context'] or '(not available)'}\n\nQuestion: {q['question']}{ref}\n\n"
            f"Answer A:\n{a}\n\nAnswer B:\n{b}")


def parse_verdict(text: str | None) -> tuple[str, str]:
    text = text or ""
    m = re.search(r"\{.*\}", text, re.DOTALL)
    if m:
        try:
            obj = json.loads(m.group(0))
            w = str(obj.get("winner", "")).strip().strip('"').upper()
            if w in ("A", "B", "TIE"):
                return w.lower() if w == "TIE" else w, str(obj.get("reason", "")).strip()
        except json.JSONDecodeError:
            pass
    m = re.search(r"winner\W+(A|B|tie)\b", text, re.IGNORECASE)
    if m:
        w = m.group(1).upper()
        return ("tie" if w == "TIE" else w), text.strip()[:300]
    return "tie", f"unparseable judge reply: {text.strip()[:200]!r}"


def combine_verdicts(base_first: str, ft_first: str) -> tuple[str, bool]:
    """Two orders -> one winner. base_first: A=base,B=ft; ft_first: A=ft,B=base. Consistent votes win;
    a vote against a tie wins; opposite votes cancel to a tie (the position bias the swap exposes)."""
    v1 = {"A": "base", "B": "finetuned"}.get(base_first, "tie")
    v2 = {"A": "finetuned", "B": "base"}.get(ft_first, "tie")
    if v1 == v2:
        return v1, True
    if "tie" in (v1, v2):
        return (v1 if v2 == "tie" else v2), False
    return "tie", False


def run_judge(rows: list[dict], questions: dict, args, cache: AnswerCache) -> None:
    """Fill judge_winner / judge_reason / judge_consistent on each row (cached, both answer orders)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from tqdm import tqdm

    client = openai.OpenAI(base_url=args.judge_base_url, api_key=os.environ["OPENAI_API_KEY"], max_retries=6,
                           timeout=120)

    def one(row: dict, order: str) -> tuple[str, str]:
        q = questions[row["id"]]
        a, b = ((row["base_answer"], row["finetuned_answer"]) if order == "base_first"
                else (row["finetuned_answer"], row["base_answer"]))
        key = sha256_text(json.dumps({"judge": args.judge_model, "url": args.judge_base_url or "", "q": q["question"],
                                      "ctx": q["context"], "ref": q["reference"], "a": a, "b": b}, sort_keys=True))[:32]
        hit = cache.get(key)
        if hit is None:
            resp = client.chat.completions.create(
                model=args.judge_model, temperature=0, max_tokens=300,
                messages=[{"role": "system", "content": JUDGE_SYSTEM},
                          {"role": "user", "content": judge_prompt(q, a, b)}])
            winner, reason = parse_verdict(resp.choices[0].message.content)
            hit = {"key": key, "id": row["id"], "model": "judge", "order": order, "winner": winner, "reason": reason}
            cache.put(hit)
        return hit["winner"], hit["reason"]

    jobs = [(row, order) for row in rows for order in ("base_first", "ft_first")]
    with ThreadPoolExecutor(max_workers=max(1, args.judge_workers)) as pool:
        verdicts = list(tqdm(pool.map(lambda j: one(*j), jobs), total=len(jobs), desc="judge", unit="call"))
    for i, row in enumerate(rows):
        (w1, r1), (w2, r2) = verdicts[2 * i], verdicts[2 * i + 1]
        row["judge_winner"], row["judge_consistent"] = combine_verdicts(w1, w2)
        row["judge_consistent"] = int(row["judge_consistent"])
        row["judge_reason"] = f"[base shown first: {w1}] {r1} | [fine-tuned shown first: {w2}] {r2}"


# --------------------------------------------------------------------------- outputs
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")  # + full-width forms


def safe_cell(v):
    """OWASP CSV-injection guidance: text a spreadsheet would run as a formula gets a leading apostrophe.
    Line breaks inside text become \\n (what spreadsheets store; a lone \\r would come back as \\n anyway),
    other control characters (no spreadsheet keeps them) U+FFFD. None/NaN become empty cells; numbers stay numbers."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, str):
        if v.startswith(FORMULA_START):
            v = "'" + v
        return _CONTROL_RE.sub("\ufffd", v.replace("\r\n", "\n").replace("\r", "\n"))
    return v


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """UTF-8-with-BOM CSV text (Excel reads accents right), every cell made safe, embedded newlines quoted."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([safe_cell(r.get(c)) for c in columns])
    return "\ufeff" + buf.getvalue()


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    atomic_write_text(path, csv_text(rows, columns))


def result_columns(judge: bool) -> list[str]:
    cols = ["id", "type", "question", "reference", "base_answer", "finetuned_answer"]
    for m in METRICS:
        cols += [f"base_{m}", f"ft_{m}"]
    cols += ["base_new_tokens", "ft_new_tokens"]
    if judge:
        cols += ["judge_winner", "judge_consistent", "judge_reason"]
    return cols


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def summarize(rows: list[dict]) -> dict:
    """Means per question type (and `all`) for each metric and side; judge win rates when judged."""
    types = [t for t in TYPES if any(r["type"] == t for r in rows)]
    types += sorted({r["type"] for r in rows} - set(types))
    out = {}
    for t in types + ["all"]:
        sel = [r for r in rows if t == "all" or r["type"] == t]
        s: dict = {"n": len(sel)}
        for m in METRICS:
            s[m] = {"base": _mean([r[f"base_{m}"] for r in sel]), "finetuned": _mean([r[f"ft_{m}"] for r in sel])}
        if sel and "judge_winner" in sel[0]:
            s["judge"] = {w: round(sum(r["judge_winner"] == w for r in sel) / len(sel), 4)
                          for w in ("base", "finetuned", "tie")}
        out[t] = s
    return out


def summary_table(by_type: dict) -> str:
    """Plain-text table, one row per type: base and fine-tuned side by side for each metric."""
    spec = [("F1", "token_f1", "{:.3f}"), ("ROUGE-L", "rougeL", "{:.3f}"), ("ok%", "behaviour_ok", "{:.0%}"),
            ("refusal%", "refusal", "{:.0%}"), ("words", "words", "{:.1f}")]
    header = ["type", "n"] + [f"{name} {side}" for name, _, _ in spec for side in ("base", "ft")]
    judged = any("judge" in s for s in by_type.values())
    if judged:
        header += ["judge ft/base/tie"]
    table = [header]
    for t, s in by_type.items():
        row = [t, str(s["n"])]
        for _, m, f in spec:
            row += ["-" if s[m][side] is None else f.format(s[m][side]) for side in ("base", "finetuned")]
        if judged:
            j = s.get("judge") or {}
            row.append("/".join(f"{j.get(w, 0):.0%}" for w in ("finetuned", "base", "tie")))
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\nok% = expected behaviour: answered (answerable), refused (unanswerable), " \
        "premise corrected (false_premise)"


def plot_results(by_type: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:  # a bare GPU box: the numbers are in the CSV and summary.json anyway
        print(f"warning: matplotlib is not installed; {path} not drawn (pip install matplotlib)", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("token_f1", "token-F1"), ("rougeL", "ROUGE-L"), ("behaviour_ok", "expected behaviour rate"),
              ("refusal", "refusal rate")]
    labels = list(by_type)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (m, title) in zip(axes, panels):
        xs = range(len(labels))
        for off, side, color in ((-0.2, "base", "#9aa5b1"), (0.2, "finetuned", "#2f6fdf")):
            vals = [by_type[t][m][side] or 0.0 for t in labels]
            ax.bar([x + off for x in xs], vals, width=0.4, label=side, color=color)
        ax.set_title(title)
        ax.set_xticks(list(xs), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle("base vs fine-tuned, by question type")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def output_paths(out: Path) -> dict[str, Path]:
    return {"csv": out, "marking": out.with_name(f"{out.stem}_for_marking.csv"),
            "summary": out.with_name("summary.json"), "plot": out.with_name("results_bar.png"),
            "cache": out.with_name(f"{out.stem}.cache.jsonl")}


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--adapter", default=DEFAULT_ADAPTER, help="run folder from train_qlora_hf.py (default: %(default)s)")
    a("--base_model", default=None, help="base model (default: run_config.json base_model, else the adapter's)")
    a("--questions", default=DEFAULT_QUESTIONS,
      help="JSONL, or CSV with question[,reference,type] (default: %(default)s)")
    a("--n", type=int, default=None, help="evaluate only the first N questions (default: all)")
    a("--out", default=DEFAULT_OUT, help="results CSV; the other outputs go beside it (default: %(default)s)")
    a("--max_new_tokens", type=int, default=256, help="answer length limit (default: %(default)s)")
    a("--min_new_tokens", type=int, default=0,
      help="suppress EOS before this many tokens; for benchmarks (default: %(default)s)")
    a("--batch_size", type=int, default=None,
      help="prompts per generate call (default: from free GPU memory; 8 on CPU)")
    a("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    a("--do_sample", action="store_true", help="sample instead of greedy decoding (default: greedy)")
    a("--temperature", type=float, default=0.7, help="sampling temperature with --do_sample (default: %(default)s)")
    a("--top_p", type=float, default=0.9, help="nucleus sampling with --do_sample (default: %(default)s)")
    a("--mode", choices=("auto", "fast", "reference"), default="auto",
      help="fast: dequantised bf16 + merged LoRA; reference: 4-bit + adapter; auto: fast when a CUDA GPU "
           "has room (default: %(default)s)")
    a("--cache", choices=("static", "dynamic"), default="static",
      help="KV cache allocated once per batch, or grown every step; static was 2.4x faster for the base "
           "answers on an H100, see bench/README.md (default: %(default)s)")
    a("--compile", action="store_true", help="static KV cache + torch.compile of the decoding step; the compile "
      "costs ~40 s and pays only for several hundred questions, see bench/README.md (default: off)")
    a("--judge_model", default=None, help="OpenAI-compatible model for a pairwise judge (default: no judge)")
    a("--judge_base_url", default=None, help="judge endpoint, e.g. http://localhost:8000/v1 (default: OpenAI)")
    a("--judge_workers", type=int, default=4, help="concurrent judge requests (default: %(default)s)")
    a("--overwrite", action="store_true", help="replace existing outputs (the answer cache is kept)")
    return p


def validate(args) -> None:
    problems = []
    if args.n is not None and args.n < 1:
        problems.append("--n must be >= 1")
    if args.max_new_tokens < 1:
        problems.append("--max_new_tokens must be >= 1")
    if args.min_new_tokens < 0 or args.min_new_tokens > args.max_new_tokens:
        problems.append("--min_new_tokens must be between 0 and --max_new_tokens")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append("--batch_size must be >= 1")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        problems.append("--temperature must be > 0 and --top_p in (0, 1] when sampling")
    if args.judge_model and not os.environ.get("OPENAI_API_KEY"):
        problems.append("--judge_model needs the OPENAI_API_KEY environment variable (any value for a local server)")
    if problems:
        raise InputError("; ".join(problems))


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    print("eval_compare: " + " ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    t_start = time.perf_counter()

    questions = read_questions(Path(args.questions))[: args.n]
    run = read_run(args.adapter, args.base_model)
    paths = output_paths(Path(args.out))
    check_outputs_free([paths[k] for k in ("csv", "marking", "summary", "plot")], args.overwrite)

    from transformers import set_seed

    set_seed(args.seed)
    tokenizer = load_tokenizer(run)
    dec = Decoding(args.max_new_tokens, args.min_new_tokens, args.do_sample, args.temperature, args.top_p,
                   args.seed, args.cache, args.compile)
    prompts = {q["id"]: prompt_ids(tokenizer, q["question"], run.system_prompt) for q in questions}
    names = {"base": f"base:{run.base_model}", "finetuned": f"finetuned:{run.base_model}+{run.adapter_sha}"}
    keys = {(q["id"], side): answer_key(q, prompts[q["id"]], names[side], dec) for q in questions for side, _ in SIDES}
    cache = AnswerCache(paths["cache"])
    todo = {side: [(keys[q["id"], side], q, prompts[q["id"]]) for q in questions
                   if cache.get(keys[q["id"], side]) is None] for side, _ in SIDES}
    timing: dict = {"mode": None}
    print(f"{len(questions)} questions; cached answers: base {len(questions) - len(todo['base'])}, "
          f"fine-tuned {len(questions) - len(todo['finetuned'])}", flush=True)

    timing["prepare_s"] = round(time.perf_counter() - t_start, 3)
    if todo["base"] or todo["finetuned"]:
        t0 = time.perf_counter()
        model = load_base(run)
        _sync()
        timing["load_s"] = round(time.perf_counter() - t0, 3)
        seq_len = max(len(p) for p in prompts.values()) + args.max_new_tokens
        mode = choose_mode(args.mode, model, len(questions), seq_len)
        timing["mode"] = mode
        how = "bf16 dequantised + merged LoRA" if mode == "fast" else "4-bit + adapter"
        print(f"generation: {mode} path ({how}), loaded in {timing['load_s']:.1f}s", flush=True)
        if mode == "fast":
            t0 = time.perf_counter()
            dequantize_(model)
            _sync()
            timing["dequantize_s"] = round(time.perf_counter() - t0, 3)
            bs = args.batch_size or auto_batch_size(model, len(questions), seq_len)
            timing["base"] = generate_missing(model, tokenizer, todo["base"], "base", dec, bs, cache)
            if todo["finetuned"]:
                t0 = time.perf_counter()
                model = merged_model(run, model)
                _sync()
                timing["merge_s"] = round(time.perf_counter() - t0, 3)
                timing["finetuned"] = generate_missing(model, tokenizer, todo["finetuned"], "finetuned", dec, bs, cache)
        else:
            model = attach_adapter(model, run)
            bs = args.batch_size or auto_batch_size(model, len(questions), seq_len)
            with model.disable_adapter():
                timing["base"] = generate_missing(model, tokenizer, todo["base"], "base", dec, bs, cache)
            timing["finetuned"] = generate_missing(model, tokenizer, todo["finetuned"], "finetuned", dec, bs, cache)
        timing["batch_size"] = bs
        del model
        import torch

        if torch.cuda.is_available():
            timing["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)

    t_scores = time.perf_counter()
    rows = []
    for q in questions:
        row = {k: q[k] for k in ("id", "type", "question", "reference")}
        for side, prefix in SIDES:
            hit = cache.get(keys[q["id"], side])
            row[f"{side}_answer"] = hit["answer"]
            row[f"{prefix}_new_tokens"] = hit["new_tokens"]
            for m, v in score_answer(hit["answer"], q).items():
                row[f"{prefix}_{m}"] = v
        rows.append(row)
    if args.judge_model:
        run_judge(rows, {q["id"]: q for q in questions}, args, cache)

    by_type = summarize(rows)
    write_csv(paths["csv"], rows, result_columns(bool(args.judge_model)))
    write_csv(paths["marking"], [{**r, "winner": ""} for r in rows],
              ["id", "type", "question", "reference", "base_answer", "finetuned_answer", "winner"])
    timing["score_write_s"] = round(time.perf_counter() - t_scores, 3)
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    write_json_atomic(paths["summary"], {
        "adapter": str(run.adapter), "base_model": run.base_model, "questions": args.questions, "n": len(rows),
        "decoding": dec.key(), "system_prompt": run.system_prompt, "judge_model": args.judge_model,
        "timing": timing, "by_type": by_type})
    plot_results(by_type, paths["plot"])
    print(summary_table(by_type))
    print(f"wrote {paths['csv']}, {paths['marking']}, {paths['summary']}, {paths['plot']} "
          f"({timing['total_s']:.1f}s)")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
