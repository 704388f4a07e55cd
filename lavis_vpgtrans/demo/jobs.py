"""Runs the demo's jobs as subprocesses, a few at a time, with a progress bar counted in
epochs (read from what the runs write: metrics.jsonl, or checkpoints for runs that do not
validate)."""

import json
import os
import re
import subprocess
import time
from typing import Callable, Dict, List, Optional

from lavis_vpgtrans.demo.plan import REPO_ROOT, Job
from lavis_vpgtrans.runners.run_record import METRICS_FILE

POLL_S = 0.5
REDRAW_S = 10
CHECKPOINT = re.compile(r"^checkpoint_(\d+)\.pth$")


class JobFailed(RuntimeError):
    """A job exited with an error; the message names it, its command and its log's tail."""


def epochs_done(job: Job) -> int:
    """Epochs a train job has finished (validated, when it validates)."""
    if job.run is None:
        return 0
    if job.validates:
        path = os.path.join(job.job_dir, METRICS_FILE)
        if not os.path.isfile(path):
            return 0
        with open(path) as f:
            epochs = {json.loads(line)["epoch"] for line in f if line.strip().endswith("}")}
        return len(epochs)
    if not os.path.isdir(job.job_dir):
        return 0
    return sum(1 for name in os.listdir(job.job_dir) if CHECKPOINT.match(name))


def log_tail(path: str, lines: int = 25) -> str:
    if not os.path.isfile(path):
        return "(no log)"
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def run_jobs(jobs: List[Job], env: Dict[str, str], max_parallel: int, bar=None,
             on_done: Optional[Callable[[Job, float], None]] = None) -> Dict[str, float]:
    """Runs `jobs` (dependencies first, at most `max_parallel` at once); returns each job's
    wall time. Every dependency must be one of `jobs`. On the first failure the other running
    jobs are stopped and JobFailed is raised."""
    keys = {job.key for job in jobs}
    unknown = sorted({f"{job.key} -> {dep}" for job in jobs for dep in job.deps if dep not in keys})
    if unknown:
        raise ValueError(f"jobs depend on jobs that are not in the list: {', '.join(unknown)}")
    pending = list(jobs)
    running: Dict[str, tuple] = {}  # key -> (job, process, log file, start time)
    finished: Dict[str, float] = {}
    progress = {job.key: 0 for job in jobs}
    shown, shown_at = None, 0.0
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= max_parallel:
                    break
                if all(dep in finished for dep in job.deps):
                    pending.remove(job)
                    os.makedirs(job.out_dir, exist_ok=True)
                    log = open(job.log, "w")
                    log.write("$ " + " ".join(job.argv) + "\n")
                    log.flush()
                    process = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               cwd=REPO_ROOT)
                    running[job.key] = (job, process, log, time.time())
            if not running and pending:
                missing = {dep for job in pending for dep in job.deps if dep not in finished}
                raise JobFailed(f"jobs {[j.key for j in pending]} wait for {sorted(missing)}, which never ran")
            time.sleep(POLL_S)
            for key, (job, process, log, start) in list(running.items()):
                code = process.poll()
                progress[key] = job.epochs if code == 0 else min(epochs_done(job), job.epochs)
                if code is None:
                    continue
                log.close()
                del running[key]
                if code != 0:
                    raise JobFailed(f"{job.key} ({job.label}) failed with exit code {code}.\n"
                                    f"command: {' '.join(job.argv)}\nlog: {job.log}, its end:\n{log_tail(job.log)}")
                if job.product and not os.path.isfile(job.product):
                    raise JobFailed(f"{job.key} ({job.label}) finished but did not write {job.product}; "
                                    f"log: {job.log}")
                finished[key] = time.time() - start
                if on_done is not None:
                    on_done(job, finished[key])
            if bar is not None:
                state = (sum(progress.values()), ", ".join(f"{running[k][0].label} {progress[k]}/{running[k][0].epochs}"
                                                           for k in running))
                # redraw on progress, else every few seconds: a log file is not flooded
                if state != shown or time.time() - shown_at > REDRAW_S:
                    bar.n = state[0]
                    bar.set_postfix_str(state[1], refresh=False)
                    bar.refresh()
                    shown, shown_at = state, time.time()
    finally:
        for job, process, log, _ in running.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            log.close()
    return finished
