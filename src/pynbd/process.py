"""Child processes: stopping one politely, then firmly.

    from pynbd.process import stop_process
    stop_process(proc)          # SIGTERM; SIGKILL if still alive after 10 s; reaped

Used for captive servers, ``pynbd.serve(subprocess=True)``, the test suite's
servers and the benchmarks' servers, so all of them stop the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate ``proc`` unless it already exited; kill it after ``timeout`` seconds; reap it."""
    if proc.poll() is not None:
        return
    import subprocess  # here: whoever made ``proc`` loaded it; client tools import this module
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
