"""Red-team tests: each attack a generated program could make on the machine that scores it.

Every attack bypasses the Python prelude (a fresh `posix`/`_socket` module, ctypes re-imported),
so only the kernel layers stand between it and the host. Each runs under every isolation level
this machine offers: 'full' (bubblewrap) and 'kernel' (the runner's own namespaces, bubblewrap
hidden). A level the machine lacks is skipped, unless DIFFMAS_EXPECT_ISOLATION names that level
or a stronger one (CI sets it to 'full'): then the run fails instead. The level in use is printed
(`pytest -rA`) and checked by `test_isolation_meets_the_expected_level`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffmas.scoring import sandbox
from diffmas.scoring.sandbox import LEVELS, Isolation, run_in_sandbox

EXPECTED = os.environ.get("DIFFMAS_EXPECT_ISOLATION", "")
SECRET = "diffmas-redteam-secret-7f3a"

# Prelude bypasses the attacks start from: the real posix functions and the real socket class.
FRESH_POSIX = (
    "import importlib.util as _u\n"
    "_spec = _u.find_spec('posix')\n"
    "posix = _u.module_from_spec(_spec)\n"
    "_spec.loader.exec_module(posix)\n"
)
FRESH_SOCKET = (
    "import importlib.util as _u\n"
    "_spec = _u.find_spec('_socket')\n"
    "_socket = _u.module_from_spec(_spec)\n"
    "_spec.loader.exec_module(_socket)\n"
)
CTYPES = (
    "import sys\n"
    "for _name in [m for m in list(sys.modules) if 'ctypes' in m]:\n"
    "    del sys.modules[_name]\n"
    "import ctypes\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
)


def _expected_at_least(level: str) -> bool:
    return EXPECTED in LEVELS and LEVELS.index(EXPECTED) >= LEVELS.index(level)


def _probe_level(level: str, monkeypatch: pytest.MonkeyPatch) -> Isolation:
    """Probe the machine with bubblewrap hidden for 'kernel'; cached per level."""
    if level not in _probed:
        with monkeypatch.context() as m:
            if level == "kernel":
                m.setattr(sandbox, "_bwrap_path", lambda: None)
            m.setattr(sandbox, "_isolation", None)
            m.setattr(sandbox, "_plan", None)
            _probed[level] = sandbox._probed()
    return _probed[level][0]


_probed: dict[str, tuple] = {}


@pytest.fixture(params=["full", "kernel"])
def level(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test under one isolation level (its layers only), or skip/fail without it."""
    name = request.param
    iso = _probe_level(name, monkeypatch)
    if iso.level != name:
        message = f"isolation {name!r} is not available here (got {iso.describe()})"
        if _expected_at_least(name):
            pytest.fail(f"{message}, and DIFFMAS_EXPECT_ISOLATION={EXPECTED}")
        pytest.skip(message)
    monkeypatch.setattr(sandbox, "_isolation", iso)
    monkeypatch.setattr(sandbox, "_plan", _probed[name][1])
    print(f"sandbox isolation: {iso.describe()}")
    return name


def test_isolation_meets_the_expected_level() -> None:
    iso = sandbox.isolation()
    print(f"sandbox isolation: {iso.describe()}")
    if EXPECTED:
        assert EXPECTED in LEVELS, f"DIFFMAS_EXPECT_ISOLATION={EXPECTED!r}: use one of {LEVELS}"
        assert LEVELS.index(iso.level) >= LEVELS.index(EXPECTED), (
            f"the sandbox gives {iso.describe()}, CI expects {EXPECTED!r}"
        )


def test_weak_isolation_refuses_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fail closed: with only rlimits and the prelude, generated code does not run ...
    monkeypatch.setattr(sandbox, "_isolation", Isolation())
    monkeypatch.setattr(sandbox, "_plan", None)
    with pytest.raises(sandbox.SandboxError, match="--allow-weak-sandbox"):
        run_in_sandbox("print('never')")
    # ... unless explicitly lowered
    monkeypatch.setattr(sandbox, "_required", "weak")
    assert run_in_sandbox("print('ran')").stdout_tail == "ran\n"
    with pytest.raises(sandbox.SandboxError, match="unknown isolation level"):
        sandbox.require_isolation("none")


# ------------------------------------------------------------------------- reading host files


@pytest.fixture
def root_only_file(tmp_path: Path) -> Path:
    secret = tmp_path / "root_only" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    secret.chmod(0o600)
    return secret


def test_reading_files_outside(level: str, root_only_file: Path) -> None:
    targets = [str(root_only_file), "/etc/shadow", os.path.expanduser("~/.bash_history")]
    program = FRESH_POSIX + (
        "import _io\n"
        f"for path in {targets!r}:\n"
        "    for read in (lambda p: _io.FileIO(p).read(),\n"
        "                 lambda p: posix.read(posix.open(p, posix.O_RDONLY), 4096)):\n"
        "        try:\n"
        "            print(path, read(path)[:64])\n"
        "        except OSError as e:\n"
        "            print(path, 'refused', type(e).__name__)\n"
    )
    result = run_in_sandbox(program)
    assert result.passed, result.stderr_tail
    assert SECRET not in result.stdout_tail and "root:" not in result.stdout_tail
    assert result.stdout_tail.count("refused") == 2 * len(targets), result.stdout_tail


