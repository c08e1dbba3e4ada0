"""Run untrusted Python (model-generated code) in a contained child process.

The program never runs in this process. Each call starts a fresh `python -I -B` (the same
interpreter) in its own session, with a minimal environment, stdin from /dev/null and its own
writable directory (also HOME and TMPDIR), a small tmpfs that vanishes with it. Layers, outermost
first (`isolation()` probes once which ones this machine allows; `Isolation.level` sums them up):

1. Process: on timeout, and always once the child is done, the whole process group gets SIGKILL
   and the child is reaped, so no processes or temporary directories are left behind.
2. rlimits: address space (`memory_mb`), CPU seconds, file size (10 MB, which also caps the
   captured output), open files, no core dumps, and RLIMIT_NPROC=1: no new processes or threads.
3. bubblewrap (`bwrap`, level 'full'): new PID, mount, network, IPC and UTS namespaces; the
   filesystem holds only the system's /usr (and /lib...), the interpreter's own prefixes and the
   sandbox directory, a size-limited tmpfs: no home directories, no /etc/shadow, no host sockets,
   no /proc of other processes. It dies with its parent.
   Without bubblewrap (level 'kernel'), the runner sets up the same kind of layers itself: a
   network namespace, a mount namespace where home directories are covered by empty tmpfs (the
   interpreter's prefixes bound back), everything read-only but the sandbox tmpfs.
   Either way, as root the program runs as a throwaway uid with no capabilities at all (the
   kernel never applies RLIMIT_NPROC to uid 0, and a capability such as CAP_DAC_READ_SEARCH
   would let it read any file); as another user an unprivileged user namespace allows the above.
   no_new_privs is set and the capability bounding set is emptied.
4. seccomp (a filter built with libseccomp through `pyseccomp`): no socket of any family, no
   ptrace or reading other processes' memory, no new namespaces, mounts, io_uring, BPF or keys.
5. A Python prelude (best effort, it can be worked around from inside): fork/exec/spawn/system,
   subprocess, signalling other processes, sockets and DNS, ctypes and os._exit are disabled;
   writes outside the sandbox directory and reads under the caller's home directory (other than
   the interpreter's own files) raise PermissionError.

Fail closed: a run needs at least the level set by `require_isolation` ('kernel' by default);
below it, `run_in_sandbox` raises SandboxError instead of running the program.

A program passes when it runs to its end: the runner then writes a random completion token,
given to it through a pipe it reads and closes before the program starts, to a file the parent
reads (the exit status alone is not enough: a program can leave with status 0 early). exit()
part way, even exit(0), is a failure, as in the HumanEval harness. The token keeps out programs
that stop early by accident or by a generic trick; a program written to dig it out of the
runner's own memory could still forge it (it runs in the same interpreter). The program runs as
a module named `sandboxed_program`, not `__main__`, so `if __name__ == "__main__":` blocks in
generated code do not run (the official harnesses `exec` the code the same way).
"""

from __future__ import annotations

import errno
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO

from diffmas.errors import DiffmasError

STATUSES = ("passed", "failed", "timeout", "error", "killed")
LEVELS = ("weak", "kernel", "full")  # weakest first; see Isolation.level
_TAIL_CHARS = 4000  # how much of stdout / stderr a result keeps (the end, where errors are)
_FILE_SIZE_LIMIT = 10 * 1024 * 1024  # RLIMIT_FSIZE: caps files the program writes and its output
_SANDBOX_DIR_BYTES = 64 * 1024 * 1024  # the writable tmpfs: all files together (disk filling)
_OPEN_FILES_LIMIT = 256
_MIN_MEMORY_MB = 128  # below this the interpreter itself cannot start
_SANDBOX_UID_RANGE = (0x10000000, 0x7FFF0000)  # throwaway uids: far from real users and services
_BWRAP_SANDBOX = "/sandbox"  # the writable directory's path inside bubblewrap
_HOME_ROOTS = ("/root", "/home")  # covered by empty tmpfs in the fallback mount namespace

# Runner exit codes (0 = the program ran to its end).
_EXIT_FAILED = 1
_EXIT_SYNTAX = 3
_EXIT_SETUP = 125


