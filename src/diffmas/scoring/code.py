"""Scoring code answers: pull the code out of a generation, build a test program, run it sandboxed.

Program builders follow the reference harnesses: HumanEval (openai/human-eval `check(entry_point)`),
MBPP (the `test_list` asserts) and MBPP+ (evalplus: expected outputs come from the canonical
solution run on the same inputs, compared exactly, or with `atol` for floats, plus evalplus's
special oracles). Every program runs through `diffmas.scoring.sandbox`, never in this process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from diffmas.scoring.sandbox import run_in_sandbox
from diffmas.tasks.base import Score

_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "python3", "py", "py3"}


def _defines(code: str, entry_point: str) -> bool:
    """True when `code` defines `entry_point` at top level."""
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a generation: the last fenced block that defines `entry_point`, else the last
    ```python block, else the last fenced block of any language, else the whole text.

    An unclosed final fence (generation cut at the token limit) counts as a block.
    """
    blocks = [(lang.strip().lower(), body) for lang, body in _FENCE.findall(text)]
    if entry_point:
        defining = [body for _, body in blocks if _defines(body, entry_point)]
        if defining:
            return defining[-1]
    python = [body for lang, body in blocks if lang in _PYTHON_TAGS]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else text


def _preamble(prompt: str, entry_point: str) -> str:
    """What the prompt has before the entry point's def: imports and helper functions."""
    match = re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", prompt, re.M)
    if match:
        return prompt[: match.start()]
    return "".join(line for line in prompt.splitlines(keepends=True) if line.startswith(("import ", "from ")))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """prompt + completion + test + `check(entry_point)`, as openai/human-eval runs it.

    When the completion already defines the entry point (a chat model repeating the whole
    function), it replaces the prompt's stub; the prompt's preamble (imports and helpers such as
    HumanEval/10's `is_palindrome`) is kept in front of it.
    """
    if _defines(completion, entry_point):
        body = _preamble(prompt, entry_point) + "\n" + completion
    else:
        body = prompt + completion
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(
    code: str, test_list: Sequence[str], test_setup_code: str = "", test_imports: Sequence[str] = ()
) -> str:
    """imports + code + setup + the assert lines (MBPP's `test_list`)."""
    parts = [*test_imports, code, test_setup_code, *test_list]
    return "\n".join(p.replace("\r\n", "\n") for p in parts if p.strip()) + "\n"


def _literal(value: Any) -> str:
    """Python source that evaluates to `value` (unlike repr, also for inf/nan and nested sets)."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float('{value}')"
    if isinstance(value, complex):
        return f"complex({_literal(value.real)}, {_literal(value.imag)})"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + "".join(_literal(v) + ", " for v in value) + ")"
    if isinstance(value, (set, frozenset)):
        items = ", ".join(_literal(v) for v in value)
        return f"{type(value).__name__}([{items}])"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot embed a {type(value).__name__} in a test program: {value!r:.80}")


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def mbppplus_deserialize_inputs(task_id: str | int, inputs: list) -> list:
    """evalplus's `mbpp_deserialize_inputs`: JSON lists back to the tuples/sets/complex numbers
    that some MBPP+ tasks take (e.g. Mbpp/2 takes two tuples). Other tasks are returned as is."""
    n = int(str(task_id).rsplit("/", 1)[-1])
    if n in {
        2,
        116,
        132,
        143,
        222,
        261,
        273,
        394,
        399,
        421,
        424,
        429,
        470,
        560,
        579,
        596,
        616,
        630,
        726,
        740,
        744,
        809,
    }:
        return [[tuple(lst) for lst in inp] for inp in inputs]
    if n in {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}:
        return [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
    if n in {75, 413, 444, 753}:
        return [[[tuple(lst) for lst in inp[0]]] + [inp[1]] for inp in inputs]
    if n in {106, 750}:
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if n == 115:  # `{}` (an empty dict) for empty items is evalplus's own quirk, kept as is
        return [[[set(item) if isinstance(item, list) and len(item) else {} for item in inp[0]]] for inp in inputs]
    if n == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if n in {250, 405, 446, 617, 720, 763, 808}:
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if n in {259, 401, 445}:
        return [[tuple(tuple(lst) for lst in lst_lst) for lst_lst in inp] for inp in inputs]
    if n == 278:
        return [[tuple(tuple(item) if isinstance(item, list) else item for item in inp[0])] for inp in inputs]
    if n == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if n == 722:
        return [[{k: tuple(v) for k, v in inp[0].items()}] + inp[1:] for inp in inputs]
    if n == 252:
        return [[complex(inp[0])] for inp in inputs]
    if n in {580, 615, 791}:
        return [_tuples(inp) for inp in inputs]
    return inputs


# Runs inside the sandbox after the _INPUTS/_ATOL/... assignments that mbppplus_program writes.
# Mirrors evalplus 0.3.1's eval.unsafe_execute / untrusted_check (special oracles from
# evalplus/eval/_special_oracle.py), with its time limits: each input may take max(1 s, 4 x the
# reference's time on it), the candidate as a whole min(60 s, their sum) + 1 s. One addition:
# an output holding an object of a class made by Python code (e.g. one whose __eq__ is always
# true) fails, unless the reference's outputs or the standard library's data types have it.
_MBPPPLUS_HARNESS = r"""
import collections as _collections
import copy as _copy
import decimal as _decimal
import fractions as _fractions
import linecache as _linecache
import math as _math
import os as _os
import resource as _resource
import signal as _signal
import sys as _sys
import time as _time

