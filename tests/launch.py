"""Starting the ranks of a real gloo job for the tests (not a test module itself).

`launch` starts each rank as its own `python -m ...` process with the variables torchrun would set (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the process group is the real one, and a
launch costs about 3 s less than through torchrun, whose own process imports torch first. A rank that fails
stops the others, as torchrun does. `torchrun=True` goes through torch.distributed.run itself (a few tests keep
the real launcher in the loop).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launched:
    """The job's exit code (the first failing rank's, else 0) and its ranks' outputs, rank 0 first."""
    returncode: int
    stdout: str
    stderr: str


def launch(args: list[str], nproc: int, timeout: float = 240, torchrun: bool = False,
           env: dict | None = None) -> Launched:
    """Run `python -m ARGS` as `nproc` ranks of one job (one plain process when nproc is 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1 or torchrun:
        cmd = [sys.executable, "-m", *args] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), "-m", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return Launched(out.returncode, out.stdout, out.stderr)
    port, procs, files = free_port(), [], []
    for rank in range(nproc):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        # files, not pipes: a rank blocked on a full pipe would stall the collectives of the others
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, "-m", *args], env=rank_env, stdout=out, stderr=err, text=True))
    deadline, failed = time.time() + timeout, None
    try:
        while any(p.poll() is None for p in procs):
            failed = next((p.returncode for p in procs if p.returncode not in (None, 0)), None)
            if failed is not None or time.time() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if time.time() > deadline and failed is None:
        raise subprocess.TimeoutExpired(args, timeout)
    texts = []
    for out, err in files:
        out.seek(0)
        err.seek(0)
        texts.append((out.read(), err.read()))
        out.close()
        err.close()
    code = failed if failed is not None else next((p.returncode for p in procs if p.returncode), 0)
    return Launched(code, "".join(o for o, _ in texts), "".join(e for _, e in texts))
