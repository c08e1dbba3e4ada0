"""Run untrusted Python (model-generated code) in a contained child process.

The program never runs in this process. Each call starts a fresh `python -I -B` (the same
interpreter) in its own session, with its own temporary directory as working directory, HOME and
TMPDIR (deleted afterwards), a minimal environment and stdin from /dev/null. Guards, outermost
first:

1. Process: on timeout, and always once the child is done, the whole process group gets SIGKILL;
   the child is reaped, so no zombies or temporary directories are left behind.
2. rlimits (set in the preexec function): address space (`memory_mb`), CPU seconds, file size
   (10 MB, which also caps the captured output), open files, no core dumps, and RLIMIT_NPROC=1:
   the program may not start processes or threads.
3. Kernel isolation, where this machine permits it (probed once, see `isolation()`):
   - a new network namespace: no interfaces but a loopback that is down;
   - a new mount namespace where every mount is read-only except the sandbox directory;
   - as root, a switch to a throwaway uid that keeps only CAP_DAC_READ_SEARCH (the interpreter
     may live under /root), because the kernel never applies RLIMIT_NPROC to uid 0;
   - as another user, an unprivileged user namespace (the user mapped to itself) is what allows
     the network and mount namespaces; RLIMIT_NPROC applies to such users anyway.
   All capabilities are dropped (bounding set included) and no_new_privs is set.
4. A Python prelude (best effort, it can be worked around from inside): fork/exec/spawn/system,
   subprocess, signalling other processes, sockets and DNS, ctypes and os._exit are disabled;
   writes outside the sandbox directory and reads under the caller's home directory (other than
   the interpreter's own files) raise PermissionError.

Where a kernel layer is not permitted (e.g. a container without user namespaces), the others
still apply and `isolation()` says which are active. A program passes when it runs to its end
(exit status 0); calling exit() part way, even exit(0), counts as a failure, as in the
HumanEval harness. The program runs as a module named `sandboxed_program`, not `__main__`, so
`if __name__ == "__main__":` blocks in generated code do not run (the official harnesses `exec`
the code the same way).
"""

from __future__ import annotations

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
from dataclasses import dataclass
from typing import IO

from diffmas.errors import DiffmasError

STATUSES = ("passed", "failed", "timeout", "error", "killed")
_TAIL_CHARS = 4000  # how much of stdout / stderr a result keeps (the end, where errors are)
_FILE_SIZE_LIMIT = 10 * 1024 * 1024  # RLIMIT_FSIZE: caps files the program writes and its output
_OPEN_FILES_LIMIT = 256
_MIN_MEMORY_MB = 128  # below this the interpreter itself cannot start
_SANDBOX_UID_RANGE = (0x10000000, 0x7FFF0000)  # throwaway uids: far from real users and services

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

    user_namespace: bool  # non-root only: the user namespace that allows the two below
    network_namespace: bool  # no network at all, whatever the program does
    readonly_filesystem: bool  # every mount read-only except the sandbox directory
    unprivileged_uid: bool  # root only: runs as a throwaway uid, so RLIMIT_NPROC applies

    @property
    def network(self) -> str:
        return "namespace" if self.network_namespace else "prelude only"


