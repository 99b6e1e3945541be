"""`csi-virtvol copy` as a copy pod runs it: a real subprocess, killed and restarted."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from csi_virtvol.copy import cli

MiB = 1 << 20
CLI = [sys.executable, "-m", "csi_virtvol.copy.cli"]


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("4096", 4096), ("4k", 4096), ("4K", 4096), ("100M", 100 * MiB),
    ("1GiB", 1 << 30), ("2G", 2 << 30), ("3MB", 3 * MiB),
])
def test_parse_size(text: str, value: int) -> None:
    assert cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1", "1.5G", "12X"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        cli.parse_size(text)


@pytest.mark.parametrize("spec,with_length,expected", [
    ("/a/b", True, ("/a/b", 0, None)),
    ("/a/b:4096", True, ("/a/b", 4096, None)),
    ("/a/b:1M:2M", True, ("/a/b", MiB, 2 * MiB)),
    ("/a/b::2M", True, ("/a/b", 0, 2 * MiB)),
    ("/a/b:1M:2M", False, ("/a/b:1M", 2 * MiB, None)),
    ("/dev/disk/by-path/pci-0000:00:1f.2-ata-1", True,
     ("/dev/disk/by-path/pci-0000:00:1f.2-ata-1", 0, None)),
    ("/dev/disk/by-path/pci-0000:00:1f.2-ata-1:512", True,
     ("/dev/disk/by-path/pci-0000:00:1f.2-ata-1", 512, None)),
])
def test_parse_endpoint(spec: str, with_length: bool,
                        expected: tuple[str, int, int | None]) -> None:
    e = cli.parse_endpoint(spec, with_length=with_length)
    assert (e.path, e.offset, e.length) == expected


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def test_json_lines_and_progress_file(tmp_path: Path) -> None:
    src, dst, pf = tmp_path / "src", tmp_path / "dst", tmp_path / "progress.json"
    src.write_bytes(os.urandom(10 * MiB))
    p = run_cli("--src", f"{src}:4096:8M", "--dst", f"{dst}:1M", "--progress",
                "--progress-file", str(pf), "--checkpoint-bytes", "2M", "--verify")
    assert p.returncode == 0, p.stderr
    events = lines(p.stdout)
    progress = [e["bytes_done"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 8 * MiB and len(progress) >= 3
    assert events[-1]["event"] == "done" and events[-1]["verified"] is True
    assert dst.read_bytes()[MiB:] == src.read_bytes()[4096:4096 + 8 * MiB]
    assert not pf.exists(), "a finished copy leaves no checkpoint behind"


def test_tty_progress_bar() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    rep = cli._Reporter(out=out, enabled=True, total=8 * MiB, start=0, progress_file=None,
                        ident={})
    rep.checkpoint(4 * MiB)
    rep.finish({"event": "done"})
    assert "\r[###############               ]  50.0% 4/8 MiB" in out.getvalue()
    assert out.getvalue().endswith("\nevent=done\n")


def test_bad_usage_and_failures(tmp_path: Path) -> None:
    assert run_cli("--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "d")).returncode == 1
    assert run_cli("--src", "x", "--dst", "y", "--bwlimit", "fast").returncode == 2
    src = tmp_path / "src"
    src.write_bytes(b"x" * 8192)
    p = run_cli("--src", str(src), "--dst", str(tmp_path / "d"), "--resume-from", "auto")
    assert p.returncode == 2 and "--progress-file" in p.stderr


def wait_for_checkpoint(pf: Path, proc: subprocess.Popen[str], total: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the copy ended before it could be killed"
        if pf.exists():
            done = int(json.loads(pf.read_text())["bytes_done"])
            if 0 < done < total:
                return done
        time.sleep(0.05)
    raise AssertionError("no checkpoint within 60 s")


@pytest.mark.parametrize("resume", ["number", "auto"])
def test_sigkill_mid_copy_then_resume(tmp_path: Path, resume: str) -> None:
    src, dst, pf = tmp_path / "src", tmp_path / "dst", tmp_path / "progress.json"
    total = 48 * MiB
    src.write_bytes(os.urandom(total))
    args = ["--src", str(src), "--dst", str(dst), "--progress-file", str(pf),
            "--bwlimit", "16M", "--checkpoint-bytes", "4M"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_checkpoint(pf, proc, total)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = int(json.loads(pf.read_text())["bytes_done"])
    assert 0 < done < total
    # what the checkpoint promises is on disk
    assert dst.read_bytes()[:done] == src.read_bytes()[:done]
    rest = ["--resume-from", str(done) if resume == "number" else "auto"]
    p = run_cli(*[a for a in args if a not in ("--bwlimit", "16M")], *rest, "--verify")
    assert p.returncode == 0, p.stderr
    final = lines(p.stdout)[-1]
    assert final["resumed_from"] == done and final["bytes_written"] == total - done
    assert dst.read_bytes() == src.read_bytes()


def test_resume_auto_refuses_a_foreign_progress_file(tmp_path: Path) -> None:
    src, dst, pf = tmp_path / "src", tmp_path / "dst", tmp_path / "progress.json"
    src.write_bytes(os.urandom(MiB))
    cli.write_progress_file(str(pf), {"src": "/elsewhere", "src_offset": 0, "dst": str(dst),
                                      "dst_offset": 0, "length": MiB, "bytes_done": 4096})
    p = run_cli("--src", str(src), "--dst", str(dst), "--progress-file", str(pf),
                "--resume-from", "auto")
    assert p.returncode == 1 and "another copy" in p.stderr
    assert not dst.exists()


def test_resume_auto_takes_its_own_attempts_checkpoint_from_another_path_to_the_image(tmp_path: Path) -> None:
    """The checkpoint identity names the image: a copy stopped while reading a source's LUN and
    started again reading a cut's view of it (another path, another offset) resumes where it
    stopped; a checkpoint of another target is still refused."""
    lun, view, dst, pf = tmp_path / "lun", tmp_path / "view", tmp_path / "dst", tmp_path / "progress.json"
    image = os.urandom(4 * MiB)
    lun.write_bytes(bytes(MiB) + image)
    view.write_bytes(image)
    dst.write_bytes(image[:MiB] + bytes(3 * MiB))   # what the first run copied
    cli.write_progress_file(str(pf), {"src": str(lun), "src_offset": MiB, "dst": str(dst), "dst_offset": 0,
                                      "length": 4 * MiB, "bytes_done": MiB, "checkpoint_id": "pair/t@1.0"})
    p = run_cli("--src", f"{view}:0:{4 * MiB}", "--dst", str(dst), "--progress-file", str(pf),
                "--resume-from", "auto", "--checkpoint-id", "pair/t@1.0", "--verify")
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout)[-1]["resumed_from"] == MiB
    assert dst.read_bytes() == image
    cli.write_progress_file(str(pf), {"src": str(lun), "src_offset": MiB, "dst": "/elsewhere", "dst_offset": 0,
                                      "length": 4 * MiB, "bytes_done": MiB, "checkpoint_id": "pair/t@1.0"})
    p = run_cli("--src", f"{view}:0:{4 * MiB}", "--dst", str(dst), "--progress-file", str(pf),
                "--resume-from", "auto", "--checkpoint-id", "pair/t@1.0")
    assert p.returncode == 1 and "another copy" in p.stderr


def test_resume_auto_never_resumes_another_attempts_checkpoint(tmp_path: Path) -> None:
    """Issue 12: a retried copy Job (same name, same progress file) into a freshly made target
    must not resume from the discarded attempt's checkpoint, which said the range was done."""
    src, dst, pf = tmp_path / "src", tmp_path / "dst", tmp_path / "progress.json"
    src.write_bytes(os.urandom(4 * MiB))
    dst.write_bytes(bytes(4 * MiB))  # the new attempt's target: fresh, all zeros
    where = {"src": str(src), "src_offset": 0, "dst": str(dst), "dst_offset": 0, "length": 4 * MiB}
    cli.write_progress_file(str(pf), {**where, "checkpoint_id": "vs-1/fast:vs-1-1@1.0", "bytes_done": 4 * MiB})
    p = run_cli("--src", str(src), "--dst", str(dst), "--progress-file", str(pf), "--resume-from", "auto",
                "--checkpoint-id", "vs-1/fast:vs-1-1@2.0", "--progress")
    assert p.returncode == 0, p.stderr
    final = lines(p.stdout)[-1]
    assert final["resumed_from"] == 0 and final["bytes_written"] == 4 * MiB
    assert final["checkpoint_id"] == "vs-1/fast:vs-1-1@2.0"
    assert dst.read_bytes() == src.read_bytes()
    assert not pf.exists()


