"""Code scoring: extraction, program builders, the sandbox's containment, and benchmark corpora.

The corpus tests run HumanEval in full and a deterministic subset of MBPP / MBPP+ by default;
DIFFMAS_FULL_CORPUS=1 runs all of MBPP (task ids 11-510) and MBPP+ (399 tasks, about a minute).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from diffmas.scoring import (
    SandboxResult,
    extract_code,
    humaneval_program,
    isolation,
    mbpp_program,
    mbppplus_program,
    run_in_sandbox,
    sandbox,
    score_code,
)
from diffmas.scoring.code import _literal, mbppplus_deserialize_inputs
from diffmas.scoring.sandbox import Isolation
from diffmas.tasks.base import Score

from conftest import data_file

FULL_CORPUS = os.environ.get("DIFFMAS_FULL_CORPUS") == "1"
WORKERS = max(2, os.cpu_count() or 2)  # each run is mostly interpreter start-up: overlap them


def _rows(name: str) -> list[dict]:
    with open(data_file(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _run_all(programs: list[str], **limits) -> list[SandboxResult]:
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda p: run_in_sandbox(p, **limits), programs))


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (a sandbox dir is in the runner's)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry))
    return pids


@pytest.fixture
def own_sandboxes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put this test's sandbox dirs under tmp_path (other sessions may run sandboxes at the same
    time); yields a function listing this test's live sandbox processes. Afterwards, no sandbox
    dir may be left behind."""
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield lambda: _processes_mentioning(str(root))
    assert list(root.iterdir()) == []


# ---------------------------------------------------------------- extraction and program builders


@pytest.mark.parametrize(
    "text, entry_point, expected",
    [
        ("```python\ndef f():\n    return 1\n```", None, "def f():\n    return 1"),
        ("Here:\n```py\nx = 1\n```\nand\n```python\ny = 2\n```", None, "y = 2"),
        ("```\nz = 3\n```", None, "z = 3"),  # untagged block
        ("```bash\npip install x\n```\n```\nprint(1)\n```", None, "print(1)"),
        (
            "```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nprint(add(1, 2))\n```",
            "add",
            "def add(a, b):\n    return a + b",
        ),  # the block that defines the entry point
        (
            "```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nprint(add(1, 2))\n```",
            None,
            "print(add(1, 2))",
        ),
        ("Sure!\n```python\ndef g():\n    return 2", "g", "def g():\n    return 2"),  # cut off
        ("    return a + b\n", "add", "    return a + b\n"),  # no fence: the whole text
        ("", None, ""),
    ],
)
def test_extract_code(text: str, entry_point: str | None, expected: str) -> None:
    assert extract_code(text, entry_point) == expected


PROMPT = (
    "from typing import List\n\n\ndef helper(x: int) -> int:\n    return x * 2\n\n\n"
    'def double_all(xs: List[int]) -> List[int]:\n    """Double every element."""\n'
)
TEST = "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n"


def test_humaneval_program_with_a_body_completion() -> None:
    program = humaneval_program(PROMPT, "    return [helper(x) for x in xs]\n", TEST, "double_all")
    assert program.startswith(PROMPT) and program.rstrip().endswith("check(double_all)")
    assert run_in_sandbox(program).passed


def test_humaneval_program_with_a_full_def_keeps_the_prompt_preamble() -> None:
    completion = "def double_all(xs):\n    return [helper(x) for x in xs]\n"  # uses the helper
    program = humaneval_program(PROMPT, completion, TEST, "double_all")
    assert program.count("def double_all") == 1 and "def helper" in program
    assert "from typing import List" in program
    assert run_in_sandbox(program).passed


def test_mbpp_program_order_and_line_endings() -> None:
    program = mbpp_program(
        "def sq(x):\r\n    return x * x\r\n",
        ["assert sq(3) == 9"],
        test_setup_code="y = sq(2)",
        test_imports=["import math"],
    )
    assert program.index("import math") < program.index("def sq") < program.index("y = sq(2)")
    assert program.index("y = sq(2)") < program.index("assert sq(3)") and "\r" not in program
    assert run_in_sandbox(program).passed
    assert not run_in_sandbox(mbpp_program("def sq(x):\n    return x + x", ["assert sq(3) == 9"])).passed