# The code the child runs before the program: kernel isolation, then the prelude guards, then
# the program. It uses the standard library only and reads its settings from argv.
_RUNNER = r'''
import builtins, io, os, posix, sys, types

# argv: sandbox dir, features (comma-separated), uid, home, probe (0/1), exit codes
# (plain strings, not JSON: importing json would pull in `re` on every run)
SANDBOX, FEATURES, UID, HOME, PROBE, EXIT_CODES = sys.argv[1:7]
EXIT_FAILED, EXIT_SYNTAX, EXIT_SETUP = map(int, EXIT_CODES.split(","))


def _setup_failed(message):
    sys.stderr.write(f"sandbox setup failed: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_SETUP)


def _isolate(features, uid, probe):
    """Kernel isolation; each feature either works or the child exits (probe: report instead)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    libc.syscall.restype = ctypes.c_long

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def write_file(path, text):
        with open(path, "w") as f:
            f.write(text)

    def user_namespace():
        # Map the user to itself: files keep their owner, and the new namespace's capabilities
        # are what allow the network and mount namespaces below without privileges.
        real_uid, real_gid = os.geteuid(), os.getegid()
        check(libc.unshare(0x10000000), "unshare(CLONE_NEWUSER)")
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", f"{real_uid} {real_uid} 1")
        write_file("/proc/self/gid_map", f"{real_gid} {real_gid} 1")

    def network_namespace():
        check(libc.unshare(0x40000000), "unshare(CLONE_NEWNET)")

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    def mount_setattr(path, recursive, attr_set, attr_clr):
        attr = MountAttr(attr_set, attr_clr, 0, 0)
        rc = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), ctypes.c_char_p(path.encode()),
                          ctypes.c_uint(0x8000 if recursive else 0), ctypes.byref(attr),
                          ctypes.c_size_t(ctypes.sizeof(attr)))
        check(int(rc != 0), f"mount_setattr({path})")

    def readonly_filesystem():
        check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
        # private: nothing done here propagates back to the host's mounts
        check(libc.mount(None, b"/", None, 0x4000 | (1 << 18), None), "mount(MS_REC|MS_PRIVATE)")
        # the sandbox dir becomes its own mount so it can stay writable below
        check(libc.mount(SANDBOX.encode(), SANDBOX.encode(), None, 4096, None), "bind mount")
        mount_setattr("/", True, 1, 0)  # MOUNT_ATTR_RDONLY on every mount
        mount_setattr(SANDBOX, False, 0, 1)
        os.chdir(SANDBOX)  # the old cwd is the directory under the bind mount: read-only now

    def drop_bounding_set():
        # no exec can ever regain a capability; needs CAP_SETPCAP, so before any uid switch
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
        for cap in range(last + 1):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly when not permitted

    def set_capabilities(keep):
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        data = (Data * 2)()
        data[0].effective = data[0].permitted = keep
        check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")

    def unprivileged_uid():
        # Root is exempt from RLIMIT_NPROC, so run as a throwaway uid. Keep CAP_DAC_READ_SEARCH
        # only, so the interpreter and its modules stay readable wherever they are installed.
        os.chown(SANDBOX, uid, uid)
        drop_bounding_set()
        check(libc.prctl(8, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        set_capabilities(1 << 2)

    steps = [("user_namespace", user_namespace), ("network_namespace", network_namespace),
             ("readonly_filesystem", readonly_filesystem), ("unprivileged_uid", unprivileged_uid)]
    done = {}
    for name, step in steps:
        if name not in features:
            continue
        try:
            step()
            done[name] = True
        except OSError as e:
            if not probe:
                _setup_failed(f"{name}: {e}")
            done[name] = False
    try:
        if not done.get("unprivileged_uid"):
            drop_bounding_set()
            set_capabilities(0)
        check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    except (OSError, AttributeError) as e:
        if any(done.values()):  # a kernel layer was set up: then this must work too
            _setup_failed(f"dropping capabilities: {e}")
    if probe:
        print(",".join(f"{name}={int(ok)}" for name, ok in done.items()))
        sys.stdout.flush()
        os._exit(0)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        sys.modules[name] = None  # a later `import ctypes` raises ImportError


def _install_guards(home):
    """Best-effort Python-level guards; the kernel layers above are the real ones."""
    import _io
    import _socket

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def disabled(what):
        def refuse(*args, **kwargs):
            deny(what)
        return refuse

    def within(path, root):
        return path == root or path.startswith(root.rstrip("/") + "/")

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            return None  # an open file descriptor: it was checked when it was opened
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(path)

    readable = [os.path.realpath(p) for p in
                {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, SANDBOX}]

    def check_write(path, dir_fd=None):
        real = resolve(path, dir_fd)
        if real is not None and not within(real, SANDBOX) and real != os.devnull:
            deny(f"writing {real} (outside the sandbox directory)")

    def check_read(path, dir_fd=None):
        real = resolve(path, dir_fd)
        if (real is not None and home and within(real, home)
                and not any(within(real, root) for root in readable)):
            deny(f"reading {real} (the user's home directory)")

    real_open = _io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        (check_write if any(c in mode for c in "wax+") else check_read)(file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = posix.open

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        (check_write if flags & write_flags else check_read)(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def guard_paths(fn, n_paths, check):
        def guarded(*args, **kwargs):
            fds = (kwargs.get("src_dir_fd"), kwargs.get("dst_dir_fd")) if n_paths == 2 else (
                kwargs.get("dir_fd"),)
            for path, fd in zip(args[:n_paths], fds):
                check(path, fd)
            return fn(*args, **kwargs)
        return guarded

    def guarded_kill(pid, sig):
        if pid != os.getpid():
            deny(f"signalling process {pid}")
        return posix_kill(pid, sig)

    def refuse_exit(code=0):
        raise SystemExit(code)

    posix_kill = posix.kill
    patches = {"open": guarded_os_open, "kill": guarded_kill, "_exit": refuse_exit}
    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate",
                 "utime", "mkfifo", "mknod", "chflags", "lchflags", "lchmod", "setxattr",
                 "removexattr"):
        if hasattr(posix, name):
            patches[name] = guard_paths(getattr(posix, name), 1, check_write)
    for name in ("rename", "replace", "link"):
        patches[name] = guard_paths(getattr(posix, name), 2, check_write)
    real_symlink = posix.symlink

    def guarded_symlink(src, dst, *args, **kwargs):
        check_write(dst, kwargs.get("dir_fd"))  # where it points is checked when it is used
        return real_symlink(src, dst, *args, **kwargs)

    patches["symlink"] = guarded_symlink
    for name in ("listdir", "scandir"):
        patches[name] = guard_paths(getattr(posix, name), 1, check_read)
    for name in ("fork", "forkpty", "vfork", "system", "popen", "killpg", "setsid", "setpgid",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "posix_spawn", "posix_spawnp", "plock"):
        patches[name] = disabled(f"os.{name} (starting or controlling processes)")
    for name, fn in patches.items():
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, fn)

    fake = types.ModuleType("_posixsubprocess")
    fake.fork_exec = disabled("starting a subprocess")
    sys.modules["_posixsubprocess"] = fake

    class NoSocket(_socket.socket):
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            deny("network access")

    _socket.socket = _socket.SocketType = NoSocket
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                 "getnameinfo", "socketpair", "fromfd"):
        if hasattr(_socket, name):
            setattr(_socket, name, disabled("network access"))


def _main():
    features = [f for f in FEATURES.split(",") if f]
    if sys.platform.startswith("linux"):  # namespaces, capabilities and /proc are Linux only
        try:
            _isolate(features, int(UID), PROBE == "1")
        except Exception as e:  # e.g. no ctypes: fatal only when a kernel layer was asked for
            if features or PROBE == "1":
                _setup_failed(f"{type(e).__name__}: {e}")
    elif features or PROBE == "1":
        _setup_failed(f"kernel isolation needs Linux, not {sys.platform}")
    with open(os.path.join(SANDBOX, "program.py"), encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, "program.py", "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: NUL bytes in the source
        import traceback
        sys.stderr.write("".join(traceback.format_exception_only(type(e), e)))
        return EXIT_SYNTAX
    _install_guards(HOME)
    module = types.ModuleType("sandboxed_program")
    module.__file__ = "program.py"
    sys.modules["sandboxed_program"] = module
    sys.argv = ["program.py"]
    try:
        exec(code, module.__dict__)
    except SystemExit as e:
        sys.__stderr__.write(f"sandbox: the program called exit({e.code!r}) before its end\n")
        return EXIT_FAILED
    except BaseException as e:  # the traceback starts at the program: the runner's frame is noise
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next, file=sys.__stderr__)
        return EXIT_FAILED
    return 0


_exit_now = sys.exit  # kept before the program runs: it may replace sys.exit
_exit_now(_main())
'''


