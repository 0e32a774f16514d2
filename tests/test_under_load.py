"""scripts/under_load.py: the command runs while the busy processes run, and they stop after it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "under_load.py"

# The command reports whether every worker is alive and busy (it has used CPU time) while it runs.
PROBE = """
import os, time
pids = [int(p) for p in os.environ["LLMBOOK_LOAD_PIDS"].split()]
time.sleep(1.0)
busy = []
for pid in pids:
    os.kill(pid, 0)                                   # alive, or this raises
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    busy.append(int(fields[11]) + int(fields[12]) > 0)  # utime + stime, in clock ticks
print("PIDS", *pids)
print("BUSY", all(busy))
raise SystemExit(3)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_are_busy_during_the_command_and_gone_after_it():
    run = subprocess.run([sys.executable, str(SCRIPT), "--workers", "2", "--", sys.executable, "-c", PROBE],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr                       # the command's status
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("PIDS", "BUSY")))
    pids = [int(p) for p in lines["PIDS"].split()]
    assert len(pids) == 2 and lines["BUSY"] == "True"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "exit status 3 after" in run.stdout


@pytest.mark.parametrize("args, message", [
    ([], "command: give the command to run after --"),
    (["--workers", "0", "--", "true"], "--workers must be >= 1"),
    (["--max-seconds", "0", "--", "true"], "--max-seconds must be > 0"),
])
def test_bad_arguments_are_named(args, message):
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_stop_when_the_script_is_stopped(tmp_path):
    import signal
    import time

    pids_file = tmp_path / "pids"
    command = [sys.executable, "-c",
               f"import os, time; open({str(pids_file)!r}, 'w')"
               ".write(os.environ['LLMBOOK_LOAD_PIDS'] + ' ' + str(os.getpid())); time.sleep(60)"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--workers", "2", "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (pids_file.exists() and pids_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p) for p in pids_file.read_text().split()]  # the two workers and the command
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_while_waiting_unless_the_caller_chose(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    probe = "import os; print('POLICY', os.environ['OMP_WAIT_POLICY'])"
    run = subprocess.run([sys.executable, str(SCRIPT), "--workers", "1", "--", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0 and f"POLICY {expected}" in run.stdout.splitlines()
