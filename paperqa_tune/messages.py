"""The chat format every stage shares: messages <-> text with the model's own chat template (Zephyr's when the
tokenizer has none), the training-file record, and the token ids of rendered text. No torch import."""
from __future__ import annotations

import re
from typing import Any


# The chat template shipped with HuggingFaceH4/zephyr-7b-beta (tokenizer_config.json), verbatim.
# transformers renders it with trim_blocks/lstrip_blocks, which gives
#   <|system|>\n{sys}</s>\n<|user|>\n{q}</s>\n<|assistant|>\n{a}</s>\n
# Used when a tokenizer carries no template of its own.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful research assistant. Answer questions about scientific papers accurately "
    "and concisely, using only what the paper states. If the paper does not say, answer that it "
    "does not; if a question rests on a false premise, correct it."
)

# What the project does about system prompts (every stage, through qa_messages and train/chats.load_chats):
# a chat is always rendered with an explicit system turn -- the data's own, else --system_prompt, else
# DEFAULT_SYSTEM_PROMPT -- and run_config.json records it, so evaluation and inference send the very prompt
# training saw. Templates such as SmolLM2's write a default of their own ("You are a helpful AI assistant named
# SmolLM...") when a chat has none; passing one explicitly means that default never silently stands in for ours
# at one stage and not another. Only an explicit choice goes without: --system '' at evaluation or inference,
# a question row with "system": null, or a run from before this rule whose data had none (run_config.json
# system_prompt null) -- each then renders exactly what the template does for a chat without one.

ROLES = ("system", "user", "assistant")
# The default template's turn markers: plain text to a base model, which may write them to start the next
# turn itself; decoding stops at them (chat_stops).
ZEPHYR_MARKERS = ("<|user|>", "<|system|>", "<|assistant|>")
_PROBE = "PAPERQA-END-OF-TURN-PROBE"
EOS = "</s>"
_MARKER_RE = re.compile(r"<\|(system|user|assistant)\|>")


# --------------------------------------------------------------------------- chat format
def render_zephyr(messages: list[dict], add_generation_prompt: bool = False, eos: str = EOS) -> str:
    """Render messages exactly as the Zephyr template does (the pure-Python twin of the Jinja)."""
    out = []
    for m in messages:
        if m["role"] in ROLES:
            out.append(f"<|{m['role']}|>\n{m['content']}{eos}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


def parse_chat(text: str, eos: str = EOS) -> list[dict]:
    """Parse a rendered chat back into messages.

    Accepts both the Zephyr form (`<|user|>\\nq</s>\\n`) and the seed's flat form
    (`<|system|>sys<|user|>q<|assistant|>a`, no newlines, no `</s>`). Raises ValueError when the
    text carries no role marker or a turn is empty.
    """
    parts = _MARKER_RE.split(text)
    if len(parts) < 3:
        raise ValueError("no <|system|>/<|user|>/<|assistant|> marker found")
    if parts[0].strip() and parts[0].strip() != "<s>":
        raise ValueError(f"text before the first role marker: {parts[0].strip()[:40]!r}")
    messages = []
    for role, body in zip(parts[1::2], parts[2::2]):
        if body.startswith("\n"):
            body = body[1:]
        body = body.rstrip("\n")
        if body.endswith(eos):
            body = body[: -len(eos)]
        body = body.strip()
        if not body:
            raise ValueError(f"empty <|{role}|> turn")
        messages.append({"role": role, "content": body})
    return messages


def validate_messages(messages: Any) -> list[dict]:
    """Check a `messages` value from a data file; return it normalised or raise ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a role of {'/'.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{i}] ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant turn")
    return out


def record_messages(record: dict) -> list[dict]:
    """Messages of one training record: `messages` if present, else parsed from `text`."""
    if "messages" in record:
        return validate_messages(record["messages"])
    if isinstance(record.get("text"), str):
        return validate_messages(parse_chat(record["text"]))
    raise ValueError("record has neither 'messages' nor 'text'")


def chat_record(messages: list[dict], meta: dict | None = None) -> dict:
    """A `data/synthetic_qa.jsonl` record as DESIGN.md defines it."""
    return {"text": render_zephyr(messages), "messages": messages, "meta": meta or {}}


def qa_messages(question: str, answer: str | None = None, system: str | None = DEFAULT_SYSTEM_PROMPT,
                history: list[dict] = ()) -> list[dict]:
    """One exchange, after the earlier user/assistant turns of its conversation (`history`); `system` None or
    empty means no system turn: only on an explicit choice (the system-prompt rule above ROLES)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + list(history)
    msgs.append({"role": "user", "content": question})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template Zephyr's. Returns True if one was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    return True


# --------------------------------------------------------------------------- tokenizer glue
def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render with the tokenizer's own chat template (Zephyr's when it has none).

    Training, evaluation and inference all go through here so they see the same format.
    """
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of rendered chat text with exactly one BOS in front (templates like Zephyr's write
    none and the tokenizer adds it; templates that write it themselves must not get a second)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def end_of_turn(tokenizer) -> str:
    """What the tokenizer's chat template writes after an assistant answer, whitespace stripped: "</s>" for
    Zephyr's, "<|im_end|>" for ChatML, "<|eot_id|>" for Llama 3; "" when it writes nothing (or will not render
    a probe chat)."""
    try:
        text = chat_text(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}])
    except Exception:  # a template with its own rules (raise_exception) about the probe: no marker known
        return ""
    return text[text.rfind(_PROBE) + len(_PROBE):].strip() if _PROBE in text else ""


def chat_stops(tokenizer) -> dict:
    """Where an answer ends under the tokenizer's chat template, for decoding (and run_config.json):
    eos_token_ids: the tokenizer's EOS plus the template's end-of-turn token when that is one other token
    (a model's own template: the model learned to end its turn with it); stop_strings: text that ends an
    answer though no single token does -- the default template's turn markers (plain text to a base model,
    which may go on to write the next turn itself) and an end-of-turn marker that is several tokens."""
    marker = end_of_turn(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stops = list(ZEPHYR_MARKERS) if tokenizer.chat_template == ZEPHYR_CHAT_TEMPLATE else []
    if marker:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            eos += [] if ids[0] in eos else ids
        elif marker not in stops:
            stops.append(marker)
    return {"end_of_turn": marker, "eos_token_ids": eos, "stop_strings": stops}
