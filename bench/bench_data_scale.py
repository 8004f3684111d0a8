"""Data generation at 20,000-abstract scale on a CPU box: time and peak memory of the cross-paper near-duplicate
join, of generate_qa.py's offline backend, and of its openai backend against a loopback server, with a kill in
the middle, a resume and a rerun answered from the cache.

    python bench/bench_data_scale.py                                  # everything (~12 min on 2 shared cores)
    python bench/bench_data_scale.py --parts join --join_sizes 10000,30000,100000
    python bench/bench_data_scale.py --parts offline --offline_abstracts 20000
    python bench/bench_data_scale.py --parts openai --openai_abstracts 2000,5000 --concurrency 16

Input: synthetic abstracts made from data/sample_abstracts.jsonl: 6-9 of its sentences recombined per abstract,
names and numbers replaced per abstract, a third of the other content words swapped for words drawn from a
Zipf-distributed vocabulary (a few common words, a long tail, as in real text), and 15% of titles reusing an
earlier title under another name (formulaic titles: the near-duplicate questions across papers). No real paper
is described.

Every measured run is a subprocess of its own (this script with --child), so peak RSS (ru_maxrss) is that run's
only. generate_qa runs as `generate_qa.main(argv)` with the flags and files a user would give, in a temp folder;
its functions are wrapped (not changed) to record the RSS at each phase, which says where the memory goes.
The join is timed on the raw questions offline_qa.offline_pairs writes (duplicates included), against the
single-token prefix filter it replaced (kept below as the baseline). Results: bench/results/data_scale_<UTC>.json.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import inspect
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from paperqa_tune.qa.offline_qa import offline_pairs, split_sentences  # noqa: E402
from paperqa_tune.qa.textsim import STOPWORDS, jaccard  # noqa: E402

SAMPLES = ROOT / "data" / "sample_abstracts.jsonl"
_SYL = ["ka", "lo", "mi", "ren", "tus", "vo", "zel", "dra", "qui", "bar", "nex", "sol", "tri", "ume", "fa", "gor",
        "pel", "sim", "cor", "dax", "bri", "hal", "jun", "ost"]
_NAME_RE = re.compile(r"(?<!^)(?<![.!?] )\b[A-Z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*\b|\b[a-z]*[A-Z][A-Za-z]*[A-Z0-9][\w-]*\b")
_NUM_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
_CONTENT_RE = re.compile(r"\b[a-z]{5,}\b")


# --------------------------------------------------------------------------- data
def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()


def recombined_abstracts(n: int, seed: int = 0, swap: float = 0.35, series: float = 0.15,
                         vocab_size: int = 40000) -> list[dict]:
    """n made-up abstracts recombined from the sample abstracts' sentences (see the module docstring)."""
    rng = random.Random(seed)
    papers = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
    sents = [split_sentences(p["abstract"]) for p in papers]
    firsts, lasts = [s[0] for s in sents], [s[-1] for s in sents]
    middles = [x for s in sents for x in s[1:-1]]
    real = Counter(w for p in papers for w in _CONTENT_RE.findall(f"{p['title']} {p['abstract']}".lower())
                   if w not in STOPWORDS)
    vocab = [w for w, _ in real.most_common()]
    known = set(vocab)
    while len(vocab) < vocab_size:
        w = "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 4)))
        if w not in known:
            known.add(w)
            vocab.append(w)
    cum = list(itertools.accumulate(1 / (r + 1) for r in range(len(vocab))))

    def draw() -> str:
        return vocab[bisect.bisect(cum, rng.random() * cum[-1])]

    out = []
    for i in range(n):
        name, names = _name(rng), {}

        def rename(m):
            if m.group(0) not in names:
                names[m.group(0)] = name if not names else _name(rng)
            return names[m.group(0)]

        if out and rng.random() < series:
            title = f"{name}:{out[rng.randrange(len(out))]['title'].split(':', 1)[1]}"
        else:
            title = f"{name}: " + " ".join(draw().capitalize() for _ in range(rng.randint(3, 6)))
        text = " ".join([rng.choice(firsts)] + rng.sample(middles, rng.randint(4, 7)) + [rng.choice(lasts)])
        text = _NAME_RE.sub(rename, text)
        text = _NUM_RE.sub(lambda m: f"{rng.uniform(1, 99):.1f}" if "." in m.group() else str(rng.randint(2, 999)),
                           text)
        text = _CONTENT_RE.sub(lambda m: draw() if m.group() not in STOPWORDS and rng.random() < swap else m.group(),
                               text)
        out.append({"id": f"rc-{i:06d}", "title": title, "abstract": text})
    return out


