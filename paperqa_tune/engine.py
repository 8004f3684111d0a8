"""The decoding loop every stage that generates shares (evaluation, quick_infer, generate_qa's local model).

Why our own loop instead of `model.generate`: a decode step at batch 100 on a 7B model is ~5 ms of GPU work
(the weights read once), but `generate` spends ~45 ms of host time per step launching ~1,000 small kernels
(bench/README.md). Here the KV cache is allocated once per batch (`StaticKV`), the model reads it through a
4-D attention mask we build, and on a GPU the one-token step is captured once as a CUDA graph and replayed,
so a step costs one launch. Capture takes two forward passes, not a compile: it pays on the first batch.

The model runs through its own `forward` (transformers' attention layers write keys and values through the
cache's `update(key, value, layer_idx)` and take a prepared 4-D mask as it is), so adapters, merged weights and
any dtype work unchanged. Models whose cache or attention needs more than that use `model.generate`
(`supports`).
"""
from __future__ import annotations

import sys

# Architectures whose attention layers call cache.update(key, value, layer_idx) and take a 4-D mask as given
# (checked in transformers 5.17 and 5.23); anything else decodes through model.generate.
_ARCHS = {"mistral", "llama"}


def supports(model, total_len: int) -> str | None:
    """Why this loop cannot decode `model` up to total_len positions, or None when it can."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in _ARCHS:
        return f"model type {getattr(cfg, 'model_type', '?')!r}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and total_len > window:  # our mask is full-causal: right only inside the window
        return f"{total_len} positions exceed the sliding window of {window}"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "quantized weights"  # bitsandbytes kernels: graph capture is not theirs to promise
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:  # device_map="auto" over several GPUs: one cache and one graph would span them
        return f"the model is spread over {len(devices)} devices"
    return None


def left_pad(batch: list[list[int]], pad_id: int, device):
    """Prompts of different lengths as one (batch, width) id tensor padded on the left with pad_id, and its
    attention mask (1 on real tokens)."""
    import torch

    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids.to(device), mask.to(device)


class StaticKV:
    """Keys and values of every layer for a batch, allocated once: (batch, kv_heads, length, head_dim). The
    positions the next forward writes are `at` (a device tensor the loop moves), so a captured CUDA graph
    serves every step. `visible` is how many positions a forward attends over (the prompt width while
    prefilling, the whole length while decoding)."""

    def __init__(self, config, batch: int, length: int, dtype, device):
        import torch

        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.at = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = length

    def update(self, key, value, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.at, key)
        self.values[layer_idx].index_copy_(2, self.at, value)
        return self.keys[layer_idx][:, :, :self.visible], self.values[layer_idx][:, :, :self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only read when position ids are missing: never here
        return 0


DECODE_ATTN = "paperqa_decode"


def decode_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for SDPA models while our loop decodes: query (B, Hq, 1, D), key/value (B, Hkv, L, D), a boolean
    mask (B, 1, 1, L) -> (B, 1, Hq, D). Transformers' SDPA path copies every key/value head once per query head
    of its group when a mask is given (repeat_kv), and the math kernel it then gets upcasts that copy to fp32:
    at batch 100 that was most of a ~40 ms step on an H200. Here each group of query heads reads its key/value
    head once (two batched matmuls, softmax in fp32). Prompts (several query positions) go to SDPA as before."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q_len, d = query.shape
    if q_len != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    hkv = key.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(query.view(b, hkv, hq // hkv, d), key.transpose(-1, -2)).float() * scale
    scores.masked_fill_(~attention_mask.view(b, 1, 1, -1), float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (B, Hkv, G, D): query head = kv head * G + g
    return out.view(b, hq, 1, d).transpose(1, 2).contiguous(), None


def _use_decode_attention(model) -> str | None:
    """Switch an SDPA model to decode_attention_forward (registered once); returns the implementation to put
    back, or None when the model uses another one (eager, flash...), which is left alone."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        return None
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTN, decode_attention_forward)
    model.config._attn_implementation = DECODE_ATTN
    return impl


def attention_mask(allowed, model):
    """The 4-D mask the model's attention wants: boolean for SDPA (and ours), additive (0 / dtype min) otherwise."""
    import torch

    if getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", DECODE_ATTN):
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)


def penalise_(logits, seen, penalty: float):
    """Repetition penalty as transformers' RepetitionPenaltyLogitsProcessor computes it: the logit of every token
    already seen (`seen`: a boolean (batch, vocab) mask) divided by `penalty` when positive, multiplied when
    negative. The same element-wise ops on the same values, so the same bits; written into `logits`."""
    import torch

    return logits.copy_(torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits))


def choose(logits, dec, step: int, eos_id):
    """Next tokens from float logits (batch, vocab), in place: EOS (an id or a list of ids) barred before
    min_new_tokens, then greedy or sampled (temperature, then top-p over the sorted probabilities, as
    transformers' warpers do)."""
    import torch

    if step < dec.min_new_tokens:
        logits[:, eos_id] = float("-inf")
    if not dec.do_sample:
        return logits.argmax(-1)
    logits = logits / dec.temperature
    if dec.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - dec.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


def seen_tokens(prompt, real, vocab: int):
    """A (batch, vocab + 1) boolean buffer: True where a row's real prompt tokens are (left padding is no
    token of the row's). The extra last column takes the padding's writes; the penalty reads [:, :vocab]."""
    import torch

    seen = torch.zeros((prompt.shape[0], vocab + 1), dtype=torch.bool, device=prompt.device)
    return seen.scatter_(1, prompt.masked_fill(~real, vocab), True)