def test_a_mismatch_drops_the_checkpoint_and_reports_it(tmp_path: Path) -> None:
    """A checkpoint that claims more than the target holds is caught by --verify, and dropped."""
    src, dst, pf = tmp_path / "src", tmp_path / "dst", tmp_path / "progress.json"
    src.write_bytes(os.urandom(4 * MiB))
    dst.write_bytes(bytes(4 * MiB))
    where = {"src": str(src), "src_offset": 0, "dst": str(dst), "dst_offset": 0, "length": 4 * MiB}
    cli.write_progress_file(str(pf), {**where, "checkpoint_id": "x", "bytes_done": 2 * MiB})
    result = tmp_path / "termination-log"
    p = run_cli("--src", str(src), "--dst", str(dst), "--progress-file", str(pf), "--resume-from", "auto",
                "--checkpoint-id", "x", "--verify", "--result-file", str(result))
    assert p.returncode == cli.EXIT_MISMATCH, p.stderr
    ev = json.loads(result.read_text())
    assert ev["event"] == "error" and ev["mismatch"] is True and ev["offset"] == 0
    assert not pf.exists(), "a checkpoint the target does not back is never resumed from"


def test_sigterm_stops_at_a_checkpoint(tmp_path: Path) -> None:
    src, dst, pf = tmp_path / "src", tmp_path / "dst", tmp_path / "progress.json"
    total = 48 * MiB
    src.write_bytes(os.urandom(total))
    proc = subprocess.Popen([*CLI, "--src", str(src), "--dst", str(dst), "--progress-file",
                             str(pf), "--bwlimit", "16M", "--checkpoint-bytes", "4M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(pf, proc, total)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = lines(out)[-1]
    assert last["event"] == "cancelled"
    assert json.loads(pf.read_text())["bytes_done"] == last["bytes_done"] < total
