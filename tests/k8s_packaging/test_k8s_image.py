"""The Dockerfile installs every program the driver runs.

The programs are found in the code itself: the first string of each list or
tuple literal in a module that runs subprocesses (an argv), kept when it names
a program installed on this machine (./dev setup installs them all).  Each
program's Debian package is asked of dpkg, and that package must be on the
Dockerfile's apt-get line.  The image is Debian 12 like this machine, so the
apt line is also resolved here (apt-get --simulate): a misspelt package fails.

There is no Docker engine here, so the image's own smoke check (the RUN that starts
`csi-virtvol serve` and probes it) is run as the shell runs it in the build, against the
wheel built from a fresh clone and installed in a fresh venv (wheelbuild.py); and what the
Dockerfile COPYs must get past .dockerignore.
"""
from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from k8s_helpers import ROOT
from wheelbuild import clean_env

PACKAGE = ROOT / "csi_virtvol"
DOCKERFILE = ROOT / "Dockerfile"

# What the array kinds and transports need: each must be an argv[0] in the code
# (so this list cannot drift from it) and come from the image's packages.
CODE_TOOLS = ["nbd-client", "nbdfuse", "nbdinfo", "iscsiadm", "sg_inq", "sg_xcopy", "lvcreate", "lvextend",
              "lvremove", "dmsetup", "qemu-storage-daemon", "qemu-img", "modprobe", "losetup", "fusermount3",
              "mount", "blkdiscard", "udevadm"]
# Not called by name from the code but needed in the image: nbdcopy (libnbd-bin, used by
# host copies of NBD LUNs through nbdfuse), the mkfs programs (run as mkfs.<fstype>),
# thin_check (run by lvm itself on thin pools); era_invalidate (thin-provisioning-tools: the dm
# live cut's change tracking, node/dmcut.py, runs it through node/commands).
IMAGE_TOOLS = ["nbdcopy", "mkfs.ext4", "mkfs.xfs", "thin_check", "era_invalidate"]


def argv0s() -> set[str]:
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if "_gen" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                   for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if "subprocess" not in imports:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
                first = node.elts[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.add(first.value)
    return found


def apt_packages() -> list[str]:
    text = DOCKERFILE.read_text()
    m = re.search(r"apt-get install((?:\\\n|[^\n&])*)", text)
    assert m, "the Dockerfile has no apt-get install line"
    return [w for w in m.group(1).replace("\\\n", " ").split() if not w.startswith("-")]


@cache
def package_of(tool: str) -> set[str]:
    """The Debian packages holding `tool` on this machine (merged /usr: search both bins)."""
    path = shutil.which(tool)
    assert path, f"{tool} is not installed here: run ./dev setup"
    p = subprocess.run(["dpkg", "-S", f"*bin/{tool}"], capture_output=True, text=True, check=False)
    owners = {line.split(":")[0].strip() for line in p.stdout.splitlines()
              if re.search(rf"/s?bin/{re.escape(tool)}$", line)}
    assert owners, f"dpkg knows no package for {tool}: {p.stderr.strip()}"
    return {o for owner in owners for o in owner.split(", ")}


@cache
def simulate_install() -> subprocess.CompletedProcess[str]:
    """apt-get --simulate of the Dockerfile's apt line (no root, no download)."""
    return subprocess.run(["apt-get", "install", "-s", "--no-install-recommends", "-o", "Debug::NoLocking=1",
                           *apt_packages()], capture_output=True, text=True, check=False, timeout=300)


@cache
def image_packages() -> frozenset[str]:
    """The packages the apt line installs (virtual names like nbdfuse resolved to the real
    one, dependencies included) plus Debian's Essential ones, which every image has."""
    p = simulate_install()
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    names = set(apt_packages())
    names |= set(re.findall(r"^(\S+) is already the newest version", p.stdout, re.M))
    names |= set(re.findall(r"^Inst (\S+)", p.stdout, re.M))
    q = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Essential}\n"], capture_output=True, text=True,
                       check=True)
    names |= {line.split()[0] for line in q.stdout.splitlines() if line.endswith(" yes")}
    return frozenset(names)


def test_the_apt_line_is_parsed() -> None:
    pkgs = apt_packages()
    assert "open-iscsi" in pkgs and "kmod" in pkgs and "ca-certificates" in pkgs
    assert not [p for p in pkgs if "\\" in p or p.startswith("&")]


def test_the_apt_line_resolves_on_debian_12() -> None:
    assert re.search(r"^FROM python:3\.11-slim-bookworm\b", DOCKERFILE.read_text(), re.M)
    assert Path("/etc/debian_version").read_text().startswith("12."), "checked against Debian 12's archive"
    p = simulate_install()
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr


def test_every_named_tool_is_run_by_the_code() -> None:
    missing = [t for t in CODE_TOOLS if t not in argv0s()]
    assert missing == [], f"not an argv[0] in csi_virtvol/ any more: {missing} (update CODE_TOOLS)"


@pytest.mark.parametrize("tool", CODE_TOOLS + IMAGE_TOOLS)
def test_the_image_provides(tool: str) -> None:
    owners = package_of(tool)
    assert owners & image_packages(), f"{tool} comes from {sorted(owners)}, none of which the Dockerfile installs"


def test_every_program_the_code_runs_is_in_the_image() -> None:
    programs = sorted(a for a in argv0s() if re.fullmatch(r"[a-z][a-z0-9_.+-]*", a) and shutil.which(a))
    # sanity: the scan sees the argvs (and not only a handful of words)
    assert {"iscsiadm", "nbd-client", "lvcreate", "qemu-storage-daemon"} <= set(programs)
    image = image_packages()
    missing = {p: sorted(package_of(p)) for p in programs if not package_of(p) & image}
    assert missing == {}, f"programs the code runs that the image lacks (tool: its packages): {missing}"


def test_the_image_has_no_built_in_initiator_name() -> None:
    # every node would announce the same InitiatorName; the host's /etc/iscsi is mounted instead
    assert re.search(r"rm -f /etc/iscsi/initiatorname\.iscsi", DOCKERFILE.read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, as the builder reads them: comment lines
    dropped (also inside a continued instruction), a backslash-newline joins lines."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def smoke_check() -> str:
    """The shell-form RUN that starts the server, after the one that installs the package."""
    runs = [args for ins, args in instructions() if ins == "RUN"]
    install = [i for i, r in enumerate(runs) if re.search(r"\bpip install\b", r)]
    smoke = [i for i, r in enumerate(runs) if "csi-virtvol serve" in r]
    assert len(install) == 1 and len(smoke) == 1, f"expected one pip install RUN and one smoke check RUN: {runs}"
    assert smoke[0] > install[0], "the smoke check runs before the package is installed"
    script = runs[smoke[0]]
    assert not script.startswith("["), "the smoke check must be shell form (RUN <script>)"
    return script


def test_the_smoke_check_serves_and_probes() -> None:
    script = smoke_check()
    assert re.search(r"csi-virtvol serve --endpoint \S*unix://", script), script
    assert "csi-virtvol identity probe" in script, script
    assert re.search(r"kill -TERM .*; wait ", script), "the server is stopped and its exit status checked"


@pytest.mark.slow
def test_the_image_smoke_check_passes_on_the_installed_wheel(wheel_venv: Path, tmp_path: Path) -> None:
    """The smoke check's own shell line, with the fresh wheel venv first on PATH, as
    /bin/sh -c runs it in the build (the image is Debian 12's dash, like this machine)."""
    env = clean_env(PATH=f"{wheel_venv / 'bin'}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    assert shutil.which("csi-virtvol", path=env["PATH"]) == str(wheel_venv / "bin" / "csi-virtvol")
    p = subprocess.run(["/bin/sh", "-c", smoke_check()], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, f"the Dockerfile's smoke check failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-6000:]}"
    assert re.search(r'"ready": true', p.stdout), p.stdout
    assert "csi-virtvol serving" in p.stderr and "stopping" in p.stderr, p.stderr[-4000:]
    assert [f for f in tmp_path.iterdir()] == [], "the smoke check leaves its scratch directory behind"


def copy_sources() -> list[str]:
    """The build-context paths the Dockerfile COPYs (no --from stages)."""
    out = []
    for ins, args in instructions():
        if ins in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in args.split()), args
            out += [w.rstrip("/") for w in words[:-1]]
    return out


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore line as Docker reads it (Go filepath.Match per path segment, `**` for
    any number of directories), relative to the context root."""
    assert "[" not in pattern and "\\" not in pattern, f"character classes are not handled: {pattern}"
    segments = pattern.strip("/").split("/")
    out = ""
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out += ".*" if last else "(?:.*/)?"
            continue
        out += "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in seg)
        out += "" if last else "/"
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` or a directory above it; the last matching line wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for line in patterns:
        negate = line.startswith("!")
        rx = pattern_regex(line.removeprefix("!"))
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


def test_the_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert ignored("tests/x.py", patterns) and ignored("csi_virtvol/csi/_gen/csi_pb2.py", patterns)  # sanity
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", *copy_sources()], capture_output=True,
                             text=True, check=True).stdout.split()
    sources = set(copy_sources())
    assert {"pyproject.toml", "setup.py", "proto", "csi_virtvol"} <= sources, sources
    assert [s for s in sources if not any(f == s or f.startswith(s + "/") for f in tracked)] == [], \
        "COPY of paths git does not track"
    dropped = [f for f in tracked if ignored(f, patterns)]
    assert dropped == [], f".dockerignore drops files the image build copies: {dropped}"
