"""Stage 1, generate_qa.py: abstracts in, curated chat Q&A out.

Public API (imported lazily, so reading abstracts never pulls in torch):
    abstracts   read_abstract_file, input_files, fetch_arxiv, http_session
    fulltext    read_pdf, read_pdf_bytes, add_full_texts, split_sections, split_long, PdfRejected
    prompts     generation_messages, type_quotas, request_schema, type_order, TYPES, ANSWERABLE, PAIRS_SCHEMA,
                DIALOGUES_SCHEMA, SCORES_SCHEMA
    replies     parse_reply, reply_problem, judge_scores
    curation    CurationRules, check_pair, curate, judge, skip_too_long, split_papers, to_records, quality_items,
                source_units
    offline_qa  offline_pairs, offline_conversations, split_sentences, OFFLINE_MODEL
    quality     quality_report, format_quality, plot_quality
    grammar     JsonGrammar, bounded (JSON-schema-constrained decoding for the local backend)
    textsim     grounding, jaccard, numbers, normalized, question_tokens, cross_group_near_duplicates
"""
from paperqa_tune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, __doc__)