_OUTPUT_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}
_OUTPUT_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists",
                  "extract_singly", "larg_nnum", "intersection_array", "find_dissimilar", "Diff"}
_ANY_OUTPUT = {"are_equivalent"} | _OUTPUT_NOT_NONE  # oracles that never call the output's ==
_MIN_TIME_LIMIT = 1.0  # evalplus.config.DEFAULT_MIN_TIME_LIMIT
_TIME_LIMIT_FACTOR = 4.0  # evalplus.config.DEFAULT_GT_TIME_LIMIT_FACTOR
_TIMEOUT_PER_TASK = 60.0  # evalplus's EVALPLUS_TIMEOUT_PER_TASK default
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class created by Python code, not a built-in
_STDLIB_DATA = {_collections.Counter, _collections.OrderedDict, _collections.defaultdict,
                _collections.deque, _fractions.Fraction, _decimal.Decimal}
_CONTAINERS = (list, tuple, set, frozenset, dict, _collections.deque)


def _surface_Area(base_edge, height):  # oracle for Mbpp/581
    slant_height = _math.sqrt((base_edge / 2) ** 2 + height**2)
    return round(base_edge**2 + 4 * (base_edge * slant_height) / 2)


def _digit_distance_nums(num1, num2):  # oracle for Mbpp/558
    a, b = str(num1), str(num2)
    width = max(len(a), len(b))
    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(width), b.zfill(width)))


def _load(source, filename):
    _linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": filename.rsplit(".", 1)[0]}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[_ENTRY_POINT]


class _OverTime(Exception):  # an Exception, as evalplus's TimeoutException
    pass


def _on_alarm(signum, frame):
    raise _OverTime()


def _timed_call(fn, args, seconds):
    # evalplus.eval.utils.time_limit: a real-time alarm around the one call
    _signal.signal(_signal.SIGALRM, _on_alarm)
    _signal.setitimer(_signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)


def _out_of_time(message):
    # reported as a timeout: die of SIGXCPU, as the CPU limit below would
    _sys.stderr.write(f"{message}\n")
    _sys.stderr.flush()
    _signal.signal(_signal.SIGXCPU, _signal.SIG_DFL)
    _os.kill(_os.getpid(), _signal.SIGXCPU)


def _limit_cpu(seconds):
    # The candidate's whole budget, as CPU seconds from now: this also stops a loop inside C
    # code, which the alarm cannot interrupt.
    usage = _resource.getrusage(_resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + seconds) + 1
    old_soft, old_hard = _resource.getrlimit(_resource.RLIMIT_CPU)
    if old_hard == _resource.RLIM_INFINITY or soft + 1 <= old_hard:
        _resource.setrlimit(_resource.RLIMIT_CPU, (soft, soft + 1))


def _walk(value):
    # value and what its containers hold, each object once; only built-in and standard-library
    # containers are opened (iterating a class made by the candidate would run its code)
    seen, stack = {}, [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen[id(v)] = v  # kept alive: its id cannot be reused by a later object
        yield v
        t = type(v)
        if t in _CONTAINERS or (t in _STDLIB_DATA and isinstance(v, _CONTAINERS)):
            stack.extend([*v.keys(), *v.values()] if isinstance(v, dict) else v)


def _foreign_type(out, trusted):
    # the first class in `out` made by Python code and not trusted, else None
    for v in _walk(out):
        if type(v).__flags__ & _HEAP_TYPE and type(v) not in trusted:
            return type(v)
    return None


def _is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, float) for i in x)


def _allclose(out, exp, atol, rtol=1e-07):  # numpy.allclose without numpy
    if isinstance(out, (list, tuple)) or isinstance(exp, (list, tuple)):
        return (isinstance(out, (list, tuple)) and isinstance(exp, (list, tuple))
                and len(out) == len(exp) and all(_allclose(o, e, atol, rtol)
                                                 for o, e in zip(out, exp)))
    if isinstance(out, (str, bytes)) or isinstance(exp, (str, bytes)):
        return False
    if isinstance(out, float) and isinstance(exp, float) and (_math.isinf(out) or _math.isinf(exp)):
        return out == exp
    return abs(out - exp) <= atol + rtol * abs(exp)