# --------------------------------------------------------------------------- join: the baseline
def single_token_prefix_join(sets: list[frozenset], groups: list, threshold: float) -> dict[int, int]:
    """textsim.cross_group_near_duplicates as it was before this benchmark (prefix filter on single tokens, rarest
    first), kept as the baseline the new one must match exactly."""
    freq = Counter(t for s in sets for t in s)
    index: dict[str, list[int]] = defaultdict(list)
    dups = {}
    for i, s in enumerate(sets):
        if not s:
            continue
        n = len(s)
        prefix = sorted(s, key=lambda t: (freq[t], t))[: n - math.ceil(threshold * n) + 1]
        lo, hi = threshold * n, n / threshold
        hit = None
        for j in sorted({j for t in prefix for j in index[t]}):
            y = sets[j]
            if groups[j] != groups[i] and lo <= len(y) <= hi and jaccard(s, y) >= threshold:
                hit = j
                break
        if hit is not None:
            dups[i] = hit
            continue
        for t in prefix:
            index[t].append(i)
    return dups


class _CountingList(list):
    """The groups list, counting lookups: both joins read groups[j] and groups[i] once per candidate they check."""
    reads = 0

    def __getitem__(self, k):
        _CountingList.reads += 1
        return list.__getitem__(self, k)


# --------------------------------------------------------------------------- children (one measured run each)
def _rss_mb() -> float:
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mb()


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_join(questions: Path, n: int, impl: str, threshold: float) -> dict:
    import tracemalloc

    from paperqa_tune.qa.textsim import cross_group_near_duplicates, question_tokens

    join = cross_group_near_duplicates if impl == "new" else single_token_prefix_join
    rows = [json.loads(line) for line in itertools.islice(open(questions, encoding="utf-8"), n)]
    sets, groups = [question_tokens(q) for q, _ in rows], [g for _, g in rows]
    del rows
    rss_before = _rss_mb()
    t = time.perf_counter()
    dups = join(sets, groups, threshold)
    seconds = time.perf_counter() - t
    maxrss = _maxrss_mb()
    counting = _CountingList(groups)
    join(sets, counting, threshold)
    tracemalloc.start()
    join(sets, groups, threshold)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"questions": n, "impl": impl, "seconds": round(seconds, 3), "us_per_question": round(seconds / n * 1e6, 1),
            "candidates_per_question": round(_CountingList.reads / 2 / n, 2), "near_duplicates": len(dups),
            "tracemalloc_peak_mb": round(peak / 2 ** 20, 1), "rss_before_join_mb": round(rss_before, 1),
            "maxrss_mb": round(maxrss, 1), "dups_hash": _sha_text(json.dumps(sorted(dups.items())))}


PHASES = ("read_inputs", "ResponseCache", "source_units", "generate_llm", "offline_conversations", "curate", "judge",
          "split_papers", "to_records", "quality_items", "quality_report", "report_run", "_jsonl", "write_staged",
          "plot_quality")
_PER_PAPER = ("offline_conversations",)  # called once per paper: RSS read at its first and every 1000th call