@pytest.mark.parametrize(
    "value",
    [
        [1, -2.5, "s", None, True],
        (1,),
        (),
        {1, 2},
        set(),
        frozenset({3}),
        {"k": (1, [2])},
        complex(1, -2),
        float("inf"),
        -float("inf"),
        b"\x00",
        [[(1, 2), {3}], {"a": set()}],
    ],
)
def test_literal_round_trips(value: object) -> None:
    assert eval(_literal(value)) == value
    assert type(eval(_literal(value))) is type(value)


def test_literal_nan() -> None:
    assert str(eval(_literal([float("nan")]))[0]) == "nan"


def _plus_program(
    code: str, reference: str, entry: str, inputs: list, atol: float = 0, task_id: str | None = None
) -> str:
    return mbppplus_program(code, entry, inputs[:1], inputs[1:], atol, reference, task_id=task_id)


def test_mbppplus_exact_and_float_comparison() -> None:
    reference = "def third(x):\n    return x / 3\n"
    inputs = [[1], [2], [10.5], [-7]]
    assert run_in_sandbox(
        _plus_program("def third(x):\n    return x * (1 / 3)\n", reference, "third", inputs)
    ).passed  # floats: atol 1e-6
    rounded = run_in_sandbox(_plus_program("def third(x):\n    return round(x / 3, 2)\n", reference, "third", inputs))
    assert rounded.status == "failed" and "input #0" in rounded.stderr_tail
    exact_ref = "def inc(x):\n    return x + 1\n"
    assert not run_in_sandbox(
        _plus_program("def inc(x):\n    return x + 1.0000001\n", exact_ref, "inc", [[1], [2]])
    ).passed  # ints compare exactly


def test_mbppplus_restores_tuples_by_task_id() -> None:
    # Mbpp/2 takes tuples; the JSON rows hold lists. evalplus restores them, and so do we.
    reference = "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
    strict = (
        "def similar_elements(a, b):\n    assert isinstance(a, tuple)\n"
        "    return tuple(sorted(set(a) & set(b), reverse=True))\n"
    )  # set oracle: any order
    inputs = [[[3, 4, 5, 6], [5, 7, 4, 10]], [[1, 2, 3, 4], [5, 4, 3, 7]]]
    assert run_in_sandbox(_plus_program(strict, reference, "similar_elements", inputs, task_id="Mbpp/2")).passed
    assert not run_in_sandbox(_plus_program(strict, reference, "similar_elements", inputs)).passed
    assert mbppplus_deserialize_inputs("Mbpp/252", [["1+2j"]]) == [[complex(1, 2)]]
    assert mbppplus_deserialize_inputs("Mbpp/9999", [[1]]) == [[1]]


def test_mbppplus_candidate_is_not_run_as_main_and_must_define_the_entry_point() -> None:
    reference = "def one():\n    return 1\n"
    main_block = "def one():\n    return 1\n\nif __name__ == '__main__':\n    input()\n"
    assert run_in_sandbox(_plus_program(main_block, reference, "one", [[], []])).passed
    missing = run_in_sandbox(_plus_program("def two():\n    return 1\n", reference, "one", [[]]))
    assert missing.status == "failed" and "KeyError" in missing.stderr_tail


# -------------------------------------------------------------------------------------- sandbox


def test_pass_fail_and_syntax_error() -> None:
    ok = run_in_sandbox("print('hello')")
    assert (ok.passed, ok.status, ok.stdout_tail, ok.stderr_tail) == (True, "passed", "hello\n", "")
    failed = run_in_sandbox("def f():\n    raise ValueError('boom')\nf()")
    assert (failed.passed, failed.status) == (False, "failed")
    assert "ValueError: boom" in failed.stderr_tail
    assert 'File "program.py", line 2' in failed.stderr_tail
    syntax = run_in_sandbox("def f(:\n    pass")
    assert (syntax.passed, syntax.status) == (False, "error")
    assert "SyntaxError" in syntax.stderr_tail


