"""bench/scale.py's memory sampler: it finds Ray workers by their `ray::` command line and stops
cleanly. (The two simulations themselves are the benchmark, not a test.)"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import scale

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc: Linux only")


def test_peak_worker_memory_sees_a_ray_named_process_and_stops():
    # `exec -a` names the process as Ray names its workers ("ray::ClientAppActor...").
    fake = subprocess.Popen(["bash", "-c", "exec -a 'ray::FakeWorker' sleep 30"])
    try:
        status = Path(f"/proc/{fake.pid}/status")
        deadline = time.monotonic() + 5
        while not Path(f"/proc/{fake.pid}/cmdline").read_bytes().startswith(b"ray::"):
            assert time.monotonic() < deadline, "the fake worker did not start"
            time.sleep(0.05)
        rss = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                   if line.startswith("VmRSS:"))
        assert rss in scale.ray_worker_rss()

        memory = scale.PeakWorkerMemory()
        memory.start()
        time.sleep(1.5)  # it samples once a second
        memory.stop()
        assert not memory.is_alive()
        assert memory.workers >= 1
        assert memory.peak >= rss
    finally:
        fake.kill()
        fake.wait()