def _real_home() -> str:
    """The caller's home directory (guarded against reads in the child); '' when it is '/'."""
    home = os.path.realpath(os.path.expanduser("~"))
    return "" if home == "/" else home


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
    """preexec_fn: runs in the forked child before exec. Only setrlimit calls (fork-safe)."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # soft < hard: the soft limit sends SIGXCPU, which the status maps to 'timeout'
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_NOFILE, (_OPEN_FILES_LIMIT, _OPEN_FILES_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # No new processes or threads. Counted per user, so 1 forbids any fork for non-root users;
    # root is exempt, which is why root runs switch to a throwaway uid (see the runner).
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))


def _runner_args(workdir: str, features: list[str], probe: bool = False) -> list[str]:
    """The runner's argv (see the top of _RUNNER)."""
    low, high = _SANDBOX_UID_RANGE
    return [workdir, ",".join(features), str(low + secrets.randbelow(high - low)), _real_home(),
            "1" if probe else "0", f"{_EXIT_FAILED},{_EXIT_SYNTAX},{_EXIT_SETUP}"]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid: start_new_session made it a leader
    except (ProcessLookupError, PermissionError):
        pass


def _wait_then_kill(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to timeout_s; kill the whole group either way. True when it timed out.

    The group is killed while the leader is still unreaped (a zombie keeps its pid, hence the
    group id, from being reused), then the leader is reaped.
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


def _spawn(workdir: str, runner_args: list[str], memory_mb: int, cpu_s: int, stdout: IO[bytes],
           stderr: IO[bytes]) -> subprocess.Popen:
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _RUNNER, *runner_args],
            cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, close_fds=True, start_new_session=True,
            preexec_fn=lambda: _limit_resources(memory_mb * 1024 * 1024, cpu_s),
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(f"could not start the sandbox interpreter {sys.executable}: {e}") from e