class SandboxError(DiffmasError):
    """The sandbox itself could not run (not a verdict on the program)."""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # 'passed' | 'failed' | 'timeout' | 'error' (did not compile) | 'killed' (signal)
    stdout_tail: str  # the last few thousand characters of the program's stdout
    stderr_tail: str  # ... and of its stderr (tracebacks end up here)
    wall_s: float  # wall-clock seconds from start to exit or kill


@dataclass(frozen=True)
class Isolation:
    """Which kernel layers this machine allows (the rlimits and the prelude always apply)."""

    bubblewrap: bool = False  # bwrap: PID/mount/net/IPC/UTS namespaces, only the interpreter's files
    user_namespace: bool = False  # fallback, non-root only: what allows the two below
    network_namespace: bool = False  # no network at all, whatever the program does
    private_filesystem: bool = False  # homes hidden, all read-only but the sandbox tmpfs
    unprivileged_uid: bool = False  # root only: a throwaway uid without capabilities
    seccomp: bool = False  # kernel filter: no sockets, ptrace, namespaces, mounts

    @property
    def network(self) -> str:
        return "namespace" if self.network_namespace else "prelude only"

    @property
    def layers(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]

    @property
    def level(self) -> str:
        """'full': bubblewrap + seccomp; 'kernel': every layer of the fallback (or bubblewrap
        without seccomp); 'weak': anything less (rlimits and the Python prelude)."""
        uid_ok = self.unprivileged_uid or os.geteuid() != 0
        if self.bubblewrap and uid_ok:
            return "full" if self.seccomp else "kernel"
        if self.network_namespace and self.private_filesystem and self.seccomp and uid_ok:
            return "kernel"
        return "weak"

    def describe(self) -> str:
        """One line for logs and `diffmas env`: the level and the active layers."""
        return f"{self.level} ({', '.join(['rlimits', *self.layers, 'prelude'])})"

    def to_dict(self) -> dict:
        return {"level": self.level, "layers": self.layers}


# The code the child runs before the program: kernel isolation, then the prelude guards, then
# the program. It uses the standard library only and reads its settings from argv.
# The code the child runs before the program lives in its own file (sandbox_runner.py), read here
# once and passed to `python -c`: bubblewrap need not see the package directory.
_RUNNER = (Path(__file__).with_name("sandbox_runner.py")).read_text(encoding="utf-8")


def _real_home() -> str:
    """The caller's home directory (guarded against reads in the child); '' when it is '/'."""
    home = os.path.realpath(os.path.expanduser("~"))
    return "" if home == "/" else home


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _hidden_dirs(workdir: str) -> list[str]:
    """What the fallback mount namespace covers with an empty tmpfs: the usual homes and the
    caller's, and above the interpreter's prefixes and the sandbox dir, the first directory
    others may not search (the throwaway uid has no capability to pass it; the runner makes
    the way again inside the tmpfs and binds the prefixes back)."""
    homes = {h for h in (*_HOME_ROOTS, _real_home()) if h and os.path.isdir(h)}
    hidden = set(homes)
    for path in (*_interpreter_roots(), workdir):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            if any(_within(ancestor, h) for h in homes):
                break
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                hidden.add(ancestor)
                break
    return sorted(hidden)


