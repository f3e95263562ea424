"""The `alignment` command restarts with a caching malloc (tcmalloc, mimalloc, jemalloc) when one is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.allocator import (
    ALLOCATOR_VARIABLE,
    AUTO,
    CACHING_ALLOCATORS,
    AllocatorError,
    active_allocator,
    allocator_library,
    interpreter_options,
    missing_allocator_advice,
    preload_environment,
)

from conftest import ROOT

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD allocators: Linux only")


def installed(name: str) -> str | None:
    try:
        return allocator_library(name)
    except AllocatorError:
        return None


INSTALLED = [name for name in CACHING_ALLOCATORS if installed(name)]
INSTALLED_AUTO = [name for name in AUTO if name in INSTALLED]
NONE_INSTALLED = "no caching allocator installed here (Debian/Ubuntu: apt install libtcmalloc-minimal4)"


def alignment_env(choice: str | None, interpreter: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", ALLOCATOR_VARIABLE)}
    environment.pop("ALIGNMENT_ALLOCATOR_PRELOADED", None)
    if choice is not None:
        environment[ALLOCATOR_VARIABLE] = choice
    command = [sys.executable, *interpreter, "-m", "alignment", "env"]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)


def reported_allocator(result: subprocess.CompletedProcess) -> tuple[str, str | None]:
    """(name, library file) from `alignment env`'s line "allocator: tcmalloc (/usr/lib/…)" or "allocator: system"."""
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("allocator: "))
    name, _, file = line.removeprefix("allocator: ").partition(" (")
    return name, file.rstrip(")") or None


@linux_only
@pytest.mark.parametrize("name", list(CACHING_ALLOCATORS))
def test_each_allocator_resolves_to_its_library_or_says_how_to_install_it(name):
    """Named explicitly, an allocator is either found (a library ld.so can load) or refused with the fix."""
    try:
        library = allocator_library(name)
    except AllocatorError as error:
        assert f"{ALLOCATOR_VARIABLE}={name}: {name} is not installed" in str(error)
        assert "apt install libtcmalloc-minimal4" in str(error) and "system" in str(error)
        return
    assert library is not None and f"lib{name}" in library


def test_bad_choices_are_refused_naming_the_variable():
    with pytest.raises(AllocatorError, match=f"{ALLOCATOR_VARIABLE}=glibcc: unknown allocator; use auto, tcmalloc"):
        allocator_library("glibcc")
    if sys.platform.startswith("linux"):
        with pytest.raises(AllocatorError, match=f"{ALLOCATOR_VARIABLE}=/no/such.so: no such file"):
            allocator_library("/no/such.so")
    assert allocator_library("system") is None


def test_the_preload_environment_puts_the_library_first_and_keeps_what_was_there():
    environment = preload_environment("libtcmalloc_minimal.so.4", {"LD_PRELOAD": "libother.so", "PATH": "/bin"})
    assert environment["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so"
    assert environment["PATH"] == "/bin" and int(environment["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 2**40
    assert preload_environment(None, {"PATH": "/bin"}) == {"PATH": "/bin"}


@linux_only
def test_the_command_restarts_with_the_first_installed_allocator_and_system_keeps_malloc():
    """`auto` (the default) picks tcmalloc, else mimalloc; the process that runs the command has it mapped
    (read from /proc/self/maps), and `system` keeps the C library's."""
    if not INSTALLED:
        pytest.skip(NONE_INSTALLED)
    default = alignment_env(None)
    assert reported_allocator(default)[0] == (INSTALLED_AUTO[0] if INSTALLED_AUTO else "system")
    assert "4-bit cpu kernel: bitsandbytes built-in" in default.stdout and "Failed to load" not in default.stderr
    assert reported_allocator(alignment_env("system")) == ("system", None)
    last = INSTALLED[-1]  # a named one, and the same one given by path
    name, file = reported_allocator(alignment_env(last))
    assert name == last and Path(file).is_file()
    assert reported_allocator(alignment_env(file)) == (last, file)


@linux_only
def test_the_restarted_command_keeps_the_interpreters_own_options():
    """`python -X importtime -m alignment ...`: the process that runs the command (after the restart, so it
    imports alignment.cli) was started with -X importtime too."""
    if not INSTALLED_AUTO:
        pytest.skip(NONE_INSTALLED)
    result = alignment_env(None, ("-X", "importtime"))
    assert reported_allocator(result)[0] == INSTALLED_AUTO[0]
    assert any(line.endswith("| alignment.cli") for line in result.stderr.splitlines())


def test_interpreter_options_are_what_came_before_the_script_or_module():
    assert interpreter_options(["python", "-X", "importtime", "-m", "alignment", "run", "-X"]) == ["-X", "importtime"]
    assert interpreter_options(["python", "-Ximporttime", "-OO", "-W", "error", "-malignment"]) == [
        "-Ximporttime",
        "-OO",
        "-W",
        "error",
    ]
    assert interpreter_options(["python", "-m", "alignment", "env"]) == []
    assert interpreter_options(["/usr/bin/python3", "/bin/alignment", "-u"]) == []  # the console script
    assert interpreter_options(["python", "-u", "wrapper.py", "-O"]) == ["-u"]  # a script that calls main()


@linux_only
def test_an_allocator_that_is_not_installed_stops_the_command_with_the_fix():
    missing = [name for name in CACHING_ALLOCATORS if name not in INSTALLED]
    result = alignment_env(missing[0] if missing else "/no/such/libtcmalloc.so")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {ALLOCATOR_VARIABLE}=")
    assert "not installed" in result.stderr or "no such file" in result.stderr


def test_this_process_reports_its_own_allocator():
    """pytest was not started by the command: its malloc is whatever it was started with."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    expected = next((name for name in CACHING_ALLOCATORS if f"lib{name}" in preloaded), "system")
    assert active_allocator() == expected


def test_cpu_training_on_the_system_malloc_warns_unless_asked_for(monkeypatch):
    """The PPO trainer logs this on a CPU: silent under a caching allocator or with ALIGNMENT_ALLOCATOR=system."""
    monkeypatch.delenv(ALLOCATOR_VARIABLE, raising=False)
    advice = missing_allocator_advice()
    if active_allocator() != "system":
        assert advice is None
    else:
        assert "apt install libtcmalloc-minimal4" in advice and f"{ALLOCATOR_VARIABLE}=system" in advice
    monkeypatch.setenv(ALLOCATOR_VARIABLE, "system")
    assert missing_allocator_advice() is None


def test_no_allocator_advice_where_the_command_cannot_preload_one(monkeypatch):
    """macOS and Windows have no LD_PRELOAD: the command keeps their malloc and the trainer says nothing."""
    monkeypatch.delenv(ALLOCATOR_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert missing_allocator_advice() is None
    assert allocator_library("tcmalloc") is None