def _status(returncode: int, timed_out: bool) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == _EXIT_SYNTAX:
        return "error"
    if returncode < 0:
        return "killed"
    return "failed"


def _execute(program: str, timeout_s: float, memory_mb: int, features: list[str],
             probe: bool = False) -> tuple[int, bool, str, str, float]:
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="diffmas-sandbox-"))
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = _spawn(workdir, _runner_args(workdir, features, probe), memory_mb,
                          int(timeout_s) + 1, out, err)
            timed_out = _wait_then_kill(proc, timeout_s)
            wall_s = time.monotonic() - start
            return proc.returncode, timed_out, _tail(out), _tail(err), wall_s
    finally:
        _remove_tree(workdir)


_isolation_lock = threading.Lock()
_isolation: Isolation | None = None


def isolation() -> Isolation:
    """Probe once which kernel layers this machine allows (a child tries each and reports)."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe()
        return _isolation


def _probe() -> Isolation:
    root = os.geteuid() == 0
    wanted = ["network_namespace", "readonly_filesystem"]
    wanted = wanted + ["unprivileged_uid"] if root else ["user_namespace"] + wanted
    code, _, out, _, _ = _execute("", 30.0, 1024, wanted, probe=True)
    lines = out.strip().splitlines()
    fields = [item.partition("=") for item in lines[-1].split(",")] if code == 0 and lines else []
    done = {name: value == "1" for name, _, value in fields}
    if not root and not done.get("user_namespace"):
        done = {}  # without the user namespace the other two were not really possible
    return Isolation(**{name: bool(done.get(name)) for name in Isolation.__dataclass_fields__})


def _features(iso: Isolation) -> list[str]:
    return [name for name in Isolation.__dataclass_fields__ if getattr(iso, name)]


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if memory_mb < _MIN_MEMORY_MB:
        raise ValueError(f"memory_mb must be at least {_MIN_MEMORY_MB} (the interpreter needs it), "
                         f"got {memory_mb!r}")


def run_in_sandbox(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run a Python program in a contained child; see the module docstring for the guards.

    Thread-safe: call it from a thread pool to run programs in parallel. Raises SandboxError
    only when the sandbox itself cannot run; anything the program does gives a result.
    """
    _check_limits(timeout_s, memory_mb)
    returncode, timed_out, out, err, wall_s = _execute(
        program, timeout_s, memory_mb, _features(isolation()))
    if returncode == _EXIT_SETUP and not timed_out:
        raise SandboxError(f"the sandbox could not isolate the program: {err.strip()[-500:]}")
    status = _status(returncode, timed_out)
    return SandboxResult(status == "passed", status, out, err, wall_s)