def test_score_code_reasons() -> None:
    assert score_code("x = 1") == Score(correct=True, extracted="x = 1", reason=None)
    assert score_code("assert False").reason == "failed"
    assert score_code("def (").reason == "error"
    assert score_code("while True: pass", timeout_s=0.5).reason == "timeout"


@pytest.mark.parametrize("program", ["import time\ntime.sleep(60)", "while True:\n    pass"])
def test_timeout_and_infinite_loop(program: str) -> None:
    result = run_in_sandbox(program, timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert 0.9 < result.wall_s < 5


def test_exit_before_the_end_is_a_failure() -> None:
    # a reward hack: exit(0) before the asserts. The HumanEval harness counts it as failed too.
    for program in [
        "import sys\nsys.exit(0)\nassert False",
        "import os\nos._exit(0)\nassert False",
        "exit()\nassert False",
        "raise SystemExit\n",
    ]:
        result = run_in_sandbox(program)
        assert result.status == "failed" and "called exit" in result.stderr_tail, program


def test_program_is_not_main_and_has_no_stdin() -> None:
    assert run_in_sandbox("assert __name__ == 'sandboxed_program'").passed
    assert run_in_sandbox("if __name__ == '__main__':\n    raise SystemExit(1)").passed
    assert "EOFError" in run_in_sandbox("input()").stderr_tail


def test_memory_bomb() -> None:
    # bytes(n) is calloc'ed: address space counts at once, pages are not touched (fast)
    bomb = run_in_sandbox("x = []\nwhile True:\n    x.append(bytes(10**8))", timeout_s=10)
    assert bomb.status == "failed" and "MemoryError" in bomb.stderr_tail
    big = "x = bytes(500 * 2**20)"
    assert run_in_sandbox(big, memory_mb=1024).passed
    assert run_in_sandbox(big, memory_mb=256).status == "failed"


def test_output_is_capped() -> None:
    long_line = run_in_sandbox("print('y' * 10**6)")
    assert long_line.passed and len(long_line.stdout_tail) <= 4000
    flood = run_in_sandbox("while True:\n    print('x' * 100000)", timeout_s=5)
    assert flood.status == "failed" and "File too large" in flood.stderr_tail  # RLIMIT_FSIZE


def test_fork_and_subprocess_are_refused(own_sandboxes) -> None:
    for program in [
        "import os\nos.fork()",
        "import os\nos.system('true')",
        "import subprocess\nsubprocess.run(['true'])",
        "import multiprocessing as mp\np = mp.Process(target=print)\np.start()",
    ]:
        result = run_in_sandbox(program)
        assert result.status == "failed" and "not allowed" in result.stderr_tail, program
    assert own_sandboxes() == []


def test_fork_bomb_is_contained(own_sandboxes) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n"
    assert run_in_sandbox(bomb, timeout_s=1.0).status == "timeout"
    assert own_sandboxes() == []


def test_fork_bomb_that_bypasses_the_prelude_is_contained(own_sandboxes) -> None:
    # Re-import ctypes (the prelude hid it) and fork through libc: only the kernel guards remain.
    bypass = (
        "import sys\n"
        "for name in [m for m in list(sys.modules) if 'ctypes' in m]:\n"
        "    del sys.modules[name]\n"
        "import ctypes, time\n"
        "libc = ctypes.CDLL(None)\n"
        "children = 0\n"
        "for _ in range(50):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "    children += pid > 0\n"
        "print('children', children)\n"
    )
    result = run_in_sandbox(bypass, timeout_s=5)
    iso = isolation()
    if os.geteuid() != 0 or iso.unprivileged_uid:  # RLIMIT_NPROC applies: not a single child
        assert result.stdout_tail == "children 0\n"
    assert own_sandboxes() == []  # either way the process group is gone


def test_threads_are_refused_where_rlimit_nproc_applies() -> None:
    if os.geteuid() == 0 and not isolation().unprivileged_uid:
        pytest.skip("root without a throwaway uid: RLIMIT_NPROC does not apply to uid 0")
    result = run_in_sandbox("import threading\nthreading.Thread(target=print).start()")
    assert result.status == "failed" and "can't start new thread" in result.stderr_tail


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.3)
    yield server
    server.close()


