"""Data-parallel scaling of train_qlora_hf.py: the seed's command on one GPU and on N GPUs at the same effective
batch (16 samples a step), through torchrun and accelerate launch, on the 7B-shaped model of bench_train.py.

    python bench/bench_ddp.py            # N = every visible GPU (2 or 4); about 4 minutes on 2 H200s

Data: workload `real` of bench_train.py (the 396 records generate_qa.py writes offline), each message rewritten as
whitespace-separated words of the bench model's word-level vocabulary ("t123 t4567 ...") in the token counts that
bench/real_workload.py models for it, so the script tokenizes them to those lengths (the chat markers are one token
each here instead of 5-6). Everything runs as a user would: the scripts as subprocesses, flags only.
Reported: steady step time (median of steps 3..end), step rate vs one GPU, final and per-step losses vs one GPU,
peak memory per process (rank 0).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import real_workload  # noqa: E402

SEED_FLAGS = ["--epochs", "2", "--lr", "2e-4", "--bf16", "--max_seq_len", "4096", "--seed", "0", "--val_fraction", "0"]


def words(text: str, rng: random.Random) -> str:
    n = real_workload.text_tokens(text, real_workload.CHARS_PER_TOKEN)
    return " ".join(f"t{rng.randrange(3, 32000)}" for _ in range(max(1, n)))


def write_data(path: Path) -> int:
    records, _ = real_workload.generate_records(ROOT)
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            msgs = [{"role": m["role"], "content": words(m["content"], rng)} for m in r["messages"]]
            f.write(json.dumps({"messages": msgs, "meta": r["meta"]}) + "\n")
    return len(records)


def run(name: str, launcher: list[str], batch: int, accum: int, data: Path, model: Path, out: Path) -> dict:
    cmd = launcher + [str(ROOT / "train_qlora_hf.py"), "--jsonl", str(data), "--model", str(model),
                      "--out", str(out / name), "--batch", str(batch), "--grad_accum", str(accum), "--overwrite",
                      "--data_parallel", "on", *SEED_FLAGS]  # measure data parallel, not train_qlora_hf's choice
    print("$", " ".join(cmd), flush=True)
    log = out / f"{name}.log"
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ,
                             "TOKENIZERS_PARALLELISM": "false"})
    if rc != 0:
        print(log.read_text()[-3000:])
        return {"name": name, "rc": rc}
    m = json.loads((out / name / "metrics.json").read_text())
    secs = [r["seconds"] for r in m["train"]][2:]
    return {"name": name, "rc": 0, "steps": m["steps"], "losses": [r["loss"] for r in m["train"]],
            "step_s_median": statistics.median(secs), "train_seconds": m.get("train_seconds"),
            "peak_gb": m.get("peak_memory_gb"), "final_loss": m["final_train_loss"],
            "micro_batch": m["train"][-1].get("micro_batch"), "input_tokens": m["input_tokens"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=0, help="processes for the parallel runs (default: all GPUs)")
    p.add_argument("--model-dir", type=Path, default=Path("/dev/shm/bench-mistral7b"))
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_ddp"))
    args = p.parse_args(argv)
    import torch

    n = args.gpus or torch.cuda.device_count()
    if n < 2:
        print("needs 2 or more GPUs", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.model_dir / "config.json").exists():
        import bench_train

        bench_train.build_model(args.model_dir, torch.device("cuda", 0), False)
    data = args.work / "real.jsonl"
    records = write_data(data)
    per_rank = 16 // n  # the seed's effective batch of 16 (8 x 2), split over the ranks
    runs = [run("1gpu", [sys.executable], 8, 2, data, args.model_dir, args.work),
            run(f"torchrun{n}", ["torchrun", "--standalone", f"--nproc_per_node={n}"], per_rank, 1, data,
                args.model_dir, args.work),
            run(f"accelerate{n}", ["accelerate", "launch", "--multi_gpu", f"--num_processes={n}"], per_rank, 1,
                data, args.model_dir, args.work)]
    base = runs[0]
    for r in runs[1:]:
        if r["rc"] == 0 and base["rc"] == 0:
            r["speedup"] = base["step_s_median"] / r["step_s_median"]
            r["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = {"gpu": torch.cuda.get_device_name(0), "gpus": n, "records": records, "date_utc": stamp,
           "torch": torch.__version__, "runs": runs}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"ddp_{stamp}.json").write_text(json.dumps(res, indent=1))
    print(f"{'run':14} {'steps':>5} {'step s (median)':>16} {'x 1 GPU':>8} {'final loss':>10} {'max |dloss|':>11} "
          f"{'peak GB':>8} micro")
    for r in runs:
        if r["rc"]:
            print(f"{r['name']:14} FAILED rc={r['rc']}")
            continue
        print(f"{r['name']:14} {r['steps']:5d} {r['step_s_median']:16.3f} {r.get('speedup', 1.0):8.2f} "
              f"{r['final_loss']:10.4f} {r.get('max_abs_loss_diff', 0.0):11.4f} {r['peak_gb'] or 0:8.2f} "
              f"{r['micro_batch']}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
