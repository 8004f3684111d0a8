"""The speed path of train_qlora_hf.py (issue 5) against the plain one, on the tiny model, on CPU.

Packing (one row per micro-batch, per-sample attention), the lean 4-bit+LoRA kernel and the fused RMSNorm
must compute what the padded PEFT path computes (fp32 here, so the tolerance is fp32 rounding); the
--gpu_mem_budget planner is a pure function checked with the 7B numbers measured on an H100.
Liger and flash varlen attention need CUDA: on CPU they must be skipped with a log line (tested), and
bench/bench_train.py exercises them on the GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_qlora_hf as T
from paperqa_tune.loading import load_tokenizer
from paperqa_tune.train.lora4bit import FusedLoRA, dequantize
from paperqa_tune.train.memory import (ModelFootprint, activation_bytes_per_token_layer, apply_checkpoint_plan,
                                       decoder_layers, max_micro_tokens, pick_micro_batch, plan_checkpointing)
from paperqa_tune.train.optim import FlatParams, make_optimizer, zero_grads
from paperqa_tune.train.packing import PACKED_ATTN, collate, collate_packed, uses_packed_attention

FP32 = ["--no-bf16", "--lora_dropout", "0"]


def _args(tiny_model, *flags):
    return T.build_parser().parse_args(["--model", str(tiny_model), *FP32, *map(str, flags)])


def _samples(n_lengths=(23, 41, 9, 30), seed=0):
    """Random token ids; the first third of each sample is prompt (-100), as in a chat."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in n_lengths:
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def _nonzero_lora_b(model, seed=1):
    """LoRA B starts at zero (the adapter is a no-op); make it non-zero so the adapter path is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _lora_grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture(scope="module")
def packed_model(tiny_model):
    tm = T.load_model(_args(tiny_model))  # defaults: packing, fused LoRA, fused norm
    assert uses_packed_attention(tm.model.get_base_model())
    _nonzero_lora_b(tm.model)
    return tm


# --------------------------------------------------------------------------- packing
@pytest.mark.numerics
@pytest.mark.cpu_only
def test_packed_equals_padded_per_sample_losses_and_grads(packed_model):
    model, samples = packed_model.model, _samples()
    base = model.get_base_model()
    n_items = sum(T.n_trained(s) for s in samples)

    packed = collate_packed(samples, torch.device("cpu"))
    # the label mask is the padded one: same trained tokens, nothing predicted across a sample boundary
    assert int((packed["labels"] != -100).sum()) == n_items
    assert packed["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in samples))
    loss_p = T.micro_loss(model, packed, n_items, torch.autocast("cpu", enabled=False))
    out_p = model(**{k: packed[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                            "max_length_q", "max_length_k")})
    loss_p.backward()
    grads_p = _lora_grads(model)
    cu = packed["cu_seq_lens_q"].tolist()
    per_p = _per_sample_losses_packed(out_p.logits[0], cu, samples)

    base.set_attn_implementation("sdpa")  # the reference: plain SDPA with the padding mask, the pre-issue-5 path
    try:
        padded = collate(samples, 0, torch.device("cpu"))
        assert padded["attention_mask"] is not None  # lengths differ: a real mask is used
        loss_r = T.micro_loss(model, padded, n_items, torch.autocast("cpu", enabled=False))
        out_r = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
        loss_r.backward()
        grads_r = _lora_grads(model)
    finally:
        base.set_attn_implementation(PACKED_ATTN["loop"])
    per_r = torch.stack([torch.nn.functional.cross_entropy(
        out_r.logits[i, :len(s["input_ids"]) - 1].float(), torch.tensor(s["labels"][1:]), ignore_index=-100,
        reduction="sum") for i, s in enumerate(samples)])

    assert torch.allclose(per_p, per_r, rtol=1e-5, atol=1e-4), (per_p, per_r)
    assert loss_p.item() == pytest.approx(loss_r.item(), rel=1e-5)
    assert grads_p.keys() == grads_r.keys() and len(grads_p) == 2 * 7 * 2
    for n in grads_r:
        assert torch.allclose(grads_p[n], grads_r[n], rtol=1e-4, atol=1e-6), n

    # negative control: the same row without the sample boundaries lets samples attend to each other,
    # and the check above would have caught it
    leak = {k: packed[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        out_leak = model(**leak)
    per_leak = _per_sample_losses_packed(out_leak.logits[0], cu, samples)
    assert not torch.allclose(per_leak[1:], per_r[1:], rtol=1e-3, atol=1e-2)


def _per_sample_losses_packed(logits, cu, samples):
    """Token-summed cross-entropy of each sample of a packed row (no target across a boundary)."""
    return torch.stack([torch.nn.functional.cross_entropy(
        logits[a:b - 1].float(), torch.tensor(s["labels"][1:]), ignore_index=-100, reduction="sum")
        for a, b, s in zip(cu[:-1], cu[1:], samples)])


@pytest.mark.numerics
@pytest.mark.cpu_only
def test_validation_loss_packed_equals_padded(packed_model, tiny_model):
    import dataclasses

    samples = _samples((12, 35, 20), seed=3)
    loop = T.Loop(packed_model, load_tokenizer(tiny_model, "right"), _args(tiny_model, "--flat_optim"), total=1)
    packed = T.validation_loss(loop, samples, 2)
    loop.tm = dataclasses.replace(packed_model, packed=False)  # the same model fed right-padded micro-batches
    padded = T.validation_loss(loop, samples, 2)
    assert packed == pytest.approx(padded, rel=1e-5)


def test_seed_sets_the_lora_init_with_packing_on(tiny_model):
    """--seed decides the adapters' random init. The packed-attention self-test draws random numbers while the
    model loads (on CPU too: there it fails at once for want of a flash kernel); it must not reseed the
    process, as it once did with torch.manual_seed(0), which made every seed give the same init."""
    def lora_a(seed):
        tm = T.load_model(_args(tiny_model, "--seed", seed))
        assert tm.packed
        return {n: p.detach().clone() for n, p in tm.model.named_parameters() if "lora_A" in n}

    one, two, one_again = lora_a(1), lora_a(2), lora_a(1)
    assert len(one) == 14
    assert all(not torch.equal(one[n], two[n]) for n in one)
    assert all(torch.equal(one[n], one_again[n]) for n in one)


# --------------------------------------------------------------------------- lean 4-bit + LoRA kernel
@pytest.mark.numerics
@pytest.mark.cpu_only
def test_lean_lora_forward_backward_equals_peft(tiny_model):
    from peft.tuners.lora.bnb import Linear4bit

    model = T.load_model(_args(tiny_model, "--no-fused_lora", "--no-packing")).model
    _nonzero_lora_b(model, seed=5)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 2 * 7 and all("forward" not in m.__dict__ for m in layers)  # PEFT's own forward
    fused = FusedLoRA(fp32_sum=True)  # not patched in: called side by side with PEFT's forward
    g = torch.Generator().manual_seed(0)
    for m in (layers[0], layers[5]):  # q_proj (64 -> 64) and up_proj (64 -> MLP width)
        x = torch.randn(2, 7, m.in_features, generator=g, requires_grad=True)
        go = torch.randn(2, 7, m.out_features, generator=g)
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        outs = []
        for fwd in (lambda t: m(t), lambda t: fused.forward(m, t)):
            y = fwd(x)
            y.backward(go)
            outs.append((y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()))
            x.grad = a.grad = b.grad = None
        for ref, got, what in zip(outs[0], outs[1], ("output", "grad x", "grad A", "grad B")):
            assert got.dtype == ref.dtype, what
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (what, (got - ref).abs().max())
        assert a.dtype == torch.float32  # LoRA masters stay fp32
        with model.disable_adapter():  # adapters off: the lean path falls back to the base layer alone
            assert torch.allclose(fused.forward(m, x), m.base_layer(x), atol=1e-6)


@pytest.mark.numerics
@pytest.mark.cpu_only
def test_lean_lora_dropout_is_reproducible_and_scaled(tiny_model):
    """With dropout the lean kernel draws its own mask: same seed, same output; gradients consistent with it."""
    from peft.tuners.lora.bnb import Linear4bit

    model = T.load_model(_args(tiny_model, "--no-packing", "--lora_dropout", "0.5")).model
    _nonzero_lora_b(model, seed=6)
    m = next(x for x in model.modules() if isinstance(x, Linear4bit))
    x = torch.randn(3, 5, m.in_features, requires_grad=True)
    torch.manual_seed(0)
    y1 = m(x)
    torch.manual_seed(0)
    y2 = m(x)
    assert torch.equal(y1, y2)
    model.eval()  # no dropout in eval: equals PEFT's own forward
    assert torch.allclose(m(x), Linear4bit.forward(m, x), atol=1e-5)
    model.train()
    # finite-difference check of d(sum y)/dx along a random direction, same mask (same seed)
    v = torch.randn_like(x)
    torch.manual_seed(1)
    m(x).sum().backward()
    eps = 1e-2
    with torch.no_grad():
        torch.manual_seed(1)
        plus = m(x + eps * v).sum()
        torch.manual_seed(1)
        minus = m(x - eps * v).sum()
    assert float((x.grad * v).sum()) == pytest.approx(float((plus - minus) / (2 * eps)), rel=2e-2, abs=1e-3)

    # dropout keeps no mask or dropped copy for backward (the mask is drawn again there): same saved bytes as p=0
    def saved_bytes():
        got = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: got.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            m(x)
        return sum(got)

    with_dropout = saved_bytes()
    m.lora_dropout["default"].p = 0.0
    assert saved_bytes() == with_dropout


def test_lora_sum_keeps_small_deltas(tiny_model):
    """bf16: a LoRA delta far under half a bf16 step of the base output must survive the rounding on average
    (--lora_fp32_sum: one rounding of base + delta), while the two-rounding order (--no-lora_fp32_sum, the
    negative control) loses most of it. A fresh adapter's updates are that small."""
    from peft.tuners.lora.bnb import Linear4bit

    tm = T.load_model(T.build_parser().parse_args(["--model", str(tiny_model), "--no-packing"]))
    m = [x for x in tm.model.modules() if isinstance(x, Linear4bit)][5]  # up_proj
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, m.in_features, generator=g).to(torch.bfloat16)
    a = m.lora_A["default"].weight.to(torch.bfloat16).double()
    w = dequantize(m.base_layer.weight.data, m.base_layer.weight.quant_state).double()
    base64 = x.double() @ w.t()
    with torch.no_grad():
        b = torch.randn(m.lora_B["default"].weight.shape, generator=g)
        delta = m.scaling["default"] * (x.double() @ a.t()).to(torch.bfloat16).double() @ b.double().t()
        # scale B so that the delta is ~1/20 of half a bf16 step of the base output
        half_ulp = (base64.abs().mean() * 2.0 ** -8).item()
        m.lora_B["default"].weight.copy_(b * (half_ulp / 20 / delta.std().item()))
        b16 = m.lora_B["default"].weight.to(torch.bfloat16).double()
        delta = m.scaling["default"] * (x.double() @ a.t()).to(torch.bfloat16).double() @ b16.t()
        base_rounded = base64.to(torch.bfloat16).double()
        kept = {}
        for on in (True, False):
            tm.fused.fp32_sum = on
            y = m(x).double()
            kept[on] = float(((y - base_rounded) * delta).sum() / (delta * delta).sum())
    assert kept[True] > 0.8, kept
    assert kept[False] < 0.3, kept  # the check can fail: the two-rounding order loses the delta


