"""The one place that scores generations: math answers, multiple choice, code and exact answers.

Tasks delegate to these functions; methods never score. Code runs only in the sandbox
(`diffmas.scoring.sandbox`), never in the calling process.
"""

from diffmas.scoring.choice import extract_choice, extract_choice_strict, score_choice
from diffmas.scoring.code import (
    extract_code,
    humaneval_program,
    mbpp_program,
    mbppplus_program,
    score_code,
)
from diffmas.scoring.exact import extract_exact, score_exact
from diffmas.scoring.math import extract_math_answer, gsm8k_gold, math_equal, score_math
from diffmas.scoring.sandbox import SandboxError, SandboxResult, isolation, run_in_sandbox

__all__ = [
    "SandboxError",
    "SandboxResult",
    "extract_choice",
    "extract_choice_strict",
    "extract_code",
    "extract_exact",
    "extract_math_answer",
    "gsm8k_gold",
    "humaneval_program",
    "isolation",
    "math_equal",
    "mbpp_program",
    "mbppplus_program",
    "run_in_sandbox",
    "score_choice",
    "score_code",
    "score_exact",
    "score_math",
]