def _assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        server.accept()


def test_network_is_refused(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    for program in [
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "import socket\nsocket.getaddrinfo('example.com', 80)",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:%d')" % port,
    ]:
        result = run_in_sandbox(program)
        assert result.status == "failed" and "network access" in result.stderr_tail, program
    _assert_no_connection(listener)


def test_network_bypassing_the_prelude_finds_no_network(listener: socket.socket) -> None:
    if not isolation().network_namespace:
        pytest.skip("no network namespace on this machine: only the prelude blocks sockets")
    port = listener.getsockname()[1]
    raw = (
        "import _socket\nS = _socket.socket.__mro__[1]  # the real class under the guard\n"
        f"s = S(_socket.AF_INET, _socket.SOCK_STREAM)\ns.connect(('127.0.0.1', {port}))\n"
    )
    result = run_in_sandbox(raw)
    # seccomp refuses the socket; without it, the namespace has no route
    assert result.status == "failed" and (
        "Operation not permitted" in result.stderr_tail or "Network is unreachable" in result.stderr_tail
    )
    assert run_in_sandbox("print(open('/proc/net/dev').read())").stdout_tail.count(":") == 1  # lo
    _assert_no_connection(listener)


@pytest.fixture
def public_dir(tmp_path: Path) -> Path:
    target = tmp_path / "public"  # world-writable: file permissions alone would not stop a write
    target.mkdir()
    target.chmod(0o777)
    return target


def test_writing_outside_the_sandbox_is_refused(public_dir: Path) -> None:
    victim = public_dir / "victim.txt"
    programs = [
        f"open({str(victim)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('x')",
        f"import os\nos.close(os.open({str(victim)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import shutil\nshutil.rmtree({str(public_dir)!r})",
        f"import os\nos.rename({str(public_dir)!r}, {str(public_dir)!r} + '2')",
    ]
    for program in programs:
        result = run_in_sandbox(program)
        # the prelude refuses, the kernel does, or (bubblewrap) the directory is not there
        assert result.status == "failed" and any(
            e in result.stderr_tail for e in ("not allowed", "Permission denied", "No such file")
        ), program
    assert public_dir.is_dir() and list(public_dir.iterdir()) == []


def test_writing_outside_while_bypassing_the_prelude(public_dir: Path) -> None:
    if not isolation().private_filesystem:
        pytest.skip("no mount namespace on this machine: only the prelude guards writes")
    victim = public_dir / "victim.txt"
    result = run_in_sandbox(f"import _io\n_io.FileIO({str(victim)!r}, 'w').write(b'x')")
    assert result.status == "failed" and any(
        e in result.stderr_tail for e in ("Read-only file system", "Permission denied", "No such file")
    )
    assert not victim.exists()


def test_writing_inside_the_sandbox_works_and_is_cleaned_up(own_sandboxes) -> None:
    program = (
        "import os, tempfile\nopen('out.txt', 'w').write('ok')\n"
        "os.makedirs('a/b')\nopen('a/b/c', 'w').close()\nos.chmod('a', 0)\n"
        "tempfile.NamedTemporaryFile(delete=False).write(b'x')\n"
        "assert open('out.txt').read() == 'ok'\n"
    )
    result = run_in_sandbox(program)
    assert result.passed, result.stderr_tail
    # own_sandboxes checks that the dir, with its unreadable subdir, was removed


def test_home_and_environment_are_not_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    secret_key = home / ".ssh" / "id_rsa"
    secret_key.write_text("PRIVATE KEY 1234")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DIFFMAS_TEST_TOKEN", "hunter2")
    program = (
        "import os\n"
        "home = os.path.expanduser('~')\n"
        "assert home == os.getcwd(), (home, os.getcwd())\n"
        "assert not os.path.exists(os.path.join(home, '.ssh', 'id_rsa'))\n"
        "print(sorted(os.environ))\n"
        "try:\n"
        f"    print(open({str(secret_key)!r}).read())\n"
        "except OSError as e:  # PermissionError (prelude) or not there at all (bubblewrap)\n"
        "    print('refused:', e)\n"
    )
    result = run_in_sandbox(program)
    assert result.passed, result.stderr_tail
    assert "refused:" in result.stdout_tail and "PRIVATE KEY" not in result.stdout_tail
    assert "hunter2" not in result.stdout_tail and "DIFFMAS_TEST_TOKEN" not in result.stdout_tail


def test_other_processes_cannot_be_signalled() -> None:
    result = run_in_sandbox(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)")
    assert result.status == "failed" and "not allowed" in result.stderr_tail
    if os.geteuid() == 0 and not isolation().unprivileged_uid:
        return  # the kernel check below needs the throwaway uid
    real_kill = (  # fish the real os.kill out of the guard's closure
        "import os, signal\n"
        "kill = [c.cell_contents for c in os.kill.__closure__\n"
        "        if getattr(c.cell_contents, '__name__', '') == 'kill'][0]\n"
        f"kill({os.getpid()}, signal.SIGKILL)\n"
    )
    result = run_in_sandbox(real_kill)
    # another uid may not signal it; in a PID namespace it is not even there
    assert result.status == "failed" and (
        "Operation not permitted" in result.stderr_tail or "No such process" in result.stderr_tail
    )


def test_prelude_only_fallback(monkeypatch: pytest.MonkeyPatch, public_dir: Path, listener: socket.socket) -> None:
    # a machine that allows no kernel layer (e.g. a container without namespaces), accepted
    monkeypatch.setattr(sandbox, "_isolation", Isolation())
    monkeypatch.setattr(sandbox, "_plan", None)
    monkeypatch.setattr(sandbox, "_required", "weak")
    assert run_in_sandbox("import math\nprint(math.sqrt(16))").stdout_tail == "4.0\n"
    victim = public_dir / "victim.txt"
    port = listener.getsockname()[1]
    for program in [
        f"open({str(victim)!r}, 'w')",
        "import os\nos.fork()",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
    ]:
        result = run_in_sandbox(program)
        assert result.status == "failed" and "not allowed" in result.stderr_tail, program
    assert not victim.exists()
    _assert_no_connection(listener)


def test_killed_by_a_signal() -> None:
    result = run_in_sandbox("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (result.passed, result.status) == (False, "killed")


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_in_sandbox("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb must be at least"):
        run_in_sandbox("pass", memory_mb=16)


def test_isolation_report() -> None:
    iso = isolation()
    assert iso is isolation()  # probed once
    assert iso.network in ("namespace", "prelude only")
    if os.geteuid() == 0:
        assert not iso.user_namespace


# ------------------------------------------------------------------------------------- corpora


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail() -> None:
    rows = _rows("humaneval_test.jsonl")
    assert len(rows) == 164
    canonical = _run_all(
        [humaneval_program(r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]) for r in rows]
    )
    empty = _run_all([humaneval_program(r["prompt"], "", r["test"], r["entry_point"]) for r in rows])
    assert [r["task_id"] for r, res in zip(rows, canonical) if not res.passed] == []
    assert [r["task_id"] for r, res in zip(rows, empty) if res.passed] == []


def test_humaneval_full_function_completions_pass() -> None:
    # chat models repeat the whole function; helpers from the prompt must still be there
    rows = _rows("humaneval_test.jsonl")
    rows = (
        rows
        if FULL_CORPUS
        else [
            r
            for r in rows
            if r["task_id"]
            in {"HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/0", "HumanEval/163"}
        ]
    )
    results = _run_all(
        [
            humaneval_program(
                r["prompt"],
                extract_code(f"Sure:\n```python\n{r['prompt']}{r['canonical_solution']}```\n", r["entry_point"]),
                r["test"],
                r["entry_point"],
            )
            for r in rows
        ]
    )
    assert [r["task_id"] for r, res in zip(rows, results) if not res.passed] == []


def test_mbpp_reference_solutions_pass() -> None:
    rows = [r for r in _rows("mbpp.jsonl") if 11 <= r["task_id"] <= 510]
    assert len(rows) == 500
    rows = rows if FULL_CORPUS else rows[::5]
    results = _run_all([mbpp_program(r["code"], r["test_list"], r["test_setup_code"]) for r in rows])
    assert [r["task_id"] for r, res in zip(rows, results) if not res.passed] == []


# Tasks whose reference solution alone takes over 2 s on the plus inputs (Mbpp/599 sums
# range(10**8) several times): they run in the full corpus only.
_SLOW_MBPPPLUS = {
    "Mbpp/599",
    "Mbpp/392",
    "Mbpp/255",
    "Mbpp/271",
    "Mbpp/603",
    "Mbpp/592",
    "Mbpp/123",
    "Mbpp/389",
    "Mbpp/300",
    "Mbpp/589",
    "Mbpp/84",
}


def test_mbppplus_canonical_solutions_pass() -> None:
    rows = _rows("mbppplus_test.jsonl")
    assert len(rows) == 399
    if not FULL_CORPUS:
        rows = [r for r in rows[::10] if r["task_id"] not in _SLOW_MBPPPLUS]
    programs = [
        mbppplus_program(
            r["canonical_solution"],
            r["entry_point"],
            r["base_input"],
            r["plus_input"],
            r["atol"],
            r["canonical_solution"],
            task_id=r["task_id"],
        )
        for r in rows
    ]
    # evalplus's own limits: 4 GB (Mbpp/255 builds big combinations); the reference runs too
    results = _run_all(programs, timeout_s=120, memory_mb=4096)
    assert [(r["task_id"], res.status) for r, res in zip(rows, results) if not res.passed] == []


def test_mbppplus_wrong_solutions_fail() -> None:
    rows = [r for r in _rows("mbppplus_test.jsonl")[::10] if r["task_id"] not in _SLOW_MBPPPLUS]
    wrong = [
        mbppplus_program(
            f"def {r['entry_point']}(*args):\n    return None\n",
            r["entry_point"],
            r["base_input"],
            r["plus_input"],
            r["atol"],
            r["canonical_solution"],
            task_id=r["task_id"],
        )
        for r in rows
    ]
    results = _run_all(wrong, timeout_s=60, memory_mb=4096)
    # Mbpp/164 ("are_equivalent") has a special oracle that accepts any output, as in evalplus
    assert [r["task_id"] for r, res in zip(rows, results) if res.passed] in ([], ["Mbpp/164"])


# --------------------------------------------------------------- MBPP+ time limits and parity


def _mbppplus_row(task_id: str) -> dict:
    return next(r for r in _rows("mbppplus_test.jsonl") if r["task_id"] == task_id)


def _plus_program_for(row: dict, code: str) -> str:
    return mbppplus_program(
        code,
        row["entry_point"],
        row["base_input"],
        row["plus_input"],
        row["atol"],
        row["canonical_solution"],
        task_id=row["task_id"],
    )


def test_mbppplus_looping_completion_is_rejected_within_seconds() -> None:
    # evalplus's limit per input, max(1 s, 4 x the reference's time), not the task's 60 s
    row = _mbppplus_row("Mbpp/3")
    looping = f"def {row['entry_point']}(*args):\n    while True:\n        pass\n"
    result = run_in_sandbox(_plus_program_for(row, looping), timeout_s=60, memory_mb=4096)
    assert result.status == "timeout" and result.wall_s < 5
    assert "over its time limit" in result.stderr_tail


def test_mbppplus_outputs_with_an_always_true_equality_fail() -> None:
    row = _mbppplus_row("Mbpp/3")
    cheats = [
        (
            "class Yes:\n    def __init__(self, *args):\n        pass\n"
            "    def __eq__(self, other):\n        return True\n"
        ),
        "class Yes(int):\n    def __eq__(self, other):\n        return True\n",
    ]
    for cheat in cheats:
        code = cheat + f"def {row['entry_point']}(*args):\n    return Yes(0)\n"
        result = run_in_sandbox(_plus_program_for(row, code), timeout_s=60, memory_mb=4096)
        assert result.status == "failed" and "solution.Yes object" in result.stderr_tail
    mock_any = f"from unittest import mock\ndef {row['entry_point']}(*args):\n    return mock.ANY\n"
    assert not run_in_sandbox(_plus_program_for(row, mock_any), timeout_s=60).passed


_MUTATIONS = [
    (" + ", " - "),
    (" < ", " <= "),
    (" == ", " != "),
    (" > ", " >= "),
    ("[0]", "[-1]"),
    ("return ", "return not "),
]


def _mutant(code: str) -> str:
    """The first mutation that applies (a wrong, usually still running, program)."""
    for old, new in _MUTATIONS:
        if old in code:
            return code.replace(old, new, 1)
    return code + "\n\ndef _unused():\n    pass\n"


def _parity_candidates(row: dict, mbpp_code: str | None) -> dict[str, str]:
    entry = row["entry_point"]
    wrap = row["canonical_solution"] + f"\n_orig = {entry}\n"
    candidates = {
        "canonical": row["canonical_solution"],
        "mutant": _mutant(row["canonical_solution"]),
        "none": f"def {entry}(*args):\n    return None\n",
        "as-float": wrap + f"def {entry}(*args):\n    r = _orig(*args)\n    return float(r) if type(r) is int else r\n",
        "as-tuple": wrap + f"def {entry}(*args):\n    r = _orig(*args)\n"
        "    return tuple(r) if type(r) is list else r\n",
        "exit-early": "import sys\nsys.exit(0)\n" + row["canonical_solution"],
    }
    if mbpp_code:
        candidates["mbpp"] = mbpp_code
    return candidates


def _evalplus_verdict(evalplus_eval, row: dict, code: str) -> bool:
    """evalplus 0.3.1's own verdict: expected outputs and times as its get_groundtruth makes
    them (trusted_exec on the canonical solution), then untrusted_check on base and plus."""
    namespace: dict = {}
    exec(row["canonical_solution"], namespace)
    reference = namespace[row["entry_point"]]
    verdicts = []
    for inputs in (row["base_input"], row["plus_input"]):
        inputs = mbppplus_deserialize_inputs(row["task_id"], list(inputs))
        expected, seconds = [], []
        for args in inputs:
            args = copy.deepcopy(args)
            start = time.time()
            expected.append(reference(*args))
            seconds.append(time.time() - start)
        if row["entry_point"] in {"check_str", "text_match_three", "text_starta_endb"}:
            expected = [e is not None for e in expected]
        status, _ = evalplus_eval.untrusted_check(
            "mbpp", code, inputs, row["entry_point"], expected, row["atol"], seconds, fast_check=True
        )
        verdicts.append(status == "pass")
    return all(verdicts)


def test_mbppplus_verdicts_agree_with_evalplus() -> None:
    evalplus_eval = pytest.importorskip("evalplus.eval")  # make setup installs evalplus 0.3.1
    mbpp = {r["task_id"]: r["code"] for r in _rows("mbpp.jsonl")}
    rows = [r for r in _rows("mbppplus_test.jsonl")[3::20] if r["task_id"] not in _SLOW_MBPPPLUS]
    cases = [
        (row, name, code)
        for row in rows
        for name, code in _parity_candidates(row, mbpp.get(int(row["task_id"].split("/")[1]))).items()
    ]
    ours = _run_all([_plus_program_for(row, code) for row, _, code in cases], timeout_s=60, memory_mb=4096)
    theirs = [_evalplus_verdict(evalplus_eval, row, code) for row, _, code in cases]
    disagree = [
        (row["task_id"], name, res.status, ev)
        for (row, name, _), res, ev in zip(cases, ours, theirs)
        if res.passed != ev
    ]
    assert disagree == [], disagree
    assert len(cases) > 100 and 0 < sum(theirs) < len(cases)  # both verdicts are exercised