@pytest.mark.numerics
@pytest.mark.cpu_only
@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "adamw_torch"])
def test_flat_optimizer_update_equals_per_tensor(optim):
    """--flat_optim: one flat parameter gives bit for bit the update of one parameter per tensor (8-bit state
    blocks do not straddle tensors; tensors too small for 8-bit state stay separate)."""
    args = T.build_parser().parse_args(["--model", "x", "--optim", optim, "--lr", "1e-2"])
    shapes = [(16, 4096), (1024, 16), (16, 300), (4096, 16), (8, 100)]  # 4,800: not a multiple of 256
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    runs = []
    for flat_on in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        flat = FlatParams(params) if flat_on else None
        if flat_on:
            assert len(flat.flat_members) == 4 and flat.separate == [params[4]]  # 800 elements: 32-bit state
            assert all(p.data.data_ptr() != t.data_ptr() for p, t in zip(params, init))
        opt = make_optimizer(flat.optimizer_params() if flat_on else params, args.optim, args.lr, args.weight_decay)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            if flat_on:
                flat.gather_grads()
            opt.step()
            zero_grads(opt, params)
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], init[0])  # the optimizer did move them


def test_cached_scales_dequantize_bit_for_bit(tiny_model):
    """The fused LoRA layers dequantise with the fp32 block scales expanded once at load: same weights as
    bitsandbytes' own dequantize_4bit, bit for bit."""
    import bitsandbytes.functional as bnbF
    from peft.tuners.lora.bnb import Linear4bit

    tm = T.load_model(T.build_parser().parse_args(["--model", str(tiny_model), "--no-packing"]))
    layers = [m for m in tm.model.modules() if isinstance(m, Linear4bit)]
    assert tm.fused.layers == layers
    for m in layers:
        w = m.base_layer.weight
        absmax = tm.fused.absmax32(w.quant_state)
        assert absmax is not None  # the cached path is the one tested
        assert torch.equal(dequantize(w.data, w.quant_state, absmax), bnbF.dequantize_4bit(w.data, w.quant_state))


