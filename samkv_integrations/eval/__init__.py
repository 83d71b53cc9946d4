"""The eval harness: score methods against full recompute on question-answering data."""

from samkv_integrations.eval.data import Paragraph, Question, pack_paragraphs, read_questions
from samkv_integrations.eval.harness import EvalConfig, RunPlan, execute_run, plan_run, run_eval
from samkv_integrations.eval.metrics import best_em, best_f1, first_token_kl, normalize_answer
from samkv_integrations.methods.specs import MethodSpec, parse_methods

__all__ = [
    "EvalConfig",
    "MethodSpec",
    "Paragraph",
    "Question",
    "RunPlan",
    "best_em",
    "best_f1",
    "execute_run",
    "first_token_kl",
    "normalize_answer",
    "pack_paragraphs",
    "parse_methods",
    "plan_run",
    "read_questions",
    "run_eval",
]
