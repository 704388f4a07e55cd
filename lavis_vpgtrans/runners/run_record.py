"""One run per output directory, and the id that ties a run's metrics.jsonl lines together.

A run holds an flock on <job dir>/run.lock for as long as its process lives (the kernel drops
it when the process dies, kill -9 included), so a second run into the same directory is
refused with the first one's pid, host, start time and command line. A fresh (not resuming)
training run is also refused where an earlier run left metrics or checkpoints: appending to
them would mix two runs in one record.
"""

import fcntl
import glob
import json
import os
import socket
import sys
import time
import uuid
from typing import Dict, List

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"

_held: Dict[str, int] = {}  # job dir -> fd of its lock, held by this process


class RunDirError(RuntimeError):
    """The output directory belongs to another run."""


def new_run_id(job_id: str) -> str:
    return f"{job_id}-{uuid.uuid4().hex[:8]}"


def claim_run_dir(job_dir: str) -> None:
    """Takes the directory's lock, or raises RunDirError naming the run that holds it.
    Re-entrant within one process (tests and notebooks build several runners)."""
    job_dir = os.path.abspath(job_dir)
    if job_dir in _held:
        return
    os.makedirs(job_dir, exist_ok=True)
    path = os.path.join(job_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"{job_dir} is in use by another run ({_describe_holder(path)}); "
                          f"set another run.output_dir or run.job_id") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    os.fsync(fd)
    _held[job_dir] = fd


def _describe_holder(path: str) -> str:
    try:
        with open(path) as f:
            h = json.load(f)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {' '.join(h['argv'])}"
    except (OSError, ValueError, KeyError):
        return f"its lock {path} is held"


def check_fresh_run_dir(job_dir: str) -> None:
    """A training run that does not resume must start in a directory without an earlier run's
    metrics or checkpoints."""
    leftovers = sorted(os.path.basename(p) for p in glob.glob(os.path.join(job_dir, "checkpoint_*.pth")))
    if os.path.isfile(os.path.join(job_dir, METRICS_FILE)):
        ids = run_ids_in(os.path.join(job_dir, METRICS_FILE))
        leftovers.insert(0, f"{METRICS_FILE} of run {', '.join(ids) or '(no run id)'}")
    if leftovers:
        raise RunDirError(f"{job_dir} already holds an earlier run ({', '.join(leftovers)}): resume it with "
                          f"run.resume_ckpt_path, remove the directory to start over, or set another "
                          f"run.output_dir or run.job_id")


def run_ids_in(metrics_file: str) -> List[str]:
    """The distinct run ids of a metrics.jsonl, in order of first appearance ('' for lines
    written before run ids were recorded); unreadable lines are skipped here."""
    ids: List[str] = []
    if not os.path.isfile(metrics_file):
        return ids
    with open(metrics_file) as f:
        for line in f:
            try:
                run_id = json.loads(line).get("run_id", "") or ""
            except (ValueError, AttributeError):
                continue
            if run_id not in ids:
                ids.append(run_id)
    return ids
