"""Stage 3, eval_compare.py: base vs fine-tuned answers scored, judged and reported.

Public API (imported lazily):
    report      open_outputs, output_paths, SIDES (evaluation.csv, summary.json, the marking sheet, the chart)
    verdict     compare, decide, headline, bootstrap_ci, sign_test_p (the paired verdict)
    curve       learning_curve, answers_text, read_answers, PANELS (the evaluation per checkpoint)
    judge       rubric_scores, pairwise, read_rubric, rubric_columns, JudgeConfig (the LLM judge)
    claims      judge_claims, parse_claims, claims_text, VERDICTS
                (the LLM judge's per-claim verdicts: supported / unsupported / contradicted)
"""
from paperqa_tune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, __doc__)
