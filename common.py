"""The data contract the four scripts share (shared/DESIGN.md): the chat format (messages <-> text with the model's
own chat template), JSONL files, exit codes and the command-line style. The code lives in the package
(paperqa_tune/messages.py, files.py, errors.py, cli.py); this module names it for the scripts, and imports
neither torch nor transformers, so every script and test can import it cheaply."""
from __future__ import annotations

from paperqa_tune.errors import (  # noqa: F401
    InputError, RunFailure)
from paperqa_tune.messages import (  # noqa: F401
    DEFAULT_SYSTEM_PROMPT, EOS, ROLES, ZEPHYR_CHAT_TEMPLATE, ZEPHYR_MARKERS, chat_record, chat_stops, chat_text,
    encode_text, end_of_turn, ensure_chat_template, parse_chat, qa_messages, record_messages, render_zephyr,
    validate_messages)
from paperqa_tune.files import (  # noqa: F401
    ADAPTER_WEIGHTS, DEFAULT_RUN_DIR, HELDOUT_QUESTIONS_FILE, append_jsonl, atomic_write_text, check_outputs_free,
    eval_questions_path, jsonl_lines, link_loop_text, os_error_text, output_mode, read_jsonl, read_jsonl_tolerant,
    resolve_path, sha256_file, sha256_text, share_like_outputs, write_json_atomic, write_jsonl_atomic)
from paperqa_tune.cli import (  # noqa: F401
    HelpFormatter, add_flag, finite_float, run_main)