def _instrument(module, timeline: list, t0: float, on_boundary) -> None:
    """Wrap the module's phase functions (those it has) to note, per phase, its calls, first start, last end and
    the RSS at both in timeline; on_boundary(phase) runs at each phase's first start and every end."""
    stats: dict[str, dict] = {}

    def enter(name):
        s = stats.get(name)
        if s is None:
            s = stats[name] = {"phase": name, "calls": 0, "start_s": round(time.perf_counter() - t0, 2),
                               "rss_start_mb": round(_rss_mb(), 1)}
            timeline.append(s)
            on_boundary(name)
        return s

    def leave(name, s):
        s["calls"] += 1
        s["end_s"] = round(time.perf_counter() - t0, 2)
        if name not in _PER_PAPER or s["calls"] % 1000 == 1:
            s["rss_end_mb"] = round(_rss_mb(), 1)
            on_boundary(name)

    def wrap(name, fn):
        if inspect.iscoroutinefunction(fn):  # generate_llm, judge: measured until they finish, not until they start
            async def inner_async(*a, **kw):
                s = enter(name)
                try:
                    return await fn(*a, **kw)
                finally:
                    leave(name, s)
            return inner_async

        def inner(*a, **kw):
            s = enter(name)
            try:
                return fn(*a, **kw)
            finally:
                leave(name, s)
        return inner

    for name in PHASES:
        if callable(getattr(module, name, None)):
            setattr(module, name, wrap(name, getattr(module, name)))


def child_generate(argv: list[str], report: Path, trace: bool) -> int:
    """generate_qa.main(argv), with the RSS per phase; with trace, the largest Python allocations still alive
    at the phase boundary where the most memory was in use (tracemalloc, so much slower)."""
    import tracemalloc

    import generate_qa

    t0 = time.perf_counter()
    timeline: list[dict] = []
    largest = {"mb": 0.0}

    def on_boundary(phase: str) -> None:
        if not trace or phase == "plot_quality":  # its peak is matplotlib's import, the same at any size
            return
        now = tracemalloc.get_traced_memory()[0] / 2 ** 20
        if now > largest["mb"] * 1.05:
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, "<frozen *"),
                                                              tracemalloc.Filter(False, "*/site-packages/*")])
            largest.update(phase=phase, mb=round(now, 1), top=[
                {"where": str(s.traceback[0]), "mb": round(s.size / 2 ** 20, 2), "blocks": s.count}
                for s in snap.statistics("lineno")[:12]])

    _instrument(generate_qa, timeline, t0, on_boundary)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(0.5):
            samples.append((round(time.perf_counter() - t0, 1), round(_rss_mb(), 1)))

    threading.Thread(target=sample, daemon=True).start()
    if trace:
        tracemalloc.start(1)
    rc = generate_qa.main(argv)
    stop.set()
    out = {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), "maxrss_mb": round(_maxrss_mb(), 1),
           "phases": timeline, "rss_samples": samples[:: max(1, len(samples) // 60)],
           **({"largest_live": largest} if trace else {})}
    report.write_text(json.dumps(out, indent=1))
    return rc


def _child(args) -> int:
    if args.child == "join":
        print(json.dumps(child_join(Path(args.questions), args.n, args.impl, args.threshold)))
        return 0
    return child_generate(args.rest, Path(args.report), args.trace)


# --------------------------------------------------------------------------- the parent
def _run_child(extra: list[str], log: Path, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(Path(__file__).resolve())] + extra
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(extra[:4])} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return proc


