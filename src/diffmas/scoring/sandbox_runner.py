"""The program the sandbox's child runs before model-generated code (see `diffmas.scoring.sandbox`).

Never imported: `sandbox.py` reads this file and hands its text to `python -I -B -c` in the child,
so it works wherever the interpreter runs, inside bubblewrap too, whether or not the package
directory is visible there. It uses the standard library only and reads its settings from argv:
kernel isolation first, then the Python prelude guards, then the program.
"""

import builtins
import io
import os
import posix
import sys
import types


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
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
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
        _fields_ = [
            ("attr_set", ctypes.c_uint64),
            ("attr_clr", ctypes.c_uint64),
            ("propagation", ctypes.c_uint64),
            ("userns_fd", ctypes.c_uint64),
        ]

    def mount_setattr(path, recursive, attr_set, attr_clr):
        attr = MountAttr(attr_set, attr_clr, 0, 0)
        rc = libc.syscall(
            ctypes.c_long(442),
            ctypes.c_int(-100),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(0x8000 if recursive else 0),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        check(int(rc != 0), f"mount_setattr({path})")

    def tmpfs(path, options):
        os.makedirs(path, exist_ok=True)
        check(
            libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0x2 | 0x4 | 0x8, options.encode()), f"mount tmpfs on {path}"
        )  # MS_NOSUID | MS_NODEV | MS_NOEXEC

    def private_filesystem():
        check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
        # private: nothing done here propagates back to the host's mounts
        check(libc.mount(None, b"/", None, 0x4000 | (1 << 18), None), "mount(MS_REC|MS_PRIVATE)")
        hidden = [h for h in HIDDEN.split(":") if h and os.path.isdir(h)]
        # the interpreter's prefixes under a hidden home: opened now, bound back once covered
        keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in READABLE if any(_within(p, h) for h in hidden)}
        os.umask(0o022)
        for home in hidden:
            tmpfs(home, "mode=0755,size=1m")
        for path, fd in keep.items():
            os.makedirs(path, exist_ok=True)
            check(
                libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, 0x1000 | 0x4000, None), f"bind {path}"
            )  # MS_BIND | MS_REC
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
            _fields_ = [
                ("effective", ctypes.c_uint32),
                ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32),
            ]

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

    steps = [
        ("user_namespace", user_namespace),
        ("network_namespace", network_namespace),
        ("private_filesystem", private_filesystem),
        ("unprivileged_uid", unprivileged_uid),
    ]
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
        if real is not None and home and within(real, home) and not any(within(real, root) for root in readable):
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
            fds = (kwargs.get("src_dir_fd"), kwargs.get("dst_dir_fd")) if n_paths == 2 else (kwargs.get("dir_fd"),)
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
    for name in (
        "remove",
        "unlink",
        "rmdir",
        "mkdir",
        "chmod",
        "chown",
        "lchown",
        "truncate",
        "utime",
        "mkfifo",
        "mknod",
        "chflags",
        "lchflags",
        "lchmod",
        "setxattr",
        "removexattr",
    ):
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
    for name in (
        "fork",
        "forkpty",
        "vfork",
        "system",
        "popen",
        "killpg",
        "setsid",
        "setpgid",
        "execv",
        "execve",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "execvp",
        "execvpe",
        "spawnv",
        "spawnve",
        "spawnvp",
        "spawnvpe",
        "spawnl",
        "spawnle",
        "spawnlp",
        "spawnlpe",
        "posix_spawn",
        "posix_spawnp",
        "plock",
    ):
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
    for name in (
        "getaddrinfo",
        "gethostbyname",
        "gethostbyname_ex",
        "gethostbyaddr",
        "getnameinfo",
        "socketpair",
        "fromfd",
    ):
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


if __name__ == "__main__":
    # argv (plain strings, not JSON: importing json would pull in `re` on every run): sandbox dir,
    # features (comma-separated), uid, home, probe (0/1), exit codes, the fds of the token pipe, the
    # start file and the done file, the seccomp filter (hex BPF), the tmpfs size, homes to hide
    (SANDBOX, FEATURES, UID, HOME, PROBE, EXIT_CODES, TOKEN_FD, START_FD, DONE_FD, SECCOMP_BPF, TMPFS_BYTES, HIDDEN) = (
        sys.argv[1:13]
    )
    EXIT_FAILED, EXIT_SYNTAX, EXIT_SETUP = map(int, EXIT_CODES.split(","))
    READABLE = sorted(
        {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    )
    _exit_now = sys.exit  # kept before the program runs: it may replace sys.exit
    _exit_now(_main())