def test_listing_home_directories(level: str) -> None:
    homes = ("/root", "/home")
    program = FRESH_POSIX + (
        f"for d in {homes!r}:\n"
        "    try:\n"
        "        print(d, *sorted(posix.listdir(d)))\n"
        "    except OSError as e:\n"
        "        print(d, 'refused')\n"
    )
    result = run_in_sandbox(program)
    assert result.passed, result.stderr_tail
    for line in result.stdout_tail.splitlines():
        home, *names = line.split(" ")
        # at most the way to the interpreter's own prefix (e.g. /root/.pyenv) is there
        needed = {Path(r).relative_to(home).parts[0] for r in sandbox._interpreter_roots() if r.startswith(home + "/")}
        assert names == ["refused"] or set(names) <= needed, line


# ------------------------------------------------------------------------------ host sockets


@pytest.fixture
def unix_server(tmp_path: Path):
    path = str(tmp_path / "host.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)  # a service anyone may connect to (as X11's or a database's socket)
    server.listen()
    server.settimeout(0.3)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0diffmas-redteam-{os.getpid()}")
    abstract.listen()
    abstract.settimeout(0.3)
    yield path, abstract.getsockname()
    server.close()
    abstract.close()


def test_connecting_to_host_sockets(level: str, unix_server) -> None:
    path, abstract = unix_server
    program = FRESH_SOCKET + (
        f"for address in ({path!r}, {abstract!r}):\n"
        "    try:\n"
        "        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
        "        s.connect(address)\n"
        "        print('connected', address)\n"
        "    except OSError as e:\n"
        "        print('refused', type(e).__name__)\n"
        "try:\n"
        "    _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).connect(('127.0.0.1', 22))\n"
        "    print('connected tcp')\n"
        "except OSError as e:\n"
        "    print('refused', type(e).__name__)\n"
    )
    result = run_in_sandbox(program)
    assert result.passed, result.stderr_tail
    assert "connected" not in result.stdout_tail and result.stdout_tail.count("refused") == 3


# ------------------------------------------------------------------------------- early exit


@pytest.mark.parametrize(
    "leave",
    [
        FRESH_POSIX + "posix._exit(0)\n",
        CTYPES + "libc._exit(0)\n",
        "import signal, os\nsignal.signal(signal.SIGTERM, lambda *a: None)\n"
        + FRESH_POSIX
        + "posix.close(1)\nposix._exit(0)\n",
    ],
    ids=["fresh-posix", "ctypes", "close-stdout"],
)
def test_leaving_early_with_status_0_is_not_a_pass(level: str, leave: str) -> None:
    result = run_in_sandbox(leave + "assert False, 'the tests below never ran'\n")
    assert not result.passed and result.status == "failed"
    assert "no completion token" in result.stderr_tail


def test_forged_completion_output_is_not_a_pass(level: str) -> None:
    # guessing the completion channel: write to every open descriptor, then leave with 0
    program = FRESH_POSIX + (
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        posix.write(fd, b'started passed ok 0' * 2)\n"
        "    except OSError:\n"
        "        pass\n"
        "posix._exit(0)\n"
    )
    assert not run_in_sandbox(program).passed


# ---------------------------------------------------------------------- resource exhaustion


def test_filling_the_disk(level: str) -> None:
    program = (
        "import os\n"
        "written = 0\n"
        "chunk = b'x' * (4 << 20)\n"
        "try:\n"
        "    for i in range(500):\n"  # 2 GB if nothing stopped it
        "        with open(f'fill{i}', 'wb') as f:\n"
        "            f.write(chunk)\n"
        "        written += len(chunk)\n"
        "except OSError as e:\n"
        "    print('stopped', type(e).__name__)\n"
        "print('written', written)\n"
    )
    result = run_in_sandbox(program, timeout_s=10)
    written = int(result.stdout_tail.split("written")[-1])
    assert "stopped" in result.stdout_tail and written <= sandbox._SANDBOX_DIR_BYTES


def test_memory_bomb(level: str) -> None:
    result = run_in_sandbox("x = []\nwhile True:\n    x.append(bytearray(50 << 20))\n", timeout_s=10, memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.stderr_tail


def test_processes_and_threads(level: str) -> None:
    program = CTYPES + (
        "import _thread, time\n"
        "children = sum(libc.fork() > 0 for _ in range(20))\n"
        "print('children', children)\n"
        "try:\n"
        "    _thread.start_new_thread(time.sleep, (5,))\n"
        "    print('thread started')\n"
        "except RuntimeError as e:\n"
        "    print('no thread:', e)\n"
    )
    result = run_in_sandbox(program, timeout_s=5)
    assert result.passed, result.stderr_tail
    assert "children 0" in result.stdout_tail and "no thread" in result.stdout_tail


@pytest.mark.parametrize(
    "loop",
    [
        "while True:\n    pass\n",
        "sum(range(10 ** 13))\n",
        ("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n"),
    ],
    ids=["python-loop", "c-loop", "ignores-sigxcpu"],
)
def test_running_forever(level: str, loop: str) -> None:
    result = run_in_sandbox(loop, timeout_s=1.0)
    assert result.status == "timeout" and result.wall_s < 4


# ------------------------------------------------------------- other processes of the host


@pytest.fixture
def decoy():
    """A process of the host with a secret in its environment."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], env={"DIFFMAS_DECOY": SECRET}, stdin=subprocess.DEVNULL
    )
    yield proc
    proc.kill()
    proc.wait()


def test_signalling_or_tracing_the_parent(level: str, decoy: subprocess.Popen) -> None:
    targets = [os.getpid(), decoy.pid]
    program = (
        FRESH_POSIX
        + CTYPES
        + (
            f"for pid in {targets!r}:\n"
            "    try:\n"
            "        posix.kill(pid, 9)\n"
            "        print('killed', pid)\n"
            "    except OSError as e:\n"
            "        print('refused kill', type(e).__name__)\n"
            "    rc = libc.ptrace(16, pid, 0, 0)\n"  # PTRACE_ATTACH
            "    print('attached' if rc == 0 else 'refused ptrace', ctypes.get_errno())\n"
        )
    )
    result = run_in_sandbox(program)
    assert result.passed, result.stderr_tail
    assert "killed" not in result.stdout_tail and "attached" not in result.stdout_tail
    time.sleep(0.1)
    assert decoy.poll() is None  # still alive


def test_reading_other_processes_environment(level: str, decoy: subprocess.Popen) -> None:
    program = FRESH_POSIX + (
        "import _io\n"
        "found = []\n"
        f"for pid in [str({decoy.pid}), str({os.getpid()})] + posix.listdir('/proc'):\n"
        "    for what in ('environ', 'cmdline', 'mem'):\n"
        "        try:\n"
        "            data = _io.FileIO(f'/proc/{pid}/{what}').read(1 << 16)\n"
        f"            found += [(pid, what)] if {SECRET.encode()!r} in data else []\n"
        "        except OSError:\n"
        "            pass\n"
        "print('found', found)\n"
    )
    result = run_in_sandbox(program)
    assert result.passed, result.stderr_tail
    assert "found []" in result.stdout_tail and SECRET not in result.stdout_tail


# ---------------------------------------------------------------- runs record their isolation


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from conftest import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    make_model(tied=False).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _code_config(tmp_path: Path, model: Path):
    from diffmas.evaluate.runner import EvalConfig
    from diffmas.generate import DecodeConfig
    from diffmas.methods import MethodConfig

    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps({"id": "c1", "question": "Write f() returning 1.", "tests": ["assert f() == 1"]}) + "\n")
    return EvalConfig(
        task=f"jsonl:{data}?type=code",
        method="single",
        model=str(model),
        batch_size=1,
        method_config=MethodConfig(decode=DecodeConfig(max_new_tokens=4)),
    )


def test_code_runs_record_their_isolation(tmp_path: Path, tiny_model: Path) -> None:
    from diffmas.evaluate.runner import evaluate

    summary = evaluate(_code_config(tmp_path, tiny_model), tmp_path / "run", progress=False)
    expected = sandbox.isolation().to_dict()
    assert summary["sandbox"] == expected and expected["level"] in LEVELS
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sandbox"] == expected


def test_code_runs_refuse_a_weak_sandbox_before_generating(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffmas.cli import common
    from diffmas.evaluate.runner import evaluate

    monkeypatch.setattr(sandbox, "_isolation", Isolation())
    monkeypatch.setattr(sandbox, "_plan", None)
    config = _code_config(tmp_path, tiny_model)
    with pytest.raises(sandbox.SandboxError, match="--allow-weak-sandbox"):
        evaluate(config, tmp_path / "weak", progress=False)
    assert not (tmp_path / "weak" / "samples.jsonl").exists()
    monkeypatch.setattr(sandbox, "_required", sandbox._required)  # restored after the test
    common.allow_weak_sandbox(True)  # what --allow-weak-sandbox does
    summary = evaluate(config, tmp_path / "weak", progress=False)
    assert summary["sandbox"] == {"level": "weak", "layers": []}


def test_eval_has_the_allow_weak_sandbox_flag() -> None:
    from typer.testing import CliRunner

    from diffmas.cli import app

    result = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert "--allow-weak-sandbox" in result.output