def test_compute_copy_is_used_only_while_the_weights_are_unchanged():
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    flat = FlatParams(params)
    fused = FusedLoRA()
    copies = flat.compute_copies(torch.bfloat16)
    fused.use_compute_copies(copies, torch.bfloat16)
    p, copy = copies[1]
    assert p is params[1]
    c = fused.compute_copy(p, torch.bfloat16)
    assert c.data_ptr() == copy.data_ptr() and torch.equal(c, p.detach().to(torch.bfloat16))
    with torch.no_grad():
        p.add_(1.0)  # changed after the copies were made: the stale copy must not be used
    c = fused.compute_copy(p, torch.bfloat16)
    assert c.data_ptr() != copy.data_ptr() and torch.equal(c, p.detach().to(torch.bfloat16))
    copies = flat.compute_copies(torch.bfloat16)
    fused.use_compute_copies(copies, torch.bfloat16)
    assert fused.compute_copy(p, torch.bfloat16).data_ptr() == copies[1][1].data_ptr()
    assert torch.equal(fused.compute_copy(p, torch.float32), p)  # another dtype: no copy involved


# --------------------------------------------------------------------------- fused RMSNorm
@pytest.mark.numerics
@pytest.mark.cpu_only
def test_fused_rmsnorm_matches_hf(tiny_model):
    model = T.load_model(_args(tiny_model, "--no-packing")).model
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all("forward" in m.__dict__ for m in norms)
    x = torch.randn(2, 5, norms[0].weight.shape[0])
    for m in norms:
        assert torch.allclose(m(x), type(m).forward(m, x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- --gpu_mem_budget
# 7B shape as measured on the H100 (bench/README.md): 4.5 GB static (4-bit weights + LoRA fp32 masters),
# 41.9M LoRA parameters, 32 layers, hidden 4096, MLP 14336.
SEVEN_B = ModelFootprint(static_bytes=4.5e9, n_lora=41_943_040, hidden=4096, intermediate=14336, n_layers=32)


def test_plan_long_under_6_5_gb_offloads():
    plan = plan_checkpointing(6.5, optim="paged_adamw_8bit", max_tokens=4096, dropout=0.0, model=SEVEN_B)
    assert plan["mode"] == "offload" and plan["fits"]
    assert 5.4 < plan["estimate_gb"] < 6.0  # measured: 5.77 GB
    full = plan_checkpointing(8.0, optim="paged_adamw_8bit", max_tokens=4096, dropout=0.0, model=SEVEN_B)
    assert full["mode"] == "skip" and full["skip_layers"] >= 1  # measured full checkpointing: 6.86 GB


def test_plan_qa_spends_the_seed_memory_on_layers_without_checkpointing():
    plan = plan_checkpointing(15.6, optim="paged_adamw_8bit", max_tokens=5600, dropout=0.0, model=SEVEN_B)
    assert plan["mode"] == "skip" and 8 <= plan["skip_layers"] <= 12 and plan["estimate_gb"] <= 15.6
    fused = plan_checkpointing(15.6, optim="adamw_torch_fused", max_tokens=5600, dropout=0.0, model=SEVEN_B)
    drop = plan_checkpointing(15.6, optim="paged_adamw_8bit", max_tokens=5600, dropout=0.05, model=SEVEN_B)
    assert fused["skip_layers"] <= plan["skip_layers"] and drop["skip_layers"] < plan["skip_layers"]
    ks = [plan_checkpointing(b, optim="paged_adamw_8bit", max_tokens=5600, dropout=0.0, model=SEVEN_B)["skip_layers"]
          for b in (8, 10, 12, 16, 20, 40, 80)]
    assert ks == sorted(ks) and ks[-1] == 32  # more memory, more layers; everything fits at 80 GB
    tiny = plan_checkpointing(1.0, optim="paged_adamw_8bit", max_tokens=4096, dropout=0.0, model=SEVEN_B)
    assert tiny["mode"] == "offload" and not tiny["fits"]  # reported, the run still tries
    assert activation_bytes_per_token_layer(4096, 14336, 0.0) == pytest.approx(145e3)
    assert activation_bytes_per_token_layer(4096, 14336, 0.05) == pytest.approx(166e3)


def test_whole_step_micro_batch_only_when_it_costs_no_recompute():
    """--merge_micro_batches: the seed command's short Q&A steps (16 samples, ~2,300 tokens) fit a 40 GB budget as
    one packed row with no checkpointing, as do 8-sample micro-batches: one row wins (fewer kernels, same maths).
    Long 4,096-token samples in 6.5 GB: merging would need offload where --batch 1 needs less, so --batch stays."""
    def option(micro, tokens, budget):
        return micro, tokens, plan_checkpointing(budget, optim="paged_adamw_8bit", max_tokens=tokens, dropout=0.0,
                                                 model=SEVEN_B)
    qa = [option(16, 2300, 40.0), option(8, 1200, 40.0)]
    assert pick_micro_batch(qa)[0] == 16 and qa[0][2]["skip_layers"] == 32
    long = [option(16, 16 * 4096, 6.5), option(1, 4096, 6.5)]
    assert pick_micro_batch(long)[0] == 1
    # a merge that would checkpoint more layers than --batch does is refused
    tight = [option(16, 5600, 15.6), option(8, 2800, 15.6)]
    assert tight[0][2]["skip_layers"] < tight[1][2]["skip_layers"] and pick_micro_batch(tight)[0] == 8
    over = [option(16, 10**6, 40.0), option(8, 1200, 40.0)]
    assert not over[0][2]["fits"] and pick_micro_batch(over)[0] == 8


def test_checkpoint_plan_is_applied_to_the_last_layers(tiny_model):
    model = T.load_model(_args(tiny_model, "--no-packing")).model
    _, layers = decoder_layers(model)
    assert len(layers) == 2 and all(l.gradient_checkpointing for l in layers)
    assert apply_checkpoint_plan(model, {"mode": "skip", "skip_layers": 1}) == []
    assert [l.gradient_checkpointing for l in layers] == [True, False]


def test_offloaded_checkpoints_keep_only_layer_inputs_in_host_memory(tiny_model):
    """mode "offload": the decoder stack runs inside save_on_cpu, with the checkpoints' own hooks innermost, so
    the same loss and gradients come out and a checkpointed layer saves no more than without offload."""
    model = T.load_model(_args(tiny_model, "--no-packing")).model
    model.train()  # checkpointing is on in training mode only
    _nonzero_lora_b(model, seed=8)
    batch = collate(_samples((17, 29)), 0, torch.device("cpu"))
    amp = torch.autocast("cpu", enabled=False)

    def loss_grads():
        packed_to_host = []
        real = torch.autograd.graph.save_on_cpu.__init__

        def spy(self, pin_memory=False, device_type="cuda"):
            real(self, pin_memory, device_type)
            pack = self.pack_hook  # count what the offload actually moves
            self.pack_hook = lambda t: packed_to_host.append(t.numel()) or pack(t)

        torch.autograd.graph.save_on_cpu.__init__ = spy
        try:
            loss = T.micro_loss(model, batch, 1, amp)
            loss.backward()
        finally:
            torch.autograd.graph.save_on_cpu.__init__ = real
        return loss.item(), _lora_grads(model), packed_to_host

    ref_loss, ref_grads, none = loss_grads()
    handles = apply_checkpoint_plan(model, {"mode": "offload", "skip_layers": 0}, pin_memory=False)
    try:
        loss, grads, moved = loss_grads()
    finally:
        for h in handles:
            h.remove()
    assert none == [] and moved  # offload on: tensors went through save_on_cpu
    width = batch["input_ids"].numel() * model.config.hidden_size
    # layer inputs (tokens x hidden) and small tensors, never a layer's inner activations (tokens x MLP width:
    # what this check sees if checkpointing is off, e.g. in eval mode)
    assert max(moved) <= width and sum(moved) < 6 * width, moved
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-6) for n in ref_grads)


