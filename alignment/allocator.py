"""The process's memory allocator: a caching malloc for CPU runs, chosen before the process starts.

PyTorch's CPU tensors come from malloc. glibc's malloc fragments under a training loop's pattern of
large short-lived buffers of many sizes: in a PPO update on one 4-bit base it held about twice the
live tensors, so the shared base's saving disappeared from the peak (docs/benchmarks.md, issue 16).
tcmalloc and mimalloc keep freed blocks by size class and reuse them: the same update then peaks near
its live memory, and runs no slower. An allocator can only replace malloc when a process starts
(`LD_PRELOAD`), so the `alignment` command re-executes itself once with one preloaded.

`ALIGNMENT_ALLOCATOR` chooses: `auto` (the default: tcmalloc, else mimalloc, if installed), `tcmalloc`,
`mimalloc`, `jemalloc` (as low a peak, but PPO ran 0.73× as fast as on glibc: not in `auto`), a path to
an allocator's shared library, or `system` (the C library's malloc, unchanged). The libraries are
system packages (Debian/Ubuntu: `apt install libtcmalloc-minimal4`); no Python package ships one.
Linux only; elsewhere the system's malloc stays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

ALLOCATOR_VARIABLE = "ALIGNMENT_ALLOCATOR"
SYSTEM = "system"
# name → the library names ld.so knows it by.
CACHING_ALLOCATORS: dict[str, tuple[str, ...]] = {
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
    "mimalloc": ("mimalloc",),
    "jemalloc": ("jemalloc",),
}
AUTO = ("tcmalloc", "mimalloc")  # `auto`'s choices, in order of preference (measured in docs/benchmarks.md)
INSTALL_HINT = "install one (Debian/Ubuntu: apt install libtcmalloc-minimal4)"
# Set once the process has been re-executed, so that it never loops.
_REEXECUTED_VARIABLE = "ALIGNMENT_ALLOCATOR_PRELOADED"


class AllocatorError(ValueError):
    """ALIGNMENT_ALLOCATOR names an allocator that is not installed or not a library."""


def allocator_library(choice: str | None = None) -> str | None:
    """The shared library to preload for `choice` (default: $ALIGNMENT_ALLOCATOR or auto), or None.

    None means the system's malloc: asked for, not on Linux, or `auto` with no caching allocator installed.
    """
    choice = (choice if choice is not None else os.environ.get(ALLOCATOR_VARIABLE, "auto")).strip() or "auto"
    if choice == SYSTEM or not sys.platform.startswith("linux"):
        return None
    if "/" in choice:
        if not Path(choice).is_file():
            raise AllocatorError(f"{ALLOCATOR_VARIABLE}={choice}: no such file; give an allocator's .so or one of "
                                 f"auto, {', '.join(CACHING_ALLOCATORS)}, {SYSTEM}")  # fmt: skip
        return choice
    if choice != "auto" and choice not in CACHING_ALLOCATORS:
        raise AllocatorError(f"{ALLOCATOR_VARIABLE}={choice}: unknown allocator; use auto, "
                             f"{', '.join(CACHING_ALLOCATORS)}, {SYSTEM} or a path to a shared library")  # fmt: skip
    for name in AUTO if choice == "auto" else [choice]:
        for library in CACHING_ALLOCATORS[name]:
            found = ctypes.util.find_library(library)
            if found:
                return found
    if choice != "auto":
        raise AllocatorError(f"{ALLOCATOR_VARIABLE}={choice}: {choice} is not installed; {INSTALL_HINT}, "
                             f"or set {ALLOCATOR_VARIABLE}=auto or {SYSTEM}")  # fmt: skip
    return None


def preload_environment(library: str | None, environment: dict[str, str] | None = None) -> dict[str, str]:
    """`environment` (default: this process's) for a child process that starts with `library` as its malloc."""
    environment = dict(os.environ if environment is None else environment)
    if library is None:
        return environment
    preloaded = environment.get("LD_PRELOAD", "")
    if library not in preloaded.split():
        environment["LD_PRELOAD"] = f"{library} {preloaded}".strip()
    # tcmalloc prints a stack trace for every allocation over 1 GiB (a 7B model's embedding is one).
    environment.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 62))
    environment[_REEXECUTED_VARIABLE] = library
    return environment


def restart_with_caching_allocator(module: str = "alignment") -> None:
    """Re-executes this process as `python -m module ARGS` with a caching allocator preloaded, if one is
    chosen and not loaded yet; returns only when the process keeps the malloc it has."""
    if os.environ.get(_REEXECUTED_VARIABLE) is not None:
        return
    try:
        library = allocator_library()
    except AllocatorError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if library is None or active_allocator() != SYSTEM:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, *interpreter_options(), "-m", module, *sys.argv[1:]]
    os.execve(sys.executable, command, preload_environment(library))


def interpreter_options(original: list[str] | None = None) -> list[str]:
    """The options the interpreter itself was started with (`-X importtime`, `-W error`, `-O`, ...), read from
    `sys.orig_argv` up to the script or `-m`, so the restarted process keeps them."""
    words = iter((sys.orig_argv if original is None else original)[1:])
    options = []
    for word in words:
        if word in ("-X", "-W", "--check-hash-based-pycs"):  # the options that take a separate value
            options += [word, next(words, "")]
        elif word.startswith("-") and not word.startswith(("-m", "-c")) and word not in ("-", "--"):
            options.append(word)
        else:  # the script, `-m module` or `-c command`: what follows is not the interpreter's
            break
    return options


def active_allocator() -> str:
    """Which malloc this process runs on: a caching allocator's name, or `system`."""
    mapped = _mapped_allocator()
    return mapped[0] if mapped else SYSTEM


def allocator_description() -> str:
    """The allocator's name and, for a caching one, the library file it was loaded from."""
    mapped = _mapped_allocator()
    return f"{mapped[0]} ({mapped[1]})" if mapped else SYSTEM


def _mapped_allocator() -> tuple[str, str] | None:
    """(name, file) of the caching allocator mapped into this process, from /proc/self/maps."""
    try:
        files = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    except OSError:
        return None
    preloaded = os.environ.get(_REEXECUTED_VARIABLE)  # a library given by path may have any name
    for file in sorted(files):
        name = Path(file).name
        known = next((allocator for allocator in CACHING_ALLOCATORS if name.startswith(f"lib{allocator}")), None)
        if known or (preloaded and name == Path(preloaded).name):
            return known or name, file
    return None


def missing_allocator_advice() -> str | None:
    """A warning for CPU training that runs on the system's malloc without having asked for it, else None."""
    if not sys.platform.startswith("linux"):  # no LD_PRELOAD to offer there
        return None
    if active_allocator() != SYSTEM or os.environ.get(ALLOCATOR_VARIABLE, "auto") == SYSTEM:
        return None
    return ("training on the CPU with the C library's malloc, whose fragmentation can double the peak memory "
            "(docs/benchmarks.md); the `alignment` command preloads a caching allocator when one is installed: "
            f"{INSTALL_HINT}, or set {ALLOCATOR_VARIABLE}={SYSTEM} to silence this")  # fmt: skip


def release_freed_memory() -> None:
    """Hands the memory the last phase freed back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    glibc keeps what a phase frees in its heaps: after one update the process holds the update's
    high-water mark for good, and the next rollout and update allocate around it. Trimming once per
    phase costs milliseconds. (A caching allocator returns memory on its own schedule.)
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and other C libraries
        return None


_LIBC = _glibc()
