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
_RUNNER = r'''
import builtins, io, os, posix, sys, types

# argv (plain strings, not JSON: importing json would pull in `re` on every run): sandbox dir,
# features (comma-separated), uid, home, probe (0/1), exit codes, the fds of the token pipe, the
# start file and the done file, the seccomp filter (hex BPF), the tmpfs size, homes to hide
(SANDBOX, FEATURES, UID, HOME, PROBE, EXIT_CODES, TOKEN_FD, START_FD, DONE_FD, SECCOMP_BPF,
 TMPFS_BYTES, HIDDEN) = sys.argv[1:13]
EXIT_FAILED, EXIT_SYNTAX, EXIT_SETUP = map(int, EXIT_CODES.split(","))
READABLE = sorted({os.path.realpath(p) for p in
                   (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)})


def _setup_failed(message):
    sys.stderr.write(f"sandbox setup failed: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_SETUP)


def _within(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _isolate(features, uid, probe):
    """Kernel isolation; each feature either works or the child exits (probe: report instead)."""
    import ctypes
    import resource
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

    def tmpfs(path, options):
        os.makedirs(path, exist_ok=True)
        check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0x2 | 0x4 | 0x8, options.encode()),
              f"mount tmpfs on {path}")  # MS_NOSUID | MS_NODEV | MS_NOEXEC

    def private_filesystem():
        check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
        # private: nothing done here propagates back to the host's mounts
        check(libc.mount(None, b"/", None, 0x4000 | (1 << 18), None), "mount(MS_REC|MS_PRIVATE)")
        hidden = [h for h in HIDDEN.split(":") if h and os.path.isdir(h)]
        # the interpreter's prefixes under a hidden home: opened now, bound back once covered
        keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in READABLE
                if any(_within(p, h) for h in hidden)}
        os.umask(0o022)
        for home in hidden:
            tmpfs(home, "mode=0755,size=1m")
        for path, fd in keep.items():
            os.makedirs(path, exist_ok=True)
            check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None,
                             0x1000 | 0x4000, None), f"bind {path}")  # MS_BIND | MS_REC
            os.close(fd)
        tmpfs(SANDBOX, f"mode=0700,size={TMPFS_BYTES}")  # all files together: no disk filling
        mount_setattr("/", True, 1, 0)  # MOUNT_ATTR_RDONLY on every mount
        mount_setattr(SANDBOX, False, 0, 1)
        os.chdir(SANDBOX)

    def drop_bounding_set():
        # no exec can ever regain a capability; needs CAP_SETPCAP, so before any uid switch
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
        for cap in range(last + 1):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly when not permitted

    def drop_capabilities():
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        check(libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset")

    def unprivileged_uid():
        # Root is exempt from RLIMIT_NPROC and its capabilities reach every file: run as a
        # throwaway uid with none (the interpreter's files are world-readable where they are).
        os.chown(SANDBOX, uid, uid)
        drop_bounding_set()
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        drop_capabilities()

    def seccomp():
        # The filter was compiled by the parent (libseccomp); loading it needs no library here.
        program = bytes.fromhex(SECCOMP_BPF)
        if not program:
            raise OSError(0, "no seccomp filter was compiled (is pyseccomp installed?)")

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
        check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        check(libc.prctl(22, 2, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")

    steps = [("user_namespace", user_namespace), ("network_namespace", network_namespace),
             ("private_filesystem", private_filesystem), ("unprivileged_uid", unprivileged_uid)]
    done = {}

    def run(name, step):
        try:
            step()
            done[name] = True
        except OSError as e:
            if not probe:
                _setup_failed(f"{name}: {e}")
            done[name] = False

    for name, step in steps:
        if name in features:
            run(name, step)
    try:
        if not done.get("unprivileged_uid"):
            drop_bounding_set()
            drop_capabilities()
        check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    except (OSError, AttributeError) as e:
        if any(done.values()):  # a kernel layer was set up: then this must work too
            _setup_failed(f"dropping capabilities: {e}")
    # Counted per user, so 1 forbids any fork or thread (set here, not before exec: bubblewrap
    # forks itself). Root is exempt, hence the throwaway uid above.
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    if "seccomp" in features:
        run("seccomp", seccomp)  # last: it forbids the mounts and namespaces above
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

    readable = [*READABLE, SANDBOX]

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
    # Before anything the program could see: the token, read and its pipe closed; the program's
    # source, read before the sandbox dir is covered by its tmpfs.
    token = os.read(int(TOKEN_FD), 64)
    os.close(int(TOKEN_FD))
    with open(os.path.join(SANDBOX, "program.py"), encoding="utf-8") as f:
        source = f.read()
    features = [f for f in FEATURES.split(",") if f]
    if sys.platform.startswith("linux"):  # namespaces, capabilities and /proc are Linux only
        try:
            _isolate(features, int(UID), PROBE == "1")
        except Exception as e:  # e.g. no ctypes: fatal only when a kernel layer was asked for
            if features or PROBE == "1":
                _setup_failed(f"{type(e).__name__}: {e}")
    elif features or PROBE == "1":
        _setup_failed(f"kernel isolation needs Linux, not {sys.platform}")
    os.write(int(START_FD), b"started")  # the parent: from here on, a verdict on the program
    os.close(int(START_FD))
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
    os.write(int(DONE_FD), token)  # reached only when the program ran to its end
    return 0


_exit_now = sys.exit  # kept before the program runs: it may replace sys.exit
_exit_now(_main())
'''


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
