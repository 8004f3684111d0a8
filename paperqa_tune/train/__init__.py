"""Stage 2, train_qlora_hf.py: QLoRA fine-tuning on the chat JSONL.

Public API (imported lazily):
    chats       load_chats, build_samples, print_inspect (chat rendering, label masks, the mask inspection)
    tokenized   tokenize_cached, cache_key, default_num_proc (the tokenized-data cache)
    samples     padding_share, epoch_plan
    packing     collate, collate_packed, packed_attention_forward, uses_packed_attention, IGNORE, PACKED_ATTN
    qlora       build_qlora_model, check_model_code, LoRASettings, SpeedSettings, TrainableModel
    lora4bit    FusedLoRA, addmm_lora_forward, dequantize
    kernels     fuse_rms_norms, parse_liger, LIGER_AUTO
    optim       make_optimizer, repage_optimizer_state, zero_grads, FlatParams, OPTIMIZERS
    memory      plan_for_budget, apply_checkpoint_plan, auto_budget_gb, peak_memory, frozen_gc, decoder_layers,
                activation_bytes_per_token_layer, parse_mem_budget, BudgetSettings, ModelFootprint
    split       split_train_val, TrainingData
    state       TrainState, StepStats, Schedule, Saving
"""
from paperqa_tune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, __doc__)
