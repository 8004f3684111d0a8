"""Where a decode step's time goes (our loop, paperqa_tune/engine.py) on a Mistral-7B-shaped model cut to
--layers layers, batch --batch, random weights built on the GPU (nothing saved):

    python bench/profile_decode.py --layers 8 --batch 100 --steps 128

Prints ms per step with and without the CUDA graph, then torch.profiler's top GPU kernels of eager steps."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Tok:  # what generate_batch needs of a tokenizer, for ids only
    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True):
        return ""


def main(argv=None) -> int:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from paperqa_tune.generation import Decoding, generate_batch

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=128)
    a = p.parse_args(argv)
    cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
                        num_attention_heads=32, num_key_value_heads=8, sliding_window=None)
    with torch.device("cuda"):
        model = MistralForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    prompts = [[1] + [5 + (i * 7 + j) % 30000 for j in range(60 + i % 40)] for i in range(a.batch)]
    for graphs in (True, False, True):
        dec = Decoding(max_new_tokens=a.steps, min_new_tokens=a.steps, cuda_graphs=graphs)
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate_batch(model, _Tok(), prompts, dec)
        torch.cuda.synchronize()
        print(f"cuda_graphs={graphs}: {(time.perf_counter() - t) / a.steps * 1000:.2f} ms/step "
              f"({a.layers} layers, batch {a.batch})", flush=True)
    for graphs in (False, True):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            generate_batch(model, _Tok(), prompts, Decoding(max_new_tokens=32, min_new_tokens=32, cuda_graphs=graphs))
            torch.cuda.synchronize()
        print(f"--- cuda_graphs={graphs}, 32 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
