"""JSON-schema-constrained decoding for a local model (generate_qa.py --backend hf), through xgrammar.

Why xgrammar: it is the default structured-output engine of vLLM and SGLang, kept by the MLC-AI team; it
compiles a JSON schema against the tokenizer's vocabulary once (milliseconds for ours) and then fills the
allowed-token bitmask of a whole batch in C++ threads, microseconds a row, while the GPU runs the step.
lm-format-enforcer walks a token prefix tree in Python per row and step (too slow at batch 100);
outlines brings a larger stack for the same job.

A grammar makes every reply a valid prefix of the schema; a reply also has to END within --max_tokens to
parse, so the hf backend bounds the schema (`bounded`): how many items, how long a question or an answer
(the curation limits --max_question_chars / --max_answer_chars: a longer one would be dropped anyway).
generate_qa gives the hf backend prompts.request_schema, which also fixes each item's type (the quota asked for),
so a small model cannot put every pair under the one type it likes; each row of a batch may have its own schema.
"""
from __future__ import annotations

import copy
import json


def bounded(schema: dict, items: int, turns: int = 1, max_chars: dict[str, int] | None = None) -> dict:
    """`schema` (prompts.PAIRS_SCHEMA or DIALOGUES_SCHEMA) with the request's shape written in: 1..items pairs
    or conversations, exactly `turns` turns per conversation, and max_chars ({"question": n, "answer": n}) on
    those strings. An array whose items are already fixed one by one (prefixItems: prompts.request_schema) keeps
    its length; only its items' strings are bounded."""
    max_chars = max_chars or {}
    out = copy.deepcopy(schema)

    def walk(node: dict, name: str | None) -> None:
        if node.get("type") == "array" and "prefixItems" in node:
            for child in node["prefixItems"]:
                walk(child, None)
        elif node.get("type") == "array":
            if name == "turns":
                node.update(minItems=turns, maxItems=turns)
            else:
                node.update(minItems=1, maxItems=max(1, items))
            walk(node["items"], None)
        elif node.get("type") == "object":
            for key, child in node.get("properties", {}).items():
                walk(child, key)
        elif node.get("type") == "string" and name in max_chars:
            node["maxLength"] = max_chars[name]

    walk(out, None)
    return out


class JsonGrammar:
    """Compiled schemas for one tokenizer and model vocabulary (the model's logits may be wider than the
    tokenizer: those ids are never allowed)."""

    def __init__(self, tokenizer, vocab_size: int, threads: int | None = None):
        import os

        import xgrammar as xgr

        threads = threads or min(8, os.cpu_count() or 1)
        self.xgr, self.vocab_size, self.threads = xgr, vocab_size, threads
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=[tokenizer.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info)
        self._compiled: dict[str, object] = {}
        self.keep = self._keep_row(info, vocab_size, tokenizer.eos_token_id, set(tokenizer.all_special_ids))

    def _keep_row(self, info, vocab_size: int, eos: int, special: set[int]):
        """A bitmask row that bars two kinds of token the schema grammar would let into a string: ones holding
        a control byte (xgrammar's length-bounded strings exclude only CR and LF, and json.loads rejects the
        rest unescaped) and special tokens other than EOS (decoding drops them: the text would not be what the
        grammar checked). Our grammar has no free whitespace, so no structural token needs either."""
        import torch

        pieces, special = info.decoded_vocab, special | set(info.special_token_ids)  # each read copies: once
        barred = [i for i, piece in enumerate(pieces) if i != eos and
                  (i in special or any(b < 0x20 for b in piece))]
        barred += range(len(pieces), vocab_size)  # ids the tokenizer does not have
        keep = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)
        for i in barred:
            keep[0, i // 32] &= ~(1 << (i % 32)) if i % 32 < 31 else 0x7FFFFFFF
        return keep

    def compiled(self, schema: dict):
        key = json.dumps(schema)  # properties keep their order: the reply writes them in it
        if key not in self._compiled:
            # no free whitespace between tokens: a weak model could otherwise pad with spaces until the budget ends
            self._compiled[key] = self.compiler.compile_json_schema(key, any_whitespace=False)
        return self._compiled[key]

    def batch(self, schema: dict | list[dict], n: int, device) -> "BatchGrammar":
        """The constraint for a batch of n rows: one schema for all, or one per row."""
        schemas = schema if isinstance(schema, list) else [schema] * n
        if len(schemas) != n:
            raise ValueError(f"{len(schemas)} schemas for a batch of {n} rows")
        return BatchGrammar(self, [self.compiled(s) for s in schemas], n, device)


class BatchGrammar:
    """One matcher per row of a batch (each with its row's compiled schema), the decoding loop's `constraint`: fill() computes the next allowed-token
    masks on the host, apply_(logits) bars the rest, accept(tokens) advances the matchers and names the rows
    that are complete (the grammar accepted EOS) or cannot go on."""

    def __init__(self, grammar: JsonGrammar, compiled: list, n: int, device):
        import torch

        xgr = grammar.xgr
        self.xgr, self.vocab_size, self.keep = xgr, grammar.vocab_size, grammar.keep
        self.matchers = [xgr.GrammarMatcher(c) for c in compiled]  # a row's own schema (compiled once each)
        self.active = list(range(n))
        self.host = xgr.allocate_token_bitmask(n, grammar.vocab_size)
        if torch.device(device).type == "cuda":
            self.host = self.host.pin_memory()
        self.device_mask = self.host.to(device)
        self.filler = xgr.BatchGrammarMatcher(grammar.threads)

    def fill(self) -> None:
        if self.active:
            self.filler.batch_fill_next_token_bitmask([self.matchers[i] for i in self.active], self.host,
                                                      indices=self.active)
            self.host &= self.keep

    def apply_(self, logits) -> None:
        if not self.active:
            return
        mask = self.host
        if logits.device.type != "cpu":
            self.device_mask.copy_(self.host, non_blocking=True)
            mask = self.device_mask
        self.xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=self.active)

    def accept(self, tokens: list[int]) -> list[int]:
        stop = []
        for i in self.active:
            m = self.matchers[i]
            if not m.accept_token(tokens[i]) or m.is_terminated():
                stop.append(i)
        if stop:
            stopped = set(stop)
            self.active = [i for i in self.active if i not in stopped]
        return stop

    def hf_processor(self):
        """This batch's grammar as a logits processor for model.generate (architectures our loop does not run):
        the same matchers, masks and barred tokens. generate calls it once per step, the newest token last in
        input_ids."""
        from transformers import LogitsProcessor

        grammar = self

        class _GrammarProcessor(LogitsProcessor):
            started = False

            def __call__(self, input_ids, scores):
                if self.started:  # the token chosen at the previous call
                    grammar.accept(input_ids[:, -1].tolist())
                self.started = True
                grammar.fill()
                grammar.apply_(scores)
                return scores

        return _GrammarProcessor()