def _child_env(workdir: str) -> dict[str, str]:
    # Nothing is inherited: no tokens, no proxies, no PYTHON* variables (-I ignores those too).
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",  # numeric libraries must not try to start threads
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _limit_resources(memory_bytes: int, cpu_s: int) -> None:
    """preexec_fn: runs in the forked child before exec. Only setrlimit calls (fork-safe).

    RLIMIT_NPROC is set by the runner, after bubblewrap has forked and the uid is switched."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # soft < hard: the soft limit sends SIGXCPU, which the status maps to 'timeout'
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_NOFILE, (_OPEN_FILES_LIMIT, _OPEN_FILES_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# ----------------------------------------------------------------------------- seccomp filter

# Denied with EPERM (the program sees an ordinary OSError). Sockets of every family: AF_UNIX
# reaches host servers through the filesystem, which no network namespace covers.
_DENIED_SYSCALLS = (
    "socket",
    "socketpair",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "personality",
    "fsopen",
    "fsmount",
    "move_mount",
    "open_tree",
)
_CLONE_NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x00000080,
)  # NEWNS ... NEWNET, NEWTIME

_filter_lock = threading.Lock()
_filter_hex: str | None = None


def seccomp_filter() -> str:
    """The seccomp program (BPF, as hex) the runner loads; '' when libseccomp is unavailable."""
    global _filter_hex
    with _filter_lock:
        if _filter_hex is None:
            _filter_hex = _compile_filter()
        return _filter_hex


def _compile_filter() -> str:
    try:
        import pyseccomp as sc
    except (ImportError, OSError, RuntimeError):  # not installed, or no libseccomp.so
        return ""
    f = sc.SyscallFilter(sc.ALLOW)
    for name in _DENIED_SYSCALLS:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except (OSError, ValueError, RuntimeError):
            pass  # a syscall this architecture does not have
    for flag in _CLONE_NAMESPACE_FLAGS:  # clone(2) into new namespaces
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # its flags are out of reach: libc falls back
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read().hex()


# ----------------------------------------------------------------------------- bubblewrap


def _bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _interpreter_roots() -> list[str]:
    """The interpreter's own prefixes (venv and base), outside /usr which is bound anyway."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    return sorted(r for r in roots if not r.startswith("/usr/"))


def _bwrap_args(bwrap: str, workdir: str) -> list[str]:
    """bubblewrap's command line: namespaces, the few read-only trees, the sandbox tmpfs."""
    args = [
        bwrap,
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "sandbox",
        "--die-with-parent",
    ]
    # no --new-session: the program stays in the process group that a timeout kills at once
    # (the group was started in a new session, away from any terminal)
    if os.geteuid() == 0:  # the runner needs these to switch to the throwaway uid, then none
        args += ["--cap-drop", "ALL"] + [
            a for cap in ("SETUID", "SETGID", "SETPCAP", "CHOWN") for a in ("--cap-add", f"CAP_{cap}")
        ]
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    made = set()
    for root in _interpreter_roots():
        # parents that bwrap would create 0700 (unreadable after the uid switch)
        parts = root.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:i])
            if parent not in made and not parent.startswith("/usr"):
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", root, root]
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(_SANDBOX_DIR_BYTES),
        "--perms",
        "0700",
        "--tmpfs",
        _BWRAP_SANDBOX,
        "--ro-bind",
        os.path.join(workdir, "program.py"),
        os.path.join(_BWRAP_SANDBOX, "program.py"),
        "--remount-ro",
        "/",
        "--chdir",
        _BWRAP_SANDBOX,
        "--",
    ]
    return args


# ----------------------------------------------------------------------------- running a child


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid: start_new_session made it a leader
    except (ProcessLookupError, PermissionError):
        pass


