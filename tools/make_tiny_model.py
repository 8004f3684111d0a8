"""Build a tiny chat model that loads like a hub model (for the demo and the tests).

    python tools/make_tiny_model.py --out models/tiny-zephyr                       # random init (tests)
    python tools/make_tiny_model.py --out models/tiny-zephyr --hidden 128 --layers 4 --pretrain_steps 300

A Mistral-architecture model (2 layers, hidden 64 by default) plus a byte-level BPE tokenizer trained on
the spot, carrying Zephyr-7B-beta's exact chat template and special tokens (<s>, </s>, <unk>), saved with
save_pretrained so the scripts' real `from_pretrained` code loads it. No download.

By default the weights are random, which is enough to exercise the code. With --pretrain_steps N every
weight is first trained for N AdamW steps as a plain language model on the titles and abstracts of the
text file (never on question/answer chats: the base must not already know the fine-tuning task), so that
the demo fine-tunes a base that has learned something, as a real one has. A finished build leaves
build_info.json with its settings; building again with the same settings into the same folder is skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paperqa_tune.files import sha256_text, share_like_outputs, write_json_atomic
from paperqa_tune.messages import ZEPHYR_CHAT_TEMPLATE, render_zephyr

ROOT = Path(__file__).resolve().parent.parent
FALLBACK_TEXT = (
    "Large language models are trained on text. We propose a method for fine-tuning with low-rank "
    "adapters and four-bit quantization. The abstract does not state the dataset size. Results show "
    "improved accuracy on question answering benchmarks across several tasks and languages."
)
# Bump when the build recipe changes in a way that changes the weights, so cached builds are redone.
RECIPE_VERSION = 1
INFO_FILE = "build_info.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def documents(text_file: Path | None) -> list[str]:
    """The plain text of the text file: 'title\\nabstract' per JSONL record, else the raw line."""
    src = text_file or ROOT / "data" / "sample_abstracts.jsonl"
    docs = []
    if src.exists():
        for raw in src.read_text(encoding="utf-8").splitlines():
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                docs.append(f"{obj.get('title', '')}\n{obj.get('abstract', '')}")
            except (json.JSONDecodeError, AttributeError):
                docs.append(raw)
    return docs


def training_corpus(text_file: Path | None) -> list[str]:
    """What the tokenizer is trained on: the documents, plus a fallback text and the chat markers."""
    lines = [FALLBACK_TEXT] + documents(text_file)
    # Teach the tokenizer the chat markers as ordinary merges, as Zephyr's SentencePiece model has them.
    lines += [render_zephyr([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}])] * 50
    return lines


def build_settings(vocab_size: int, hidden: int, layers: int, seed: int, text_file: Path | None,
                   pretrain: dict) -> dict:
    """Everything the saved weights depend on; equal settings = the same model, so the build is skipped."""
    src = text_file or ROOT / "data" / "sample_abstracts.jsonl"
    import tokenizers
    import torch
    import transformers

    return {"recipe": RECIPE_VERSION, "vocab_size": vocab_size, "hidden": hidden, "layers": layers, "seed": seed,
            "text_sha256": sha256_text(src.read_text(encoding="utf-8")) if src.exists() else None,
            "pretrain": pretrain,
            "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__}}


def cached(out: Path, settings: dict) -> bool:
    try:
        info = json.loads((out / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("settings") == settings and all((out / f).is_file() for f in MODEL_FILES)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block on `n` torch intra-op threads, then restore the caller's setting: tiny models gain nothing
    from several threads, and on a CPU shared with other work OpenMP spin-waits make them several times slower."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(model, token_stream: list[int], steps: int, lr: float, seq_len: int, batch: int, seed: int,
             log=print) -> list[float]:
    """Train every weight as a causal LM on random windows of the token stream (AdamW, fp32).
    The windows come from a torch.Generator seeded with `seed`: the global RNG is not used."""
    import torch

    data = torch.tensor(token_stream, dtype=torch.long)
    seq_len = min(seq_len, len(data) - 1)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, steps // 10)
    offsets = torch.arange(seq_len)
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        starts = torch.randint(0, len(data) - seq_len, (batch, 1), generator=gen)
        x = data[starts + offsets]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"pretrain step {step + 1}/{steps} | loss {sum(losses[-10:]) / len(losses[-10:]):.3f} | "
                f"{time.perf_counter() - t0:.0f}s")
    model.eval()
    return losses


def byte_level_bpe(vocab_size: int, special_tokens: list[str], corpus: list[str]):
    """A byte-level BPE tokenizer trained on `corpus`; the first special token is its unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=special_tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build(out: Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, seed: int = 0,
          text_file: Path | None = None, pretrain_steps: int = 0, pretrain_lr: float = 3e-3,
          pretrain_seq_len: int = 128, pretrain_batch: int = 16, threads: int | None = None,
          log=print) -> Path:
    """Write the model and tokenizer to `out` and return `out`. pretrain_steps=0 (the default): random weights.
    Skipped (with a message through `log`) when `out` already holds a build with the same settings.
    threads: torch intra-op threads while pretraining (default: leave torch's setting)."""
    out = Path(out)
    pre = ({"steps": pretrain_steps, "lr": pretrain_lr, "seq_len": pretrain_seq_len, "batch": pretrain_batch}
           if pretrain_steps > 0 else None)
    settings = build_settings(vocab_size, hidden, layers, seed, text_file, pre)
    if cached(out, settings):
        if log:
            log(f"{out}: already built with these settings ({INFO_FILE}); skipping")
        return out
    (out / INFO_FILE).unlink(missing_ok=True)  # a build killed half-way must not look finished

    import torch
    from tokenizers import processors
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    tok = byte_level_bpe(vocab_size, ["<unk>", "<s>", "</s>"], training_corpus(text_file))
    bos_id, eos_id = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    # Like Zephyr's Llama tokenizer: one BOS in front, no EOS appended (the template writes </s>).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", bos_id)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", model_max_length=4096)
    hf_tok.chat_template = ZEPHYR_CHAT_TEMPLATE

    cfg = MistralConfig(vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=hidden * 2,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=4096, bos_token_id=bos_id, eos_token_id=eos_id,
                        tie_word_embeddings=False, sliding_window=None)
    with torch.random.fork_rng(devices=[]):  # the init draws from the global RNG; leave the caller's as it was
        torch.manual_seed(seed)
        model = MistralForCausalLM(cfg)
    info = {"settings": settings}
    if pre:
        # Each document: <s> title\nabstract </s>, concatenated; training windows are cut anywhere in it.
        stream = [i for d in documents(text_file) for i in tok.encode(d).ids + [eos_id]]
        if len(stream) < 8:
            raise ValueError(f"too little text to pretrain on ({len(stream)} tokens)")
        t1 = time.perf_counter()
        with torch_threads(threads):
            losses = pretrain(model, stream, pretrain_steps, pretrain_lr, pretrain_seq_len, pretrain_batch, seed,
                              log=log)
        info["pretrain_result"] = {"tokens_in_corpus": len(stream), "loss_first": round(losses[0], 4),
                                   "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
                                   "seconds": round(time.perf_counter() - t1, 1)}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    share_like_outputs(out)  # safetensors writes the weights 0600
    info["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / INFO_FILE, info)
    return out


# A ChatML template with a default system prompt of its own when a chat has none, as SmolLM2-Instruct's has
# (written here for the tests; its wording is ours).
CHATML_DEFAULT_SYSTEM = "You are a tiny test model with a default system prompt of its own."
CHATML_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n' + '" + CHATML_DEFAULT_SYSTEM + "' + '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_chatml(out: Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random Llama whose tokenizer carries CHATML_CHAT_TEMPLATE, laid out like SmolLM2-135M-Instruct's:
    special tokens <|endoftext|> (unk), <|im_start|> (BOS, which the template writes; the tokenizer adds none)
    and <|im_end|> (EOS and pad). For tests of a model with a chat template of its own."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    tok = byte_level_bpe(vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], training_corpus(None))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=4096)
    hf_tok.chat_template = CHATML_CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, bos_token_id=hf_tok.bos_token_id,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    share_like_outputs(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/tiny-zephyr", help="output folder (default: %(default)s)")
    p.add_argument("--vocab_size", type=int, default=1024, help="tokenizer vocabulary (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weight init and pretraining seed (default: %(default)s)")
    p.add_argument("--text", type=Path, default=None,
                   help="JSONL/text to train the tokenizer (and pretrain) on (default: data/sample_abstracts.jsonl)")
    g = p.add_argument_group("pretraining (off by default: random weights)")
    g.add_argument("--pretrain_steps", type=int, default=0,
                   help="AdamW steps of plain language modelling on the text, all weights (default: %(default)s)")
    g.add_argument("--pretrain_lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    g.add_argument("--pretrain_seq_len", type=int, default=128, help="tokens per window (default: %(default)s)")
    g.add_argument("--pretrain_batch", type=int, default=16, help="windows per step (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads while pretraining (default: torch's own setting)")
    args = p.parse_args(argv)
    if args.pretrain_steps < 0:
        p.error("--pretrain_steps must be >= 0")
    out = build(Path(args.out), args.vocab_size, args.hidden, args.layers, args.seed, args.text,
                pretrain_steps=args.pretrain_steps, pretrain_lr=args.pretrain_lr,
                pretrain_seq_len=args.pretrain_seq_len, pretrain_batch=args.pretrain_batch, threads=args.threads)
    print(f"tiny model in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
