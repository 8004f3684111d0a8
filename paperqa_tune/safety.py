"""What model- or server-written text may never do: carry a secret into a file we write, or turn into chat
structure (a fake turn) when it is rendered into training text."""
from __future__ import annotations

import re

MIN_SECRET_LEN = 8  # shorter keys are placeholders for local servers ("EMPTY", "none"): scrubbing those would
                    # mangle ordinary words

# Zephyr's role markers and the special tokens of the Llama/Mistral family, plus the ChatML / Llama-3 forms a
# model trained on other templates may write.
_STRUCTURE_RE = re.compile(r"<\|(?:system|user|assistant|im_start|im_end|eot_id|start_header_id|end_header_id|"
                           r"begin_of_text|end_of_text)\|>|</s>|<s>|\[/?INST\]|<<SYS>>|<</SYS>>")


def scrub(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` (an API key) replaced."""
    if secret and len(secret) >= MIN_SECRET_LEN and text:
        return text.replace(secret, "[api key removed]")
    return text


def scrub_all(obj, secret: str | None):
    """obj (strings, dicts and lists of them) with `secret` removed from every string in it: what is written must
    never carry the API key."""
    if isinstance(obj, str):
        return scrub(obj, secret)
    if isinstance(obj, dict):
        return {k: scrub_all(v, secret) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_all(v, secret) for v in obj]
    return obj


def chat_structure(text: str, special_tokens=()) -> str | None:
    """The first role marker or special token in `text` (also any of the tokenizer's own `special_tokens`), or
    None. Content that holds one would be rendered as structure: a turn the model never saw as content."""
    m = _STRUCTURE_RE.search(text)
    if m:
        return m.group(0)
    for tok in special_tokens:
        if tok and tok in text:
            return tok
    return None