def _matches(args, out, exp):
    atol = _ATOL
    exact = out == exp
    if _ENTRY_POINT == "are_equivalent":  # Mbpp/164
        exact = True
    elif _ENTRY_POINT == "sum_div":  # Mbpp/295
        exact = exact or out == 0
    elif _ENTRY_POINT == "surface_Area":  # Mbpp/581
        exact = exact or abs(out - _surface_Area(*args)) <= atol
    elif _ENTRY_POINT == "digit_distance_nums":  # Mbpp/558
        exact = exact or out == _digit_distance_nums(*args)
    elif _ENTRY_POINT in _OUTPUT_SET_EQ:
        exact = set(out) == set(exp)
    elif _ENTRY_POINT in _OUTPUT_NOT_NONE:
        exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    if exact or atol == 0:
        return bool(exact)
    if type(out) != type(exp):
        return False
    return _allclose(out, exp, atol)


def _reference_outputs():
    # evalplus's trusted_exec: the canonical solution on a copy of each input, timed
    reference = _load(_REFERENCE, "reference_solution.py")
    expected, seconds = [], []
    for args in _INPUTS:
        args = _copy.deepcopy(args)
        start = _time.time()
        expected.append(reference(*args))
        seconds.append(_time.time() - start)
    if _ENTRY_POINT in _OUTPUT_NOT_NONE:
        expected = [e is not None for e in expected]
    return expected, seconds


def _check():
    expected, reference_s = _reference_outputs()
    limits = [max(_MIN_TIME_LIMIT, _TIME_LIMIT_FACTOR * t) for t in reference_s]
    trusted = _STDLIB_DATA | {type(v) for e in expected for v in _walk(e)}
    _limit_cpu(min(_TIMEOUT_PER_TASK, sum(limits)) + 1)
    candidate = _load(_CANDIDATE, "solution.py")
    for i, (args, exp) in enumerate(zip(_INPUTS, expected)):
        try:
            out = _timed_call(candidate, _copy.deepcopy(args), limits[i])
        except _OverTime:
            _out_of_time(f"input #{i} {repr(args)[:200]}: over its time limit of "
                         f"{limits[i]:.2f} s (max(1 s, 4 x the reference's time))")
        foreign = None if _ENTRY_POINT in _ANY_OUTPUT else _foreign_type(out, trusted)
        if foreign is not None:
            raise AssertionError(f"input #{i} {repr(args)[:200]}: the output holds a "
                                 f"{foreign.__module__}.{foreign.__qualname__} object; only "
                                 "built-in data types (and the reference's) are compared")
        if not _matches(_copy.deepcopy(args), out, exp):
            raise AssertionError(f"input #{i} {repr(args)[:200]}: got {repr(out)[:200]}, "
                                 f"expected {repr(exp)[:200]}")


_check()
"""


def mbppplus_program(
    code: str,
    entry_point: str,
    base_input: Sequence[Any],
    plus_input: Sequence[Any],
    atol: float,
    canonical_solution: str,
    task_id: str | int | None = None,
) -> str:
    """A program that checks `code` on MBPP+'s base and plus inputs, evalplus style.

    The canonical solution computes the expected outputs inside the same sandboxed program
    (before the candidate's code runs), then the candidate runs on fresh copies of each input.
    Inputs are the dataset's JSON rows; pass `task_id` (e.g. "Mbpp/2") to restore the tuples,
    sets and complex numbers that evalplus restores for some tasks, otherwise they stay lists.
    """
    inputs = [*base_input, *plus_input]
    if task_id is not None:
        inputs = mbppplus_deserialize_inputs(task_id, list(inputs))
    header = (
        f"_INPUTS = {_literal(list(inputs))}\n"
        f"_ATOL = {float(atol)!r}\n"
        f"_ENTRY_POINT = {entry_point!r}\n"
        f"_REFERENCE = {canonical_solution!r}\n"
        f"_CANDIDATE = {code!r}\n"
    )
    return header + _MBPPPLUS_HARNESS


def score_code(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Score:
    """Run a test program in the sandbox: correct iff it runs to its end.

    `extracted` is the program that ran (tasks may replace it with the extracted code);
    `reason` is the sandbox status ('failed', 'timeout', 'error', 'killed') when not correct.
    """
    result = run_in_sandbox(program, timeout_s=timeout_s, memory_mb=memory_mb)
    return Score(correct=result.passed, extracted=program, reason=None if result.passed else result.status)
