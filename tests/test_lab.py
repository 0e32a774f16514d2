"""`make lab` starts JupyterLab on 127.0.0.1 with a random token that is asked for, and never on a command line.

The test runs the Makefile's own recipe (``make -o setup lab``: the set-up step is taken
as done, since the test runs inside the environment it makes) on a free loopback port,
talks to it over 127.0.0.1 only, and stops it, all within a bounded time.
"""

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
JUPYTER = Path(sys.executable).parent / "jupyter-lab"
START_SECONDS = 90  # JupyterLab starts in a few seconds; a busy 2-core machine may need more


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def listening_sockets() -> set[tuple[str, int]]:
    """(local address as the kernel writes it, port) of every listening TCP socket (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A":  # 0A: LISTEN
                found.add((address, int(hex_port, 16)))
    return found


def listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets listening on ``port``."""
    return {address for address, p in listening_sockets() if p == port}


def group_command_lines(pgid: int) -> list[str]:
    lines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getpgid(int(proc.name)) == pgid:
                    lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, ProcessLookupError):
                continue
    return lines


@contextlib.contextmanager
def running_lab(tmp: Path, lab_dir: Path):
    """`make lab` serving ``lab_dir``, with Jupyter's own folders under ``tmp``; stopped afterwards.

    Yields ``(port, token, process, output so far)``. Skips where JupyterLab or make is missing.
    """
    if not JUPYTER.exists():
        pytest.skip(f"JupyterLab is not installed in this environment ({JUPYTER} is missing); `make setup` installs it")
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"}
    env.update(JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"))
    process = subprocess.Popen(["make", "--no-print-directory", "-o", "setup", "lab", f"LAB_PORT={port}",
                                f"LAB_DIR={lab_dir}", "LAB_ARGS=--no-browser"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    output = []
    try:
        deadline = time.monotonic() + START_SECONDS
        token = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            output.append(line)
            match = re.search(r"http://127\.0\.0\.1:(\d+)/lab\?token=([0-9a-f]+)", line)
            if match:
                assert int(match.group(1)) == port
                token = match.group(2)
            if token and "is running at" in line:
                break
        if token is None or process.poll() is not None:
            pytest.fail(f"make lab did not start JupyterLab within {START_SECONDS} s:\n" + "".join(output))
        while time.monotonic() < deadline and not listening_addresses(port):
            time.sleep(0.2)
        yield port, token, process, "".join(output)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture
def lab(tmp_path):
    notebooks = tmp_path / "notebooks"  # the reader's copy goes here; nothing of it is opened or run
    notebooks.mkdir()
    with running_lab(tmp_path, notebooks) as started:
        yield started


def test_make_lab_serves_loopback_only_and_asks_for_its_token(lab):
    port, token, process, output = lab
    base = f"http://127.0.0.1:{port}"
    assert status(f"{base}/lab?token={token}") == 200
    assert status(f"{base}/api/contents") == 403  # the API without the token
    assert status(f"{base}/api/contents?token={'0' * len(token)}") == 403  # or with a wrong one
    assert status(f"{base}/api/contents?token={token}") == 200
    # Bound to 127.0.0.1 alone ("0100007F" in the kernel's table), not to every interface.
    assert listening_addresses(port) == {"0100007F"}
    # The token is on no command line of the server's processes (make, the shell, JupyterLab).
    lines = group_command_lines(os.getpgid(process.pid))
    assert any("jupyter" in line and "lab" in line for line in lines), lines
    assert not [line for line in lines if token in line]
    root = os.geteuid() == 0
    assert ("running as root, so JupyterLab is started with --allow-root" in output) == root
