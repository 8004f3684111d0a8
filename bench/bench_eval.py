"""Generation speed of eval_compare.py on a Mistral-7B-shaped model: fast path vs the seed-style path.

    python bench/bench_eval.py            # CUDA GPU + bitsandbytes; ~5 min on an H100
    python bench/bench_eval.py --tiny     # CPU smoke test of this script (2-layer model, a few tokens)

What it does, in one process and one GPU (PERF.md's method):
  1. builds a random-init Mistral-7B-shaped model in bf16 on the GPU (vocab 32000, hidden 4096, 32 layers,
     32 heads, 8 KV heads, MLP 14336, untied head) with a 32000-word tokenizer carrying Zephyr's template,
     saves it under --workdir (default /dev/shm), plus a run folder with a random LoRA (r=16, alpha=32,
     q,k,v,o,gate,up,down; init_lora_weights=False so it really changes the weights) and 100 questions;
  2. fast path: `python eval_compare.py --mode fast` as a user runs it, after one import pass that writes the
     Python bytecode a normal install has (an image with PYTHONDONTWRITEBYTECODE would otherwise recompile
     ~2,300 modules in every process) (subprocess: the wall time includes
     interpreter start, imports, the 4-bit load, dequantisation, merge and writing every output):
     100 questions x (base + fine-tuned) x 256 new tokens, EOS suppressed so every answer is 256 tokens;
  3. seed-style path: `--mode reference --batch_size 1` (4-bit + PEFT adapter, one prompt at a time) on
     the first --seed_n questions with --seed_tokens new tokens; the ratio is per generated token;
  4. variants measured in-process: loading bf16 and round-tripping each weight through quantize/dequantize
     (is it faster than the 4-bit load, and bit-identical?), and static KV cache + torch.compile for the
     base answers (compile cost vs steady-state speed: where does it pay?).
Raw numbers go to bench/results/eval_<gpu>_<date>.json; a table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paperqa_tune.messages import DEFAULT_SYSTEM_PROMPT, ZEPHYR_CHAT_TEMPLATE  # noqa: E402

TYPES = ["factual", "conceptual", "methodology", "unanswerable", "false_premise"]
WORDS = ("model method paper results data training quantization adapter rank memory accuracy benchmark task "
         "language question answer evaluation proposed approach network layer attention parameters gradient "
         "loss baseline experiment dataset performance improve reduce fine-tuning four-bit low precision large "
         "small study show find use how what why which does the a of in on for with to is are").split()


def build_tokenizer(out: Path, vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries (random ids decode to words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = list(dict.fromkeys(["<|", "|>", "system", "user", "assistant", ".", ",", "?", ";", "-"]
                               + DEFAULT_SYSTEM_PROMPT.replace(".", " ").replace(",", " ").replace(";", " ").split()
                               + WORDS))
    words += [f"w{i}" for i in range(vocab_size - len(specials) - len(words))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 model_max_length=4096)
    hf.chat_template = ZEPHYR_CHAT_TEMPLATE
    hf.save_pretrained(out)
    assert len(hf) == vocab_size
    return hf


def build(workdir: Path, tiny: bool, n_questions: int, log) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    base, run = workdir / "base", workdir / "run"
    t0 = time.perf_counter()
    tok = build_tokenizer(base, 32000)
    dims = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else
            dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8))
    cfg = MistralConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, sliding_window=None,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **dims)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(base)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():  # random B at init scale would swamp a random 7B; keep the adapter a perturbation
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.01)
    peft_model.save_pretrained(run)
    tok.save_pretrained(run)
    (run / "run_config.json").write_text(json.dumps({
        "base_model": str(base), "args": {"bf16": True, "max_seq_len": 2048, "lora_r": 16, "lora_alpha": 32},
        "versions": {}, "data_sha256": "bench"}))
    del model, peft_model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rng = random.Random(0)
    with open(workdir / "questions.jsonl", "w") as f:
        for i in range(n_questions):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + " ?"
            f.write(json.dumps({"id": f"b{i}", "question": q, "reference": " ".join(rng.choice(WORDS) for _ in range(12)),
                                "type": TYPES[i % 5], "paper_id": str(i // 5), "context": "abstract"}) + "\n")
    log(f"built model, adapter and questions in {time.perf_counter() - t0:.1f}s")
    return {"base": base, "run": run, "questions": workdir / "questions.jsonl"}


def run_cli(name: str, argv: list[str], workdir: Path, log, timeout: int, env: dict | None = None) -> dict:
    """Run eval_compare.py as a user would; wall time from process start to exit."""
    out = workdir / name / "evaluation.csv"
    cmd = [sys.executable, str(ROOT / "eval_compare.py"), "--out", str(out), "--overwrite", *argv]
    # A user's install has compiled bytecode (pip writes it); an image that sets PYTHONDONTWRITEBYTECODE makes
    # every process compile ~2,300 modules again (~8 s on the H200 machine), which no user pays: see warm_bytecode
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTHONDONTWRITEBYTECODE")}
    full_env.update(env or {})
    log(" ".join(f"{k}={v}" for k, v in (env or {}).items()) + " $ " + " ".join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)
    wall = time.perf_counter() - t0
    log(p.stdout[-3000:] + p.stderr[-3000:])
    if p.returncode != 0:
        raise RuntimeError(f"{name}: eval_compare exited {p.returncode}")
    summary = json.loads((out.with_name("summary.json")).read_text())
    cache = [json.loads(x) for x in out.with_name("evaluation.cache.jsonl").read_text().splitlines() if x.strip()]
    t = summary["timing"]
    gen_s = t["base"]["seconds"] + t["finetuned"]["seconds"]
    tokens = t["base"]["new_tokens"] + t["finetuned"]["new_tokens"]
    return {"argv": argv, "env": env or {}, "wall_s": round(wall, 2), "timing": t, "generated_tokens": tokens,
            "generation_s": round(gen_s, 2), "gen_tok_per_s": round(tokens / gen_s, 1),
            "base_tok_per_s": round(t["base"]["new_tokens"] / t["base"]["seconds"], 1),
            "finetuned_tok_per_s": round(t["finetuned"]["new_tokens"] / t["finetuned"]["seconds"], 1),
            "end_to_end_tok_per_s": round(tokens / wall, 1), "answers": {(r["id"], r["model"]): r for r in cache}}


def warm_bytecode(log) -> None:
    """Import what eval_compare.py imports once, writing the .pyc files a normal install already has."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    mods = ("eval_compare, torch, transformers, peft, bitsandbytes, accelerate, matplotlib.pyplot, "
            "transformers.models.mistral.modeling_mistral, paperqa_tune.loading, paperqa_tune.scoring, "
            "paperqa_tune.evaluate.report, paperqa_tune.engine")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", f"import {mods}"], cwd=ROOT, env=env, capture_output=True, text=True)
    log(f"bytecode warm-up (imports once, .pyc written): {time.perf_counter() - t0:.1f}s, exit {p.returncode}")


