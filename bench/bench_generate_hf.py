"""Speed and JSON validity of `generate_qa.py --backend hf` on a Mistral-7B-shaped model, against plain
`model.generate` at batch 8.

    python bench/bench_generate_hf.py            # one CUDA GPU; needs .bench_assets/zephyr-vocab-tokenizer
    python bench/bench_generate_hf.py --tiny     # CPU smoke test of this script (2-layer model, tiny budgets)

The tokenizer asset is Zephyr-7B-beta's real 32000-token vocabulary (bench/make_bench_tokenizer.py writes it):
constrained decoding walks the vocabulary, so its cost must be measured on the real one.

What it does:
  1. builds (or reuses, when built with the same settings) a random-init Mistral-7B-shaped model in bf16
     (vocab 32000, hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, untied head) with that tokenizer,
     under --workdir (default /dev/shm/bench_generate_hf), and writes --abstracts synthetic abstracts;
  2. constrained run: `generate_qa.py --backend hf --max_tokens 1024 --batch_size 100 --pairs_per_abstract 2`
     in a subprocess, as a user runs it (the wall time includes interpreter start, imports, the model load,
     every round of requests and writing the outputs). A thin wrapper in the child also times the model load
     and the backend's generation calls and reads the peak GPU memory. Every reply in its response cache is
     re-parsed here with json.loads and checked against the request's JSON schema. With a generate_qa.py that
     has no --constrained_decoding flag yet, it runs without it and the output says "unconstrained";
  3. baseline: in this process, the same model and the same first-round prompts (rebuilt with generate_qa's
     own functions) through paperqa_tune.generation.generate_batch with Decoding(cache="dynamic"), i.e. plain
     `model.generate`, greedy and unconstrained, at batch 8, for --baseline-batches batches (all 100 would be
     13 x 1024 steps); its tokens/s and the time it would take for every first-round prompt are extrapolated.
Raw numbers go to --out-dir/generate_hf_<gpu>_<UTC time>.json; a markdown table is printed last.
A random model under a grammar fills each string until a length cap, so its replies are long: that is expected.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = ROOT / ".bench_assets" / "zephyr-vocab-tokenizer"
FULL_DIMS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8)
TINY_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
RECIPE = 1  # bump when the model recipe changes, so a model built by an older version is rebuilt
TIMING_ENV = "BENCH_GENERATE_HF_TIMING"  # where the child's wrapper writes its timing JSON


# --------------------------------------------------------------------------- child process: generate_qa.py, timed
def timed_generate_qa() -> None:
    """Child entry point: run generate_qa.py's main with the arguments after the script name, as
    `python generate_qa.py ARGS` would, timing the model load and the generation calls of its hf backend.
    The numbers are written to $BENCH_GENERATE_HF_TIMING at exit (also after a failed run)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from paperqa_tune import generation, llm

    out = Path(os.environ[TIMING_ENV])
    timing = {"backend_init_s": 0.0, "generate_s": 0.0, "generate_calls": 0, "timed": None, "batches": []}
    cuda = torch.cuda.is_available()

    def wrap(owner, name, record):
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            result = inner(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            record(time.perf_counter() - t0, args, result)
            return result

        setattr(owner, name, timed)

    def on_load(s, args, result):
        timing["backend_init_s"] = round(timing["backend_init_s"] + s, 3)

    def on_generate(s, args, result):
        timing["generate_s"] = round(timing["generate_s"] + s, 3)
        timing["generate_calls"] += 1
        timing["batches"].append({"prompts": len(result), "seconds": round(s, 3)})

    wrap(llm.HFBackend, "__init__", on_load)
    # The backend's per-batch call if it still has one, else the shared generation function (looked up at call
    # time by the backend); what was timed is recorded so a changed backend shows up as such, not as zeros.
    if hasattr(llm.HFBackend, "_generate"):
        wrap(llm.HFBackend, "_generate", on_generate)
        timing["timed"] = "HFBackend._generate"
    else:
        for owner in (generation, llm):
            if hasattr(owner, "generate_batch"):
                wrap(owner, "generate_batch", on_generate)
        timing["timed"] = "generation.generate_batch"

    def dump():
        if cuda:
            timing["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            timing["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        out.write_text(json.dumps(timing, indent=2) + "\n")

    atexit.register(dump)
    sys.argv = [str(ROOT / "generate_qa.py"), *sys.argv[1:]]
    import generate_qa

    raise SystemExit(generate_qa.main())


# --------------------------------------------------------------------------- helpers of the bench
def log(msg: str) -> None:
    print(msg, flush=True)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_settings(tokenizer_dir: Path | None, tiny: bool) -> dict:
    """Everything the saved model depends on: equal settings = the same model, so the build is skipped."""
    import torch
    import transformers

    return {"recipe": RECIPE, "dims": TINY_DIMS if tiny else FULL_DIMS, "dtype": "bfloat16", "seed": 0,
            "tokenizer_sha256": sha256_file(tokenizer_dir / "tokenizer.json") if tokenizer_dir else "project-tiny",
            "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}}


def build_model(out: Path, tokenizer_dir: Path | None, tiny: bool) -> dict:
    """The random-init Mistral-shaped model in bf16 with the given tokenizer, saved under `out` (reused when
    `out` holds one built with the same settings). tokenizer_dir None (--tiny without the asset): the project's
    own tiny model, tokenizer and all (tools/make_tiny_model.py)."""
    import torch

    settings = model_settings(tokenizer_dir, tiny)
    info_path = out / "bench_build.json"
    try:
        if json.loads(info_path.read_text())["settings"] == settings and (out / "config.json").is_file():
            log(f"model: reusing {out} (built with the same settings)")
            return settings
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(out, ignore_errors=True)  # a half-written build must not look finished
    out.mkdir(parents=True)
    free = shutil.disk_usage(out).free / 2**30
    if not tiny and free < 16:  # 14.5 GB of bf16 weights; a container's /dev/shm can be tiny
        raise SystemExit(f"{out}: only {free:.1f} GiB free, the model needs ~15 GiB: give --workdir elsewhere")
    t0 = time.perf_counter()
    if tokenizer_dir is None:
        sys.path.insert(0, str(ROOT))
        from tools.make_tiny_model import build

        build(out, vocab_size=1024, hidden=TINY_DIMS["hidden_size"], layers=TINY_DIMS["num_hidden_layers"], log=log)
    else:
        from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        cfg = MistralConfig(vocab_size=len(tok), max_position_embeddings=32768, tie_word_embeddings=False,
                            sliding_window=None, rope_theta=10000.0, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, **settings["dims"])
        torch.manual_seed(0)
        # initialise on the GPU: a 7B model's random init on the CPU takes minutes
        with torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu"):
            model = MistralForCausalLM._from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    info_path.write_text(json.dumps({"settings": settings, "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    log(f"model: built {out} in {time.perf_counter() - t0:.1f}s")
    return settings


def write_abstracts(path: Path, n: int) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from generate_fakes import synthetic_abstracts

    path.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in synthetic_abstracts(n)))


def constrained_flag_supported() -> bool:
    """Whether this generate_qa.py has --constrained_decoding (the flag arrives with the constrained engine)."""
    sys.path.insert(0, str(ROOT))
    import generate_qa

    return "--constrained_decoding" in generate_qa.build_parser()._option_string_actions


def schema_errors(value, schema: dict, path: str = "$") -> list[str]:
    """Where `value` breaks `schema`, for the JSON Schema keywords the project's request schemas use (type,
    properties, required, additionalProperties, items, enum, const, min/max Items/Length); [] when valid."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    errs: list[str] = []
    t = schema.get("type")
    for one in ([t] if isinstance(t, str) else t or []):
        if one in ("integer", "number"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                one == "number" or float(value).is_integer())
        else:
            ok = isinstance(value, types[one])
        if ok:
            break
    else:
        if t:
            return [f"{path}: not of type {t}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {str(value)[:40]!r} not in enum")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: not the const value")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            errs.append(f"{path}: string length {len(value)} out of bounds")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            errs.append(f"{path}: {len(value)} items out of bounds")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errs += schema_errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errs += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errs += schema_errors(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}: unexpected key {k!r}")
    return errs


def check_reply(text: str | None, schema: dict) -> dict:
    """{"json": parsed with json.loads as it is, "valid": and it fits the schema, "error": why not}."""
    try:
        obj = json.loads(text or "")
    except ValueError as e:
        return {"json": False, "valid": False, "error": f"not JSON: {e}"}
    errs = schema_errors(obj, schema)
    try:  # a second opinion when jsonschema happens to be installed (not a dependency)
        import jsonschema

        if errs == [] and not jsonschema.Draft202012Validator(schema).is_valid(obj):
            errs = ["jsonschema: invalid"]
    except ImportError:
        pass
    return {"json": True, "valid": not errs, "error": errs[0] if errs else None}


def summarize_replies(records: list[dict], schema: dict) -> dict:
    """Counts over cached replies: how many parse and validate, tokens, finish reasons."""
    checks = [check_reply(r.get("content"), schema) for r in records]
    tokens = [int((r.get("usage") or {}).get("completion_tokens") or 0) for r in records]
    errors = Counter(c["error"][:60] for c in checks if c["error"])
    return {"replies": len(records), "parsed_json": sum(c["json"] for c in checks),
            "schema_valid": sum(c["valid"] for c in checks),
            "finish_reasons": dict(Counter(r.get("finish_reason") for r in records)),
            "completion_tokens": sum(tokens), "mean_reply_tokens": round(sum(tokens) / max(1, len(tokens)), 1),
            "max_reply_tokens": max(tokens, default=0), "first_errors": dict(errors.most_common(3))}


def generate_qa_argv(a, model_dir: Path, abstracts: Path, run_dir: Path, decoding_flag: list[str]) -> list[str]:
    argv = ["--backend", "hf", "--model", str(model_dir), "--input", str(abstracts),
            "--max_tokens", str(a.max_tokens), "--batch_size", str(a.batch),
            "--pairs_per_abstract", str(a.pairs_per_abstract), "--seed", "0", "--overwrite",
            "--out", str(run_dir / "train.jsonl"), "--eval_out", str(run_dir / "eval.jsonl"),
            "--cache", str(run_dir / "replies.cache.jsonl"), *decoding_flag]
    if a.temperature is not None:
        argv += ["--temperature", str(a.temperature)]
    # The grammar's string caps: a random model fills every string to its cap, so they decide whether its replies
    # can close within --max_tokens (at ~3 characters a token: 2 pairs x (250 + 700) + keys < 1,024 tokens)
    q, ans = a.max_chars
    return argv + ["--max_question_chars", str(q), "--max_answer_chars", str(ans)]


def run_generate_qa(argv: list[str], run_dir: Path, timeout: int) -> dict:
    """generate_qa.py in a fresh process, its cache emptied first so every reply is generated now."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    timing_path = run_dir / "child_timing.json"
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                                 "import bench_generate_hf; bench_generate_hf.timed_generate_qa()", *argv]
    log("$ generate_qa.py " + " ".join(argv))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, TIMING_ENV: str(timing_path)})
    wall = time.perf_counter() - t0
    (run_dir / "generate_qa.log").write_text(p.stdout + p.stderr)
    tail = (p.stdout + p.stderr)[-2500:]
    log(tail)
    cache = run_dir / "replies.cache.jsonl"
    records = [json.loads(x) for x in cache.read_text().splitlines() if x.strip()] if cache.exists() else []
    if not records:
        raise SystemExit(f"generate_qa.py exited {p.returncode} without a single reply in {cache}; see "
                         f"{run_dir / 'generate_qa.log'}")
    manifest_path = run_dir / "train.manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    child = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    note = None
    if p.returncode != 0 and "no pair survived" in p.stderr:
        # a random model's pairs are garbage (not grounded in the abstract, or not JSON), so none survives and the
        # script exits 1 without outputs or manifest; its replies (what is measured) are in the cache all the same
        note = ("exit 1: no pair survived (expected from a random model; the log's 'filters:' line says why); "
                "replies read from the cache")
    elif p.returncode != 0:
        note = f"exit {p.returncode}: see {run_dir / 'generate_qa.log'}"
    return {"returncode": p.returncode, "note": note, "wall_s": round(wall, 2), "child": child, "records": records,
            "manifest": manifest, "log_tail": tail[-1200:]}


def first_round_prompts(argv: list[str], tok) -> list[list[int]]:
    """The prompt ids of the run's first-round requests, built by generate_qa's own functions from the same
    arguments and rendered as HFBackend renders them (a repair round's prompts also hold the bad reply)."""
    sys.path.insert(0, str(ROOT))
    import generate_qa as g
    from paperqa_tune.generation import chat_prompt_ids

    args = g.build_parser().parse_args(argv)
    g.validate_args(args)
    papers, _, _, _ = g.read_inputs(args)
    units = g.source_units(papers)
    quotas = g.type_quotas(g.conversations_per_source(args.pairs_per_abstract, args.turns) * args.turns,
                           args.edge_case_ratio)
    return [chat_prompt_ids(tok, g.generation_messages(u, quotas, args.turns)) for u in units]


def run_baseline(model_dir: Path, argv: list[str], schema: dict, batch: int, batches: int, max_tokens: int) -> dict:
    """Plain model.generate (dynamic cache, greedy, unconstrained) at `batch` on the first prompts."""
    import torch

    from paperqa_tune.distributed import default_device
    from paperqa_tune.generation import Decoding, generate_batch
    from paperqa_tune.loading import load_causal_lm, load_tokenizer

    device = default_device()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tok = load_tokenizer(model_dir, padding_side="left")
    # the dtype HFBackend uses: bf16 on a GPU, fp32 on the CPU
    model = load_causal_lm(model_dir, torch.bfloat16 if cuda else torch.float32, device, quantized=False).eval()
    sync()
    load_s = time.perf_counter() - t0
    prompts = first_round_prompts(argv, tok)
    dec = Decoding(max_new_tokens=max_tokens, cache="dynamic")
    generate_batch(model, tok, prompts[:batch], Decoding(max_new_tokens=2, cache="dynamic"))  # warm-up: CUDA init
    runs, replies = [], []
    for b in range(batches):
        chunk = prompts[b * batch:(b + 1) * batch]
        if not chunk:
            break
        sync()
        t = time.perf_counter()
        out = generate_batch(model, tok, chunk, dec)
        sync()
        runs.append({"prompts": len(chunk), "seconds": round(time.perf_counter() - t, 3),
                     "tokens": sum(n for _, n, _ in out)})
        replies += [{"content": text, "usage": {"completion_tokens": n},
                     "finish_reason": "stop" if tok.eos_token_id in ids else "length"} for text, n, ids in out]
        log(f"baseline batch {b + 1}/{batches}: {runs[-1]}")
    gen_s, tokens = sum(r["seconds"] for r in runs), sum(r["tokens"] for r in runs)
    res = {"batch_size": batch, "batches": len(runs), "load_s": round(load_s, 2), "generate_s": round(gen_s, 2),
           "generated_tokens": tokens, "tok_per_s": round(tokens / gen_s, 1) if gen_s else None, "runs": runs,
           "prompt_tokens_first_round": [len(p) for p in prompts], **summarize_replies(replies, schema)}
    # the whole first round at this batch size: every batch like the measured ones (a random model rarely stops)
    res["estimated_first_round_s"] = round(load_s + gen_s / len(runs) * math.ceil(len(prompts) / batch), 1)
    if cuda:
        res["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return res


def env_info() -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    for pkg in ("torch", "transformers", "tokenizers", "xgrammar", "accelerate"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    info["cuda"] = torch.version.cuda
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:  # which code was measured (read-only git; absent where the tree travelled without .git)
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
        info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                            capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def vocab_type(model_dir: Path) -> str | None:
    """How xgrammar reads this tokenizer's vocabulary (BYTE_FALLBACK expected for SentencePiece)."""
    try:
        import xgrammar as xgr
        from transformers import AutoConfig, AutoTokenizer
    except ImportError:
        return None
    tok = AutoTokenizer.from_pretrained(model_dir)
    return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=AutoConfig.from_pretrained(model_dir).vocab_size
                                              ).vocab_type.name


def ratio(x, y):
    return round(x / y, 1) if x and y else None


def markdown_table(r: dict) -> str:
    c, b = r["generate_qa"], r.get("baseline")
    rows = [("", f"generate_qa.py ({r['decoding']}, b={r['settings']['batch']})",
             f"model.generate (dynamic, b={r['settings']['baseline_batch']})" if b else "model.generate: not run"),
            ("prompts measured", c["first_round"]["replies"], (b or {}).get("replies", "-")),
            ("exit code", c["returncode"], "-"),
            ("wall s (whole job)", c["wall_s"], f"{b['estimated_first_round_s']} (est.)" if b else "-"),
            ("model load s (generate_qa: backend init)", c["child"].get("backend_init_s", "-"),
             (b or {}).get("load_s", "-")),
            ("generation s", c.get("generate_s", "-"), (b or {}).get("generate_s", "-")),
            ("generated tokens", c["generated_tokens"], (b or {}).get("generated_tokens", "-")),
            ("tok/s (generation)", c.get("gen_tok_per_s", "-"), (b or {}).get("tok_per_s", "-")),
            ("tok/s (end to end)", c["end_to_end_tok_per_s"], "-"),
            ("replies parse as JSON", f"{c['first_round']['parsed_json']}/{c['first_round']['replies']}",
             f"{b['parsed_json']}/{b['replies']}" if b else "-"),
            ("replies valid for the schema", f"{c['first_round']['schema_valid']}/{c['first_round']['replies']}",
             f"{b['schema_valid']}/{b['replies']}" if b else "-"),
            ("finish reasons", c["first_round"]["finish_reasons"], (b or {}).get("finish_reasons", "-")),
            ("mean / max reply tokens",
             f"{c['first_round']['mean_reply_tokens']} / {c['first_round']['max_reply_tokens']}",
             f"{b['mean_reply_tokens']} / {b['max_reply_tokens']}" if b else "-"),
            ("repair requests", c["repair_round"]["replies"], "-"),
            ("peak GPU memory GiB", c["child"].get("peak_gpu_mem_gib", "-"), (b or {}).get("peak_gpu_mem_gib", "-"))]
    lines = [f"| {' | '.join(str(x) for x in row)} |" for row in rows]
    lines.insert(1, "|---|---|---|")
    lines.append("")
    x = lambda v: "n/a" if v is None else f"{v}x"  # noqa: E731
    lines.append(f"speed-up per generated token: **{x(r['ratio_tok_per_s'])}**; whole job (baseline estimate / "
                 f"generate_qa wall): **{x(r['ratio_job'])}**; first-round replies valid: "
                 f"{c['first_round']['schema_valid']}/{c['first_round']['replies']}; "
                 f"xgrammar vocab type: {r['xgrammar_vocab_type']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="2-layer hidden-64 model on the CPU, 8 abstracts, 160-token replies with short strings: checks "
                        "this script only")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                   help="tokenizer folder (default: .bench_assets/zephyr-vocab-tokenizer)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="model, abstracts and run outputs (default: /dev/shm/bench_generate_hf; --tiny: "
                        "/tmp/bench_generate_hf_tiny)")
    p.add_argument("--abstracts", type=int, default=100, help="synthetic abstracts (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=1024, help="reply budget in tokens (default: %(default)s)")
    p.add_argument("--batch", type=int, default=100, help="generate_qa.py --batch_size (default: %(default)s)")
    p.add_argument("--pairs-per-abstract", type=int, default=2, help="pairs asked per abstract (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=None,
                   help="generate_qa.py --temperature (default: the script's own, 0.7)")
    p.add_argument("--decoding", choices=("auto", "constrained", "unconstrained"), default="auto",
                   help="auto: --constrained_decoding when generate_qa.py has the flag; unconstrained: "
                        "--no-constrained_decoding (default: %(default)s)")
    p.add_argument("--baseline-batch", type=int, default=8, help="model.generate batch size (default: %(default)s)")
    p.add_argument("--baseline-batches", type=int, default=2,
                   help="model.generate batches to time; 0 skips the baseline (default: %(default)s)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds generate_qa.py may take (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="folder for the results JSON (default: bench/results; --tiny: WORKDIR/results)")
    p.add_argument("--max-chars", default=None, metavar="Q,A",
                   help="generate_qa.py --max_question_chars,--max_answer_chars (default: 250,700; --tiny: 40,100)")
    a = p.parse_args(argv)
    a.max_chars = tuple(int(x) for x in (a.max_chars or ("40,100" if a.tiny else "250,700")).split(","))
    if a.tiny:
        a.abstracts, a.max_tokens = min(a.abstracts, 8), min(a.max_tokens, 160)
        a.baseline_batches = min(a.baseline_batches, 1)
    workdir = a.workdir or Path("/tmp/bench_generate_hf_tiny" if a.tiny else "/dev/shm/bench_generate_hf")
    out_dir = a.out_dir or (workdir / "results" if a.tiny else ROOT / "bench" / "results")
    sys.path.insert(0, str(ROOT))
    import torch

    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("the full bench needs a CUDA GPU; use --tiny for a CPU smoke test of this script")
    tokenizer = a.tokenizer if (a.tokenizer / "tokenizer.json").is_file() else None
    if tokenizer is None and not a.tiny:
        raise SystemExit(f"no tokenizer in {a.tokenizer}: write it with bench/make_bench_tokenizer.py (its --help "
                         "says how) or give --tokenizer DIR")
    workdir.mkdir(parents=True, exist_ok=True)
    info = env_info()
    log(json.dumps(info))

    # 1. the model and the abstracts
    model_dir = workdir / "model"
    settings = build_model(model_dir, tokenizer, a.tiny)
    abstracts = workdir / "abstracts.jsonl"
    write_abstracts(abstracts, a.abstracts)

    # 2. generate_qa.py as a user runs it (constrained when it can be)
    if constrained_flag_supported():
        decoding = "constrained" if a.decoding == "auto" else a.decoding
        flag = ["--constrained_decoding" if decoding == "constrained" else "--no-constrained_decoding"]
    else:
        log("note: this generate_qa.py has no --constrained_decoding flag: running it as it is (unconstrained)")
        decoding, flag = "unconstrained (no --constrained_decoding flag)", []
    gen_argv = generate_qa_argv(a, model_dir, abstracts, workdir / "run", flag)
    run = run_generate_qa(gen_argv, workdir / "run", a.timeout)
    from paperqa_tune.qa.prompts import PAIRS_SCHEMA

    n_first = a.abstracts  # the cache is appended in request order: the first round's replies come first
    records = run.pop("records")
    tokens = sum(int((r.get("usage") or {}).get("completion_tokens") or 0) for r in records)
    child = run["child"]
    gq = {**run, "generated_tokens": tokens, "end_to_end_tok_per_s": round(tokens / run["wall_s"], 1),
          "first_round": summarize_replies(records[:n_first], PAIRS_SCHEMA),
          "repair_round": summarize_replies(records[n_first:], PAIRS_SCHEMA)}
    if child.get("generate_calls"):
        gq["generate_s"] = round(child["generate_s"], 2)
        gq["gen_tok_per_s"] = round(tokens / child["generate_s"], 1)
    if run["manifest"]:  # the script's own count must agree with the cache's
        gq["manifest_tokens"] = run["manifest"]["tokens"]
        gq["manifest_requests"] = run["manifest"]["requests"]
        gq["manifest_counts"] = {k: run["manifest"]["counts"][k] for k in ("generated", "kept", "rejects")}
        gq["manifest_seconds"] = run["manifest"]["seconds"]

    # 3. the baseline: plain model.generate at batch 8 on the same first-round prompts
    baseline = None
    if a.baseline_batches > 0:
        baseline = run_baseline(model_dir, gen_argv, PAIRS_SCHEMA, a.baseline_batch, a.baseline_batches, a.max_tokens)
        # same prompts? their lengths must be the prompt tokens generate_qa.py recorded for its requests (as a
        # multiset: a backend may generate them in another order)
        recorded = sorted(int((r.get("usage") or {}).get("prompt_tokens") or -1) for r in records[:n_first])
        baseline["same_prompts_as_generate_qa"] = recorded == sorted(baseline.pop("prompt_tokens_first_round"))

    # 4. report
    result = {"benchmark": "generate_qa.py --backend hf vs plain model.generate", "env": info,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tiny": a.tiny,
              "model": {"dir": str(model_dir), **settings, "tokenizer": str(tokenizer or "project tiny tokenizer")},
              "xgrammar_vocab_type": vocab_type(model_dir), "decoding": decoding,
              "settings": {"abstracts": a.abstracts, "max_tokens": a.max_tokens, "batch": a.batch,
                           "pairs_per_abstract": a.pairs_per_abstract, "temperature": a.temperature,
                           "baseline_batch": a.baseline_batch, "baseline_batches": a.baseline_batches},
              "generate_qa_argv": gen_argv, "generate_qa": gq, "baseline": baseline}
    b_tps = (baseline or {}).get("tok_per_s")
    result["ratio_tok_per_s"] = ratio(gq.get("gen_tok_per_s") or gq["end_to_end_tok_per_s"], b_tps)
    result["ratio_tok_per_s_end_to_end"] = ratio(gq["end_to_end_tok_per_s"], b_tps)
    result["ratio_job"] = ratio((baseline or {}).get("estimated_first_round_s"), gq["wall_s"])
    gpu = "cpu-tiny" if a.tiny else info["gpu"].replace(" ", "-")
    out = out_dir / f"generate_hf_{gpu}_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"\nwrote {out}\n")
    if gq["note"]:
        log(f"note: generate_qa.py {gq['note']}")
    log(markdown_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
