"""Throughput of generate_qa.py's openai backend against a loopback server that answers each request after 1 s.

    python bench/bench_generate.py                       # 500 abstracts, --concurrency 32 (goal: <= 25 s)
    python bench/bench_generate.py --abstracts 100 --concurrency 8 --latency 0.5

The server (tests/fake_openai.py) runs in this process; generate_qa.py runs as a subprocess, exactly as a
user would start it, so the wall time includes start-up, curation, the split and writing the outputs.
Three runs: the concurrent one; a rerun of the same command, which must be answered entirely from the
cache (its time is everything but waiting for the server); and a short --concurrency 1 run to check what one
request costs. The sequential estimate is abstracts x latency + the cached rerun's time. Raw numbers go to bench/results/generate_<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import common  # noqa: E402
from fake_openai import FakeOpenAI  # noqa: E402
from generate_fakes import pairs_responder, synthetic_abstracts  # noqa: E402


def run_generate(workdir: Path, abstracts: Path, base_url: str, concurrency: int, overwrite: bool = False) -> dict:
    out = workdir / "out"
    cmd = [sys.executable, str(ROOT / "generate_qa.py"), "--input", str(abstracts), "--base_url", base_url,
           "--model", "bench-model", "--concurrency", str(concurrency), "--out", str(out / "train.jsonl"),
           "--eval_out", str(out / "eval.jsonl")] + (["--overwrite"] if overwrite else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": "bench"}, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"generate_qa.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    man = json.loads((out / "train.manifest.json").read_text())
    return {"wall_s": round(wall, 2), "script_s": man["seconds"], "concurrency": concurrency,
            "abstracts": man["papers"]["total"], "requests": man["requests"], "train": man["counts"]["train"],
            "eval": man["counts"]["eval"], "rejects": man["counts"]["rejects"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--abstracts", type=int, default=500, help="synthetic abstracts (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    p.add_argument("--latency", type=float, default=1.0, help="server seconds per reply (default: %(default)s)")
    p.add_argument("--sequential-sample", type=int, default=5,
                   help="abstracts run at --concurrency 1 to measure one request (default: %(default)s)")
    p.add_argument("--goal", type=float, default=25.0, help="wall-time goal in seconds (default: %(default)s)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder for the JSON (default: bench/results)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp, \
            FakeOpenAI(pairs_responder(delay=args.latency)) as srv:
        tmp = Path(tmp)
        abstracts = tmp / "abstracts.jsonl"
        common.write_jsonl_atomic(abstracts, synthetic_abstracts(args.abstracts))
        concurrent = run_generate(tmp / "concurrent", abstracts, srv.base_url, args.concurrency)
        concurrent["server_requests"] = srv.count
        n = srv.count
        cached = run_generate(tmp / "concurrent", abstracts, srv.base_url, args.concurrency, overwrite=True)
        cached["server_requests"] = srv.count - n
        small = tmp / "small.jsonl"
        common.write_jsonl_atomic(small, synthetic_abstracts(args.sequential_sample))
        seq = run_generate(tmp / "sequential", small, srv.base_url, 1)

    # One request at a time, every abstract waits the full latency; the rest of the work is what the
    # all-cached rerun measures. The small --concurrency 1 run checks that one request costs ~latency.
    per_request = (seq["script_s"] - cached["script_s"] * args.sequential_sample / args.abstracts) / args.sequential_sample
    sequential_est = args.latency * args.abstracts + cached["wall_s"]
    result = {
        "benchmark": "generate_qa.py openai backend vs loopback server",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "openai": __import__("openai").__version__},
        "settings": {"abstracts": args.abstracts, "concurrency": args.concurrency, "latency_s": args.latency,
                     "pairs_per_abstract": 12},
        "concurrent": concurrent, "rerun_from_cache": cached, "sequential_sample": seq,
        "sequential_sample_s_per_request": round(per_request, 2),
        "sequential_estimate_s": round(sequential_est, 1),
        "speedup_vs_sequential": round(sequential_est / concurrent["wall_s"], 1),
        "goal_s": args.goal, "meets_goal": concurrent["wall_s"] <= args.goal,
    }
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"generate_{datetime.now().strftime('%Y-%m-%d')}.json"
    common.write_json_atomic(path, result)

    rows = [("run", "abstracts", "concurrency", "wall s", "server requests"),
            ("concurrent", args.abstracts, args.concurrency, concurrent["wall_s"], concurrent["server_requests"]),
            ("rerun (cache)", args.abstracts, args.concurrency, cached["wall_s"], cached["server_requests"]),
            ("sequential sample", args.sequential_sample, 1, seq["wall_s"], args.sequential_sample),
            ("sequential (est.)", args.abstracts, 1, round(sequential_est, 1), args.abstracts)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\n{args.abstracts} abstracts at concurrency {args.concurrency}: {concurrent['wall_s']} s "
          f"(goal <= {args.goal:g} s: {'met' if result['meets_goal'] else 'MISSED'}), "
          f"{result['speedup_vs_sequential']}x the sequential estimate; {concurrent['train']} train pairs. -> {path}")
    return 0 if result["meets_goal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