def bench_join(tmp: Path, sizes: list[int], before: list[int], threshold: float) -> list[dict]:
    from paperqa_tune.qa.prompts import type_quotas

    quotas = type_quotas(12, 0.2)
    path = tmp / "questions.jsonl"
    n, k, t = 0, 0, time.perf_counter()
    with open(path, "w", encoding="utf-8") as f:
        for paper in recombined_abstracts(math.ceil(max(sizes) / 11.5), seed=1):
            for p in offline_pairs(paper, quotas):
                f.write(json.dumps([p["question"], paper["id"]]) + "\n")
                n += 1
            k += 1
    print(f"join: {n:,} questions from {k:,} abstracts in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = []
    for size in sizes:
        if size > n:
            print(f"join: only {n:,} questions, {size:,} skipped", file=sys.stderr)
            continue
        for impl in ("new", "before") if size in before else ("new",):
            proc = _run_child(["--child", "join", "--questions", str(path), "--n", str(size), "--impl", impl,
                               "--threshold", str(threshold)], tmp / f"join_{size}_{impl}.log")
            row = json.loads(proc.stdout)
            rows.append(row)
            print(f"join {impl:6} {size:>7,}: {row['seconds']:.2f} s, {row['candidates_per_question']} candidates "
                  f"per question, tracemalloc peak {row['tracemalloc_peak_mb']} MB", file=sys.stderr)
    by_size = defaultdict(dict)
    for r in rows:
        by_size[r["questions"]][r["impl"]] = r
    for r in rows:  # same duplicates as the baseline, pair for pair
        other = by_size[r["questions"]].get("before")
        r["same_as_before"] = None if other is None else other["dups_hash"] == by_size[r["questions"]]["new"]["dups_hash"]
    for r in rows:
        r.pop("dups_hash")
    return rows


def generate_argv(abstracts: Path, out: Path, backend: str, extra: list[str]) -> list[str]:
    return ["--backend", backend, "--input", str(abstracts), "--out", str(out / "train.jsonl"),
            "--eval_out", str(out / "eval.jsonl"), "--manifest", str(out / "train.manifest.json"),
            "--rejects", str(out / "rejects.jsonl"), "--cache", str(out / "cache.jsonl"),
            "--pairs_per_abstract", "12", "--edge_case_ratio", "0.2", "--eval_papers", "0.02", "--seed", "0", *extra]


def run_generate(tmp: Path, name: str, argv: list[str], env=None, trace: bool = False) -> dict:
    report = tmp / f"{name}.report.json"
    t = time.perf_counter()
    _run_child(["--child", "generate", "--report", str(report)] + (["--trace"] if trace else []) + ["--"] + argv,
               tmp / f"{name}.log", env=env)
    wall = time.perf_counter() - t
    rep = json.loads(report.read_text())
    man = json.loads(Path(argv[argv.index("--manifest") + 1]).read_text())
    return {"wall_s": round(wall, 1), "script_s": rep["seconds"], "peak_rss_mb": rep["maxrss_mb"],
            "papers": man["papers"]["total"], "counts": {k: man["counts"].get(k) for k in
                                                         ("generated", "kept", "train", "eval", "rejects")},
            "requests": man.get("requests"), "phases": rep["phases"], "rss_samples": rep["rss_samples"],
            "train_sha256": _sha(Path(argv[argv.index("--out") + 1])),
            **({"largest_live": rep["largest_live"]} if trace else {})}


def _slope(points: list[tuple[int, float]]) -> float | None:
    """MB per 1,000 abstracts between the smallest and largest run."""
    if len(points) < 2:
        return None
    (a, ra), (b, rb) = min(points), max(points)
    return round((rb - ra) / (b - a) * 1000, 1) if b > a else None


def bench_offline(tmp: Path, sizes: list[int], trace_n: int) -> dict:
    runs = []
    for n in sizes:
        src = tmp / f"abstracts_{n}.jsonl"
        _write_jsonl(src, recombined_abstracts(n))
        r = run_generate(tmp, f"offline_{n}", generate_argv(src, tmp / f"offline_{n}", "offline", []))
        r["abstracts"] = n
        runs.append(r)
        print(f"offline {n:>6,} abstracts: {r['wall_s']} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"{r['counts']['train']:,} train / {r['counts']['eval']:,} eval", file=sys.stderr)
    traced = None
    if trace_n:
        src = tmp / f"abstracts_{trace_n}.jsonl"
        _write_jsonl(src, recombined_abstracts(trace_n))
        traced = run_generate(tmp, f"offline_trace_{trace_n}", generate_argv(src, tmp / "trace", "offline", []),
                              trace=True)
        traced["abstracts"] = trace_n
        print(f"offline {trace_n:,} abstracts under tracemalloc: largest live allocations at "
              f"{traced['largest_live']['phase']!r}", file=sys.stderr)
    return {"runs": runs, "mb_per_1k_abstracts": _slope([(r["abstracts"], r["peak_rss_mb"]) for r in runs]),
            "traced_run": traced}


def _cache_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def bench_openai(tmp: Path, sizes: list[int], concurrency: int, kill_at: float) -> dict:
    from fake_openai import FakeOpenAI
    from generate_fakes import pairs_responder

    env = {**os.environ, "OPENAI_API_KEY": "bench-key"}
    net = ["--concurrency", str(concurrency), "--timeout", "60", "--max_tokens", "3000", "--max_retries", "4",
           "--model", "bench-model"]
    runs, resume = [], None
    with FakeOpenAI(pairs_responder()) as srv:
        srv._server.handle_error = lambda *a: None  # the kill resets connections mid-request: expected, not news
        net += ["--base_url", srv.base_url]
        for n in sizes:
            src = tmp / f"abstracts_{n}.jsonl"
            if not src.exists():
                _write_jsonl(src, recombined_abstracts(n))
            out = tmp / f"openai_{n}"
            argv = generate_argv(src, out, "openai", net)
            if n != max(sizes):
                before = srv.count
                r = run_generate(tmp, f"openai_{n}", argv, env=env)
                r.update(abstracts=n, server_requests=srv.count - before)
                runs.append(r)
                print(f"openai {n:>6,} abstracts: {r['wall_s']} s, peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
                continue
            resume = _kill_resume(tmp, srv, argv, env, n, kill_at, out)
            for key in ("resumed", "rerun_all_cached"):
                runs.append({**resume[key], "abstracts": n, "run": key})
    peaks = [(r["abstracts"], r["peak_rss_mb"]) for r in runs if r.get("run") != "rerun_all_cached"]
    return {"concurrency": concurrency, "runs": runs, "mb_per_1k_abstracts": _slope(peaks),
            "kill_resume": {k: v for k, v in (resume or {}).items() if k not in ("resumed", "rerun_all_cached")}}


def _kill_resume(tmp: Path, srv, argv: list[str], env: dict, n: int, kill_at: float, out: Path) -> dict:
    """Start the run, SIGKILL it once the server has seen kill_at of the requests, rerun the same command (it
    resumes from the cache), then rerun it with --overwrite: every reply must come from the cache."""
    report = tmp / "killed.report.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "generate", "--report", str(report), "--"] + argv
    before = srv.count
    t = time.perf_counter()
    with open(tmp / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=env)
        while srv.count - before < kill_at * n and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_s = time.perf_counter() - t
    cached = _cache_lines(out / "cache.jsonl")
    time.sleep(0.5)  # requests in flight at the kill reach the server's count
    sent_before_kill = srv.count - before
    print(f"openai {n:,}: killed after {killed_s:.0f} s; the server had answered {sent_before_kill:,} requests, "
          f"the cache held {cached:,} replies", file=sys.stderr)
    mark = srv.count
    resumed = run_generate(tmp, "openai_resumed", argv, env=env)
    resumed["server_requests"] = srv.count - mark
    mark = srv.count
    again = run_generate(tmp, "openai_all_cached", argv + ["--overwrite"], env=env)
    again["server_requests"] = srv.count - mark
    print(f"openai {n:,}: resumed run sent {resumed['server_requests']:,} requests ({resumed['wall_s']} s, peak "
          f"{resumed['peak_rss_mb']:.0f} MB); the rerun sent {again['server_requests']} ({again['wall_s']} s)",
          file=sys.stderr)
    return {"abstracts": n, "killed_after_s": round(killed_s, 1), "server_requests_before_kill": sent_before_kill,
            "cache_lines_at_kill": cached, "resume_requests": resumed["server_requests"],
            "paid_twice": sent_before_kill + resumed["server_requests"] - n, "rerun_requests": again["server_requests"],
            "rerun_outputs_identical": again["train_sha256"] == resumed["train_sha256"],
            "resumed": resumed, "rerun_all_cached": again}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- report
def _table(rows: list[tuple]) -> str:
    out = ["| " + " | ".join(map(str, rows[0])) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows[1:]]
    return "\n".join(out)


def print_tables(result: dict) -> None:
    if result.get("join"):
        rows = [("questions", "join", "seconds", "µs / question", "candidates / question", "tracemalloc peak MB",
                 "same dups as before")]
        for r in result["join"]:
            rows.append((f"{r['questions']:,}", "pair prefix (new)" if r["impl"] == "new" else "single-token (before)",
                         r["seconds"], r["us_per_question"], r["candidates_per_question"], r["tracemalloc_peak_mb"],
                         {True: "yes", False: "NO", None: "–"}[r["same_as_before"]]))
        print(_table(rows))
    for part in ("offline", "openai"):
        if not result.get(part):
            continue
        rows = [("backend", "abstracts", "run", "wall s", "peak RSS MB", "train", "eval", "server requests")]
        for r in result[part]["runs"]:
            rows.append((part, f"{r['abstracts']:,}", r.get("run", "full"), r["wall_s"], round(r["peak_rss_mb"]),
                         f"{r['counts']['train']:,}", f"{r['counts']['eval']:,}", r.get("server_requests", "–")))
        print("\n" + _table(rows))
        if result[part]["mb_per_1k_abstracts"] is not None:
            print(f"{part}: {result[part]['mb_per_1k_abstracts']} MB of peak RSS per 1,000 abstracts")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="join,offline,openai", help="what to run (default: %(default)s)")
    p.add_argument("--join_sizes", default="10000,30000,100000", help="questions per join run (default: %(default)s)")
    p.add_argument("--before_sizes", default="10000,30000,100000",
                   help="sizes the old single-token join also runs at (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold, generate_qa's default")
    p.add_argument("--offline_abstracts", default="5000,20000", help="offline runs (default: %(default)s)")
    p.add_argument("--trace_abstracts", type=int, default=1000,
                   help="an extra offline run under tracemalloc, for where the memory goes (0: none; default: %(default)s)")
    p.add_argument("--openai_abstracts", default="2000,5000",
                   help="openai runs; the largest is killed and resumed (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="openai requests in flight (default: %(default)s)")
    p.add_argument("--kill_at", type=float, default=0.5, help="share of requests sent before the kill (default: %(default)s)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder for the JSON")
    # internal: one measured run
    p.add_argument("--child", choices=("join", "generate"), help=argparse.SUPPRESS)
    p.add_argument("--questions", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    sizes = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    result = {"benchmark": "data generation at scale (CPU): near-duplicate join, generate_qa offline and openai",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/bench_data_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_avg_at_start": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="bench_data_scale_") as tmp:
        tmp = Path(tmp)
        if "join" in parts:
            result["join"] = bench_join(tmp, sizes(args.join_sizes), sizes(args.before_sizes), args.threshold)
        if "offline" in parts:
            result["offline"] = bench_offline(tmp, sizes(args.offline_abstracts), args.trace_abstracts)
        if "openai" in parts:
            result["openai"] = bench_openai(tmp, sizes(args.openai_abstracts), args.concurrency, args.kill_at)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"data_scale_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print_tables(result)
    print(f"\n{result['total_s']} s in all -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
