"""Helpers shared by the benchmarks: run a command and sample the peak RSS of its process tree."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def run_measured(argv: list[str], env: dict[str, str] | None = None, interval: float = 0.05
                 ) -> tuple[float, int, int, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS of the whole tree in bytes, peak RSS of one process, result)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_tree = peak_one = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree, peak_one
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                peak_tree = max(peak_tree, sum(rss))
                peak_one = max(peak_one, max(rss, default=0))
            except psutil.Error:
                pass
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    return wall, peak_tree, peak_one, subprocess.CompletedProcess(argv, proc.returncode, out, err)
