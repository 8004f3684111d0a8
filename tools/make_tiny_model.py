"""Build a tiny random-init chat model that loads like a hub model (for the demo and the tests).

    python tools/make_tiny_model.py --out models/tiny-zephyr

A 2-layer, hidden-64 Mistral-architecture model plus a byte-level BPE tokenizer trained on the spot,
carrying Zephyr-7B-beta's exact chat template and special tokens (<s>, </s>, <unk>), saved with
save_pretrained so the scripts' real `from_pretrained` code loads it. No download.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ZEPHYR_CHAT_TEMPLATE, render_zephyr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FALLBACK_TEXT = (
    "Large language models are trained on text. We propose a method for fine-tuning with low-rank "
    "adapters and four-bit quantization. The abstract does not state the dataset size. Results show "
    "improved accuracy on question answering benchmarks across several tasks and languages."
)


def training_corpus(text_file: Path | None) -> list[str]:
    lines = [FALLBACK_TEXT]
    src = text_file or ROOT / "data" / "sample_abstracts.jsonl"
    if src.exists():
        for raw in src.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(raw)
                lines.append(f"{obj.get('title', '')}\n{obj.get('abstract', '')}")
            except (json.JSONDecodeError, AttributeError):
                lines.append(raw)
    # Teach the tokenizer the chat markers as ordinary merges, as Zephyr's SentencePiece model has them.
    lines += [render_zephyr([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}])] * 50
    return lines


def build(out: Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, seed: int = 0,
          text_file: Path | None = None) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(text_file), trainer=trainer)
    bos_id, eos_id = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    # Like Zephyr's Llama tokenizer: one BOS in front, no EOS appended (the template writes </s>).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", bos_id)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", model_max_length=4096)
    hf_tok.chat_template = ZEPHYR_CHAT_TEMPLATE

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=hidden * 2,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=4096, bos_token_id=bos_id, eos_token_id=eos_id,
                        tie_word_embeddings=False, sliding_window=None)
    model = MistralForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/tiny-zephyr", help="output folder (default: %(default)s)")
    p.add_argument("--vocab_size", type=int, default=1024, help="tokenizer vocabulary (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default: %(default)s)")
    p.add_argument("--text", type=Path, default=None,
                   help="JSONL/text to train the tokenizer on (default: data/sample_abstracts.jsonl)")
    args = p.parse_args(argv)
    out = build(Path(args.out), args.vocab_size, args.hidden, args.layers, args.seed, args.text)
    print(f"tiny model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