def _wait_then_kill(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to timeout_s; kill the whole group either way. True when it timed out.

    The group is killed while the leader is still unreaped (a zombie keeps its pid, hence the
    group id, from being reused), then the leader is reaped. Under bubblewrap the program is in
    the same group, inside a PID namespace that dies with bwrap anyway (--die-with-parent).
    """
    timed_out = False
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): small pid-reuse window instead
        pidfd = None
    try:
        if pidfd is not None:
            ready, _, _ = select.select([pidfd], [], [], timeout_s)
            timed_out = not ready
        else:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        _kill_group(proc)
        if pidfd is not None:
            os.close(pidfd)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return timed_out


def _tail(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * _TAIL_CHARS))
    return f.read().decode("utf-8", errors="replace")[-_TAIL_CHARS:]


def _remove_tree(path: str) -> None:
    """Delete the sandbox dir even if the program made parts of it unreadable."""

    def make_writable_and_retry(func, failed_path, _exc_info):
        parent = os.path.dirname(failed_path)
        for p in (parent, failed_path):
            try:
                os.chmod(p, stat.S_IRWXU)
            except OSError:
                pass
        try:
            func(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


@dataclass(frozen=True)
class _Plan:
    """How to start one child: through bubblewrap or not, and the runner's features."""

    bwrap: str | None  # path of bwrap, or None for the runner's own layers
    features: tuple[str, ...]


@dataclass(frozen=True)
class _Outcome:
    returncode: int
    timed_out: bool
    started: bool  # the runner reached the program (after that, anything is a verdict)
    completed: bool  # the runner wrote the completion token: the program ran to its end
    stdout: str
    stderr: str
    wall_s: float


def _command(plan: _Plan, workdir: str, fds: tuple[int, int, int], probe: bool) -> list[str]:
    """The child's argv: [bwrap ...] python -I -B -c RUNNER args (see the top of _RUNNER)."""
    low, high = _SANDBOX_UID_RANGE
    sandbox_dir = _BWRAP_SANDBOX if plan.bwrap else workdir
    runner_args = [
        sandbox_dir,
        ",".join(plan.features),
        str(low + secrets.randbelow(high - low)),
        _real_home(),
        "1" if probe else "0",
        f"{_EXIT_FAILED},{_EXIT_SYNTAX},{_EXIT_SETUP}",
        *map(str, fds),
        seccomp_filter() if "seccomp" in plan.features else "",
        str(_SANDBOX_DIR_BYTES),
        "" if plan.bwrap else ":".join(_hidden_dirs(workdir)),
    ]
    prefix = _bwrap_args(plan.bwrap, workdir) if plan.bwrap else []
    return [*prefix, sys.executable, "-I", "-B", "-c", _RUNNER, *runner_args]


def _execute(program: str, timeout_s: float, memory_mb: int, plan: _Plan, probe: bool = False) -> _Outcome:
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="diffmas-sandbox-"))
    token = secrets.token_hex(16).encode()
    token_r, token_w = os.pipe()
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        os.write(token_w, token)
        os.close(token_w)
        token_w = -1
        with (
            tempfile.TemporaryFile() as out,
            tempfile.TemporaryFile() as err,
            tempfile.TemporaryFile() as started,
            tempfile.TemporaryFile() as done,
        ):
            fds = (token_r, started.fileno(), done.fileno())
            env = _child_env(_BWRAP_SANDBOX if plan.bwrap else workdir)
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    _command(plan, workdir, fds, probe),
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    close_fds=True,
                    pass_fds=fds,
                    start_new_session=True,
                    preexec_fn=lambda: _limit_resources(memory_mb * 1024 * 1024, int(timeout_s) + 1),
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise SandboxError(f"could not start the sandbox ({plan.bwrap or sys.executable}): {e}") from e
            os.close(token_r)
            token_r = -1
            timed_out = _wait_then_kill(proc, timeout_s)
            wall_s = time.monotonic() - start
            started.seek(0)
            done.seek(0)
            returncode = proc.returncode
            if plan.bwrap and returncode > 128:  # bwrap reports a signal death as 128 + signal
                returncode = 128 - returncode
            return _Outcome(
                returncode,
                timed_out,
                started.read() == b"started",
                done.read() == token,
                _tail(out),
                _tail(err),
                wall_s,
            )
    finally:
        for fd in (token_r, token_w):
            if fd >= 0:
                os.close(fd)
        _remove_tree(workdir)


# ----------------------------------------------------------------------------- isolation


_isolation_lock = threading.Lock()
_isolation: Isolation | None = None
_plan: _Plan | None = None
_required = "kernel"  # see require_isolation


def isolation() -> Isolation:
    """Probe once which kernel layers this machine allows (a child tries each and reports)."""
    return _probed()[0]


def _probed() -> tuple[Isolation, _Plan]:
    global _isolation, _plan
    with _isolation_lock:
        if _isolation is None:
            _isolation, _plan = _probe()
        if _plan is None:  # tests set _isolation alone: run with the layers it names
            _plan = _plan_for(_isolation)
        return _isolation, _plan


def _plan_for(iso: Isolation) -> _Plan:
    runner = (
        ("unprivileged_uid", "seccomp")
        if iso.bubblewrap
        else ("user_namespace", "network_namespace", "private_filesystem", "unprivileged_uid", "seccomp")
    )
    return _Plan(_bwrap_path() if iso.bubblewrap else None, tuple(f for f in runner if getattr(iso, f)))