def test_max_micro_tokens_packed_and_padded():
    lengths = [10, 50, 20, 40, 30, 60]
    # file order, steps of 4 samples, micro-batches of 2 (sorted longest first inside a step)
    file_order = T.epoch_plan(lengths, 4, 0, 0, False, False)
    assert max_micro_tokens(file_order, lengths, 2, 0, 1, packed=True) == 90   # 50 + 40
    assert max_micro_tokens(file_order, lengths, 2, 0, 1, packed=False) == 120  # 2 x 60
    two_epochs = [s for e in range(2) for s in T.epoch_plan(lengths, 6, 0, e, True, True)]
    assert max_micro_tokens(two_epochs, lengths, 6, 0, 1, packed=True) == sum(lengths)


# --------------------------------------------------------------------------- the CLI with the new flags
@pytest.mark.numerics
@pytest.mark.cpu_only
def test_fast_and_plain_paths_train_the_same(tiny_model, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    from common import chat_record, qa_messages

    rows = [chat_record(qa_messages(f"Question {i}?" + " More." * (i % 4), f"Answer number {i}."),
                        {"paper_id": f"p{i}"}) for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["--jsonl", str(data), "--model", str(tiny_model), "--max_steps", "3", "--batch", "4",
              "--grad_accum", "1", "--lr", "1e-3", "--val_fraction", "0", "--optim", "adamw_torch", *FP32]
    assert T.main(common + ["--out", str(tmp_path / "fast"), "--liger", "all", "--gpu_mem_budget", "10"]) == 0
    log = capsys.readouterr().out
    assert "packing: one SDPA call per sample" in log and "fused LoRA: 14 layers" in log
    assert "Liger: skipped (--liger all: Liger's Triton kernels need CUDA)" in log
    assert "fused RMSNorm: 5 modules" in log  # Liger's RMSNorm was not applied, so the torch one is
    assert "--gpu_mem_budget 10.0: ignored on cpu" in log
    plain = ["--no-packing", "--no-fused_lora", "--no-fused_norm", "--liger", "off"]
    assert T.main(common + ["--out", str(tmp_path / "plain"), *plain]) == 0
    assert T.main(common + ["--out", str(tmp_path / "seed"), *plain, "--kbit_upcast"]) == 0
    assert "fp32 upcast + autocast (--kbit_upcast)" in capsys.readouterr().out
    m = {k: json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("fast", "plain", "seed")}
    assert m["fast"]["trained_tokens"] == m["plain"]["trained_tokens"] == m["seed"]["trained_tokens"]
    assert m["fast"]["padded_tokens"] == m["fast"]["input_tokens"] < m["plain"]["padded_tokens"]  # no padding
    loss = {k: [r["loss"] for r in v["train"]] for k, v in m.items()}
    assert loss["fast"] == pytest.approx(loss["plain"], abs=1e-4)  # fp32: the same updates
    assert loss["fast"] == pytest.approx(loss["seed"], abs=1e-4)


@pytest.mark.numerics
def test_dense_base_weights_give_the_same_numbers(tiny_model):
    """--dense_base keeps each base weight dequantised; the copy holds the bits a dequantisation gives, so the
    layer's output and gradients are the same tensors, bit for bit (the same kernels on the same inputs)."""
    tm = T.load_model(_args(tiny_model, "--no-packing"))
    _nonzero_lora_b(tm.model, seed=3)
    fused, g = tm.fused, torch.Generator().manual_seed(0)
    xs = [(m, torch.randn(2, 5, m.in_features, generator=g), torch.randn(2, 5, m.out_features, generator=g))
          for m in fused.layers]

    def run():
        out = []
        for m, x0, go in xs:
            x = x0.clone().requires_grad_(True)
            y = fused.forward(m, x)
            y.backward(go)
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            out.append((y.detach(), x.grad, a.grad.clone(), b.grad.clone()))
            a.grad = b.grad = None
        return out

    before = run()
    n, size = fused.keep_dense(max_bytes=None)
    assert n == len(fused.layers) and size == sum(m.in_features * m.out_features * 4 for m in fused.layers)  # fp32
    after = run()
    for ref, got in zip(before, after):
        assert all(torch.equal(r, t) for r, t in zip(ref, got))
    # a budget keeps the first layers that fit, in model order, and no more
    part = FusedLoRA()
    part.layers = fused.layers
    first = fused.layers[0]
    assert part.keep_dense(max_bytes=first.in_features * first.out_features * 4 + 1) == (1, first.in_features
                                                                                        * first.out_features * 4)
    assert part.keep_dense_for("off", {"budget_gb": 9, "estimate_gb": 1}) is None
    assert part.keep_dense_for("auto", None) is None  # no memory plan (CPU, or no budget): nothing kept


def test_dense_base_on_trains_the_same_run(tiny_model, tmp_path, capsys):
    """The whole run with every base weight kept dequantised: the same losses and the same adapter, bit for bit."""
    data = tmp_path / "qa.jsonl"
    from common import chat_record, qa_messages

    rows = [chat_record(qa_messages(f"Question {i}?", f"Answer number {i}."), {"paper_id": f"p{i}"})
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["--jsonl", str(data), "--model", str(tiny_model), "--max_steps", "2", "--batch", "4",
              "--grad_accum", "1", "--lr", "1e-3", "--val_fraction", "0", *FP32]
    assert T.main(common + ["--out", str(tmp_path / "off"), "--dense_base", "off"]) == 0
    assert T.main(common + ["--out", str(tmp_path / "on"), "--dense_base", "on"]) == 0
    assert "--dense_base on: 14 of 14 layers' base weights kept dequantised" in capsys.readouterr().out
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / k / "adapter_model.safetensors") for k in ("off", "on"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = {k: json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("off", "on")}
    assert [r["loss"] for r in m["off"]["train"]] == [r["loss"] for r in m["on"]["train"]]


def test_bad_speed_flags_exit_2(tiny_model, tmp_path, capsys):
    data = Path(__file__).resolve().parent / "data"
    jsonl = next(iter(sorted(data.glob("*.jsonl"))), None) if data.is_dir() else None
    if jsonl is None:
        jsonl = tmp_path / "x.jsonl"
        jsonl.write_text("{}\n")
    assert T.main(["--jsonl", str(jsonl), "--out", str(tmp_path / "o"), "--gpu_mem_budget", "0"]) == 2
    assert "--gpu_mem_budget must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        T.build_parser().parse_args(["--liger", "bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        T.build_parser().parse_args(["--liger", "flce,softmax"])
    assert e.value.code == 2
    assert T.build_parser().parse_args(["--liger", "FLCE, rope,flce"]).liger == "flce,rope"


def test_fp32_packed_attention_never_takes_the_half_precision_kernel():
    """The flash varlen kernel takes fp16/bf16 only: an fp32 run (--no-bf16) on a GPU whose self-test chose it
    must take the per-sample path (it crashed with 'FlashAttention only support fp16 and bf16'). On CPU, where
    varlen has no kernel at all, the same call shows the guard: it returns the per-sample result."""
    from types import SimpleNamespace

    from paperqa_tune.train.packing import packed_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 12, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    module = SimpleNamespace(num_key_value_groups=1, training=False, is_causal=True)
    kw = {"cu_seq_lens_q": cu, "max_length_q": 7}
    loop, _ = packed_attention_forward(module, q, k, v, None, scaling=0.35, impl="loop", **kw)
    varlen, _ = packed_attention_forward(module, q, k, v, None, scaling=0.35, impl="varlen", **kw)
    assert torch.equal(loop, varlen)