def variants(paths: dict, n: int, new_tokens: int, log) -> dict:
    """In-process: bf16 load + quantize/dequantize round trip vs the 4-bit load; static cache + compile."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    import eval_compare as ec
    from paperqa_tune.generation import Decoding, generate_batch, prompt_ids
    from paperqa_tune.loading import dequantize_, load_run_base, run_tokenizer
    from paperqa_tune.runs import read_run

    res: dict = {}
    run = read_run(paths["run"])
    tok = run_tokenizer(run)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    model = load_run_base(run)
    sync()
    t1 = time.perf_counter()
    dequantize_(model)
    sync()
    res["load_4bit_s"], res["dequantize_s"] = round(t1 - t0, 2), round(time.perf_counter() - t1, 2)
    ref = {k: v for k, v in model.state_dict().items()}

    t0 = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(run.base_model, dtype=torch.bfloat16,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    sync()
    t1 = time.perf_counter()
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                q, st = bnb.functional.quantize_4bit(m.weight.data, blocksize=64, compress_statistics=True,
                                                     quant_type="nf4", quant_storage=torch.uint8)
                m.weight.data = bnb.functional.dequantize_4bit(q, st).to(torch.bfloat16)
    sync()
    res["load_bf16_s"], res["roundtrip_s"] = round(t1 - t0, 2), round(time.perf_counter() - t1, 2)
    sd = dense.state_dict()
    res["roundtrip_bit_identical"] = all(torch.equal(ref[k], sd[k]) for k in ref)
    log(f"variants: {res}")
    del dense, sd, ref
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    if torch.cuda.is_available():
        qs = ec.read_questions(paths["questions"])[:n]
        prompts = [prompt_ids(tok, q["question"], run.system_prompt) for q in qs]
        for label, compile_ in (("dynamic", False), ("static_compile", True)):
            dec = Decoding(max_new_tokens=new_tokens, min_new_tokens=new_tokens, compile=compile_)
            times = []
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                generate_batch(model, tok, prompts, dec)
                sync()
                times.append(round(time.perf_counter() - t0, 2))
            res[f"base_{label}_first_s"], res[f"base_{label}_second_s"] = times
            log(f"{label}: {times} s for {len(prompts)} x {new_tokens} tokens")
    return res


def env_info() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    for mod in ("peft", "bitsandbytes", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer model on CPU: checks this script only")
    p.add_argument("--workdir", default=None, help="where the model is built (default: /dev/shm/bench_eval)")
    p.add_argument("--n", type=int, default=100, help="questions for the fast path (default: %(default)s)")
    p.add_argument("--new_tokens", type=int, default=256, help="new tokens per answer (default: %(default)s)")
    p.add_argument("--seed_n", type=int, default=3, help="questions for the seed-style path (default: %(default)s)")
    p.add_argument("--seed_tokens", type=int, default=128, help="new tokens per seed-style answer (default: %(default)s)")
    p.add_argument("--fast_variants", default=None,
                   help="comma list of fast-path variants: default,no_cuda_graphs,dynamic_cache,"
                        "dynamic_cache_expandable_segments "
                        "(default: all)")
    p.add_argument("--inprocess_variants", action="store_true",
                   help="also measure bf16 load + round trip and static cache + torch.compile in-process")
    p.add_argument("--log", default=None, help="also append the log to this file")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/eval_<gpu>_<date>.json)")
    a = p.parse_args(argv)
    if a.tiny:
        a.n, a.new_tokens, a.seed_n, a.seed_tokens = min(a.n, 6), min(a.new_tokens, 8), min(a.seed_n, 2), min(a.seed_tokens, 8)

    def log(msg: str) -> None:
        print(msg, flush=True)
        if a.log:
            with open(a.log, "a") as f:
                f.write(msg + "\n")

    workdir = Path(a.workdir or ("/tmp/bench_eval_tiny" if a.tiny else "/dev/shm/bench_eval"))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    info = env_info()
    log(json.dumps(info))
    paths = build(workdir, a.tiny, a.n, log)
    common = ["--adapter", str(paths["run"]), "--questions", str(paths["questions"])]
    job = ["--n", str(a.n), "--max_new_tokens", str(a.new_tokens), "--min_new_tokens", str(a.new_tokens)]
    # The fast path as shipped (eval_compare.py's defaults), then the alternatives each in a fresh process.
    fast_variants = {"default": ([], None),  # our loop: static KV cache, the step replayed as a CUDA graph
                     "no_cuda_graphs": (["--no-cuda_graphs"], None),  # our loop, every step launched eagerly
                     "dynamic_cache": (["--cache", "dynamic"], None),  # transformers' generate
                     "dynamic_cache_expandable_segments": (["--cache", "dynamic"],
                                                           {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})}
    if a.fast_variants:
        fast_variants = {k: v for k, v in fast_variants.items() if k in a.fast_variants.split(",")}
    warm_bytecode(log)
    fast_runs = {name: run_cli(f"fast_{name}", common + ["--mode", "fast"] + job + extra, workdir, log, 300, env)
                 for name, (extra, env) in fast_variants.items()}
    fast = fast_runs[next(iter(fast_runs))]
    seed = run_cli("seed", common + ["--mode", "reference", "--batch_size", "1", "--n", str(a.seed_n),
                                     "--max_new_tokens", str(a.seed_tokens), "--min_new_tokens", str(a.seed_tokens)],
                   workdir, log, timeout=300)
    # Same model? Greedy tokens of the two paths on the shared questions, up to the first split. A random
    # 7B model's logits are nearly flat, so bf16 noise can flip a near-tie; the tiny-model tests carry the proof.
    agree = {}
    for side in ("base", "finetuned"):
        agree[side] = []
        for i in range(a.seed_n):
            x, y = fast["answers"][f"b{i}", side]["answer"].split(), seed["answers"][f"b{i}", side]["answer"].split()
            k = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            agree[side].append(k)
    strip = lambda r: {k: v for k, v in r.items() if k != "answers"}  # noqa: E731
    result = {"env": info, "workload": {"questions": a.n, "new_tokens": a.new_tokens, "sides": 2,
                                        "seed_style_questions": a.seed_n, "seed_style_new_tokens": a.seed_tokens},
              "fast": strip(fast), "fast_variants": {k: strip(v) for k, v in fast_runs.items()},
              "seed_style": strip(seed), "greedy_words_agreeing_before_first_split": agree}
    result["ratio_gen_tok_per_s"] = round(fast["gen_tok_per_s"] / seed["gen_tok_per_s"], 1)
    result["ratio_by_side"] = {s: round(fast[f"{s}_tok_per_s"] / seed[f"{s}_tok_per_s"], 1) for s in ("base", "finetuned")}
    # What the seed-style path would take for the fast path's whole job (load + generation per token).
    est = seed["timing"]["load_s"] + fast["generated_tokens"] / seed["gen_tok_per_s"]
    result["seed_style_estimated_full_job_s"] = round(est, 1)
    result["ratio_full_job"] = round(est / fast["wall_s"], 1)
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / (
        f"eval_{'tiny' if a.tiny else info['gpu'].replace(' ', '-')}_{info['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")  # the main numbers are safe before the variants run
    if a.inprocess_variants:
        try:
            result["variants"] = variants(paths, a.n, a.new_tokens, log)
        except Exception as e:  # keep the main numbers even if a variant fails
            result["variants"] = {"error": repr(e)}
            log(f"variants failed: {e!r}")
        out.write_text(json.dumps(result, indent=2) + "\n")

    sd = result["seed_style"]
    log(f"\n{'path':<44}{'wall s':>8}{'prep s':>8}{'load s':>8}{'base s':>8}{'ft s':>8}{'tokens':>8}{'gen tok/s':>11}")
    rows = [(f"fast {k} (b={v['timing']['batch_size']})", v) for k, v in result["fast_variants"].items()]
    rows.append(("seed-style (4-bit + LoRA, b=1)", sd))
    for label, r in rows:
        t = r["timing"]
        log(f"{label:<44}{r['wall_s']:>8}{t['prepare_s']:>8}{t['load_s']:>8}{t['base']['seconds']:>8}"
            f"{t['finetuned']['seconds']:>8}{r['generated_tokens']:>8}{r['gen_tok_per_s']:>11}")
    log(f"ratio per generated token: {result['ratio_gen_tok_per_s']}x (base {result['ratio_by_side']['base']}x, "
        f"fine-tuned {result['ratio_by_side']['finetuned']}x); seed-style estimate for the whole job: "
        f"{result['seed_style_estimated_full_job_s']} s ({result['ratio_full_job']}x the fast path's wall time)")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