def _probe_plan(plan: _Plan) -> dict[str, bool]:
    """Which of the plan's features the runner managed ({} when the child did not start)."""
    outcome = _execute("", 30.0, 1024, plan, probe=True)
    lines = outcome.stdout.strip().splitlines()
    if outcome.returncode != 0 or not lines:
        return {}
    return {name: value == "1" for name, _, value in (item.partition("=") for item in lines[-1].split(",") if item)}


def _probe() -> tuple[Isolation, _Plan]:
    root = os.geteuid() == 0
    wants_seccomp = ("seccomp",) if seccomp_filter() else ()
    bwrap = _bwrap_path()
    if bwrap and sys.platform.startswith("linux"):
        plan = _Plan(bwrap, (("unprivileged_uid",) if root else ()) + wants_seccomp)
        done = _probe_plan(plan)
        if done and (done.get("unprivileged_uid") or not root):
            iso = Isolation(
                bubblewrap=True,
                network_namespace=True,
                private_filesystem=True,
                unprivileged_uid=bool(done.get("unprivileged_uid")),
                seccomp=bool(done.get("seccomp")),
            )
            return iso, _plan_for(iso)
    wanted = ("network_namespace", "private_filesystem")
    wanted = wanted + ("unprivileged_uid",) if root else ("user_namespace",) + wanted
    done = _probe_plan(_Plan(None, wanted + wants_seccomp))
    if not root and not done.get("user_namespace"):  # then the other two were not possible
        done = {"seccomp": done.get("seccomp", False)}
    iso = Isolation(**{f.name: bool(done.get(f.name)) for f in fields(Isolation) if f.name != "bubblewrap"})
    return iso, _plan_for(iso)


def require_isolation(level: str) -> None:
    """The weakest isolation level runs accept in this process ('kernel' by default).

    'weak' (the CLI's --allow-weak-sandbox) runs generated code under whatever this machine
    allows, down to rlimits and the Python prelude."""
    global _required
    if level not in LEVELS:
        raise SandboxError(f"unknown isolation level {level!r}; choose one of {', '.join(LEVELS)}")
    _required = level


def check_isolation() -> Isolation:
    """This machine's isolation, or SandboxError when it is below the required level."""
    iso = isolation()
    if LEVELS.index(iso.level) < LEVELS.index(_required):
        missing = "bubblewrap (apt-get install bubblewrap)" if not iso.bubblewrap else ""
        if not iso.seccomp:
            missing += (" and " if missing else "") + "libseccomp with pyseccomp"
        raise SandboxError(
            f"the code sandbox here is only {iso.describe()}, below the required "
            f"'{_required}'; install {missing or 'what is missing'} so that generated code "
            "cannot reach the host, or pass --allow-weak-sandbox to run it anyway"
        )
    return iso


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if memory_mb < _MIN_MEMORY_MB:
        raise ValueError(f"memory_mb must be at least {_MIN_MEMORY_MB} (the interpreter needs it), got {memory_mb!r}")


def _status(outcome: _Outcome) -> str:
    returncode = outcome.returncode
    if outcome.timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed" if outcome.completed else "failed"
    if returncode == _EXIT_SYNTAX:
        return "error"
    if returncode < 0:
        return "killed"
    return "failed"


def run_in_sandbox(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run a Python program in a contained child; see the module docstring for the layers.

    Thread-safe: call it from a thread pool to run programs in parallel. Raises SandboxError
    when the sandbox itself cannot run, or gives less isolation than required; anything the
    program does gives a result.
    """
    _check_limits(timeout_s, memory_mb)
    check_isolation()
    outcome = _execute(program, timeout_s, memory_mb, _probed()[1])
    if not outcome.started and not outcome.timed_out:
        raise SandboxError(f"the sandbox could not isolate the program: {outcome.stderr.strip()[-500:]}")
    status = _status(outcome)
    stderr = outcome.stderr
    if outcome.returncode == 0 and not outcome.completed:
        stderr += "sandbox: the program left before its end (no completion token)\n"
    return SandboxResult(status == "passed", status, outcome.stdout, stderr[-_TAIL_CHARS:], outcome.wall_s)