class _Step:
    """The one-token forward over fixed buffers, eager or replayed from a CUDA graph."""

    def __init__(self, model, kv: StaticKV, tokens, positions, mask):
        self.model, self.kv, self.tokens, self.positions, self.mask = model, kv, tokens, positions, mask
        self.graph, self.logits = None, None

    def forward(self):
        out = self.model(input_ids=self.tokens, attention_mask=attention_mask(self.mask, self.model),
                         position_ids=self.positions, past_key_values=self.kv, use_cache=True)
        return out.logits[:, -1]

    def capture(self) -> str | None:
        """Record the step as a CUDA graph; None when done, else why not (then the step runs eagerly). Warm-up
        runs repeat the step about to run: they write the same keys and values to the same positions."""
        import torch

        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.forward()
            self.graph = graph
            return None
        except Exception as e:  # an op that syncs with the host or allocates outside the pool: run eagerly
            self.graph = self.logits = None
            torch.cuda.synchronize()
            from paperqa_tune.loading import first_line

            return f"{type(e).__name__}: {first_line(e)}"

    def __call__(self):
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


def decode(model, batch: list[list[int]], dec, pad_id: int, eos_id, streamer=None, constraint=None,
           cuda_graphs: bool = True, stop=None) -> list[list[int]]:
    """Generated token ids for each prompt (see _decode; generation.generate_batch cuts each at its EOS), with our
    decode attention while it runs."""
    restore = _use_decode_attention(model)
    try:
        return _decode(model, batch, dec, pad_id, eos_id, streamer, constraint, cuda_graphs, stop)
    finally:
        if restore:
            model.config._attn_implementation = restore


def _decode(model, batch: list[list[int]], dec, pad_id: int, eos_id, streamer=None, constraint=None,
            cuda_graphs: bool = True, stop=None) -> list[list[int]]:
    """Generated token ids for each prompt, as many as the longest reply took (after a row's EOS: padding).
    eos_id: an id or a list of ids that end a row. constraint: an object with fill() (host work for the next
    mask), apply_(logits) and accept(tokens) -> rows that must stop (e.g. grammar.BatchGrammar); stop: one with
    accept(tokens) -> rows that must stop (generation.StopText: a stop string written); streamer: transformers'
    streamer protocol (put the prompt, then each token; end). dec.repetition_penalty (when not 1) is applied to
    the float logits outside the one-token step (and its CUDA graph), from a persistent mask of the tokens each
    row has seen, prompt and output."""
    import torch

    device = next(model.parameters()).device
    n, width = len(batch), max(len(x) for x in batch)
    length = width + dec.max_new_tokens
    dtype = next(model.parameters()).dtype
    kv = StaticKV(model.config.get_text_config(), n, length, dtype, device)

    # Left-padded prompts. Pad queries may see themselves: a row that sees nothing would turn into NaN, and
    # their keys and values (never attended) would carry it into every later step.
    prompt, real = left_pad(batch, pad_id, device)
    real = real.bool()
    positions = (real.long().cumsum(-1) - 1).clamp_(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril_()
    eye = torch.eye(width, dtype=torch.bool, device=device)
    allowed = (real[:, None, None, :] & causal) | (~real[:, None, :, None] & eye)
    kv.at = torch.arange(width, device=device)
    kv.visible = width
    if streamer is not None:
        streamer.put(prompt.cpu())
    logits = model(input_ids=prompt, attention_mask=attention_mask(allowed, model), position_ids=positions,
                   past_key_values=kv, use_cache=True, logits_to_keep=1).logits[:, -1]

    # Buffers of the one-token step; the mask row grows by one position per step.
    kv.at, kv.visible = torch.full((1,), width, dtype=torch.long, device=device), length
    step_mask = torch.zeros((n, 1, 1, length), dtype=torch.bool, device=device)
    step_mask[:, 0, 0, :width] = real
    tokens = torch.zeros((n, 1), dtype=torch.long, device=device)
    step_pos = positions[:, -1:] + 1
    step = _Step(model, kv, tokens, step_pos, step_mask)
    want_graph = cuda_graphs and device.type == "cuda"

    out = torch.full((n, dec.max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    eos_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)
    penalty = getattr(dec, "repetition_penalty", 1.0)
    seen = seen_tokens(prompt, real, logits.shape[-1]) if penalty != 1.0 else None
    watchers = [w for w in (constraint, stop) if w is not None]
    if constraint is not None:
        constraint.fill()
    used = 0
    for t in range(dec.max_new_tokens):
        logits = logits.float()
        if constraint is not None:
            constraint.apply_(logits)
        if seen is not None:
            penalise_(logits, seen[:, :-1], penalty)
        nxt = choose(logits, dec, t, eos_ids).masked_fill_(done, pad_id)
        out[:, t] = nxt
        used = t + 1
        done |= torch.isin(nxt, eos_ids)
        if seen is not None:
            seen.scatter_(1, nxt.masked_fill(done, seen.shape[1] - 1)[:, None], True)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if watchers:
            host = nxt.tolist()
            ended = sorted({i for w in watchers for i in w.accept(host)})
            if ended:
                done[torch.tensor(ended, device=device)] = True
        if t == dec.max_new_tokens - 1 or bool(done.all()):
            break
        tokens.copy_(nxt[:, None])
        if t > 0:  # the first step writes where the prefill left off
            step_pos.add_(1)
            kv.at.add_(1)
        step_mask.index_fill_(-1, kv.at, True)
        if want_graph:
            want_graph = False
            why = step.capture()
            if why:
                print(f"note: decoding without a CUDA graph ({why})", file=sys.stderr)
        logits = step()
        if constraint is not None:
            constraint.fill()  # host work for the next mask, while the GPU runs the step
    if streamer is not None:
        streamer.end()
    return out[:, :used].tolist()
