"""A remote copy of a run's checkpoints (`train.remote_dir`): each checkpoint is uploaded in the background
after it is saved, the remote copies are pruned like the local ones, and a run resumed where it has no
checkpoint (a new machine, a lost disk) downloads the newest remote one that verifies.

Any fsspec URL works (``s3://bucket/runs/x`` with s3fs, ``gs://`` with gcsfs, ...) and so does a plain path
(a network file system). A checkpoint's manifest is uploaded last, so a copy without one is an unfinished
upload: it is never downloaded, and pruning removes it. Each upload reads a snapshot of the checkpoint
(hard links, taken when it is queued), so pruning the local checkpoint meanwhile does not disturb it.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from cliptrain.checkpoint import store as ckpt

__all__ = ["RemoteCheckpoints"]


class RemoteCheckpoints:
    """Uploads, prunes and downloads the checkpoints of one run under `url` (``URL/step_N/...``)."""

    def __init__(self, url: str, keep_last: int = 1, keep_every: int = 0, log: Callable[[str], None] = print):
        try:
            import fsspec
        except ImportError:
            raise ImportError(f"train.remote_dir {url} needs fsspec (pip install fsspec, plus s3fs / gcsfs for "
                              f"s3:// / gs://)") from None
        self.url, self.keep_last, self.keep_every, self.log = url, keep_last, keep_every, log
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.failed: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ upload
    def upload(self, checkpoint: Path) -> None:
        """Queue `checkpoint` (a local checkpoint directory) for upload; training goes on meanwhile."""
        if self._thread is None:  # the first upload of this process: snapshots left by a killed one go
            for stale in Path(checkpoint).parent.glob(".step_*.uploading-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self._thread = threading.Thread(target=self._work, name="cliptrain-remote", daemon=True)
            self._thread.start()
        self._queue.put((Path(checkpoint).name, _snapshot(Path(checkpoint))))

    @property
    def pending(self) -> int:
        """Checkpoints queued or being uploaded."""
        return self._queue.unfinished_tasks

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued checkpoint is uploaded (or has failed, which is reported), at most
        `timeout_s` seconds; returns whether none is left."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.pending and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        return not self.pending

    def _work(self) -> None:
        while True:
            name, snapshot = self._queue.get()
            try:
                self._put(name, snapshot)
            except Exception as exc:  # noqa: BLE001 - the run goes on; the failure is reported
                self._report(f"uploading {name} to {self.url} failed ({type(exc).__name__}: {exc})")
            else:
                try:
                    self._prune()
                except Exception as exc:  # noqa: BLE001
                    self._report(f"pruning the copies under {self.url} failed ({type(exc).__name__}: {exc})")
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                self._queue.task_done()

    def _report(self, message: str) -> None:
        self.failed.append(message)
        self.log(f"warning: {message}")

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _put(self, name: str, snapshot: Path) -> None:
        if self.fs.exists(self._remote(name)):  # a copy being replaced: nothing of the old one may stay
            self.fs.rm(self._remote(name), recursive=True)
        files = sorted((f for f in snapshot.rglob("*") if f.is_file()), key=lambda f: f.name == ckpt.MANIFEST)
        for f in files:  # the manifest last: a copy without it is unfinished
            target = self._remote(name, f.relative_to(snapshot).as_posix())
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(f), target)

    def steps(self) -> tuple[list[int], list[int]]:
        """(steps of the complete remote copies, steps of unfinished ones), each in increasing order."""
        if not self.fs.exists(self.root):
            return [], []
        complete, unfinished = [], []
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if ckpt.is_checkpoint_name(name):
                done = self.fs.exists(self._remote(name, ckpt.MANIFEST))
                (complete if done else unfinished).append(ckpt.checkpoint_step(Path(name)))
        return sorted(complete), sorted(unfinished)

    def _prune(self) -> None:
        complete, unfinished = self.steps()
        newest = complete[-1] if complete else -1
        doomed = ckpt.steps_to_prune(complete, self.keep_last, self.keep_every)
        for step in doomed + [s for s in unfinished if s < newest]:  # an older unfinished upload is abandoned
            self.fs.rm(self._remote(ckpt.checkpoint_dir("", step).name), recursive=True)

    def refuse_new_run(self) -> None:
        """A new run (no resume) must not share the remote directory of another: its pruning would delete
        that run's copies, and a later resume could take one of them."""
        complete, unfinished = self.steps()
        if complete or unfinished:
            raise FileExistsError(f"train.remote_dir {self.url} already holds checkpoints of a run (steps "
                                  f"{', '.join(map(str, (complete + unfinished)[:5]))}...): continue that run with "
                                  f"--resume latest (or auto), or give the new run another train.remote_dir")

    # ------------------------------------------------------------------ download
    def download_latest(self, run_dir: Path) -> Path | None:
        """Copy the newest remote checkpoint that verifies into `run_dir`/checkpoints (replacing a damaged local
        copy of the same step) and return its local path, or None when the remote holds none; each newer one
        that cannot be read or fails to verify is reported and skipped."""
        complete, _ = self.steps()
        for step in reversed(complete):
            local = ckpt.checkpoint_dir(run_dir, step)
            remote = self._remote(local.name)
            partial = local.parent / f".{local.name}.downloading"
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get(remote + "/", str(partial), recursive=True)
            except Exception as exc:  # noqa: BLE001 - try the next older copy
                shutil.rmtree(partial, ignore_errors=True)
                self.log(f"skipping remote checkpoint {remote}: {type(exc).__name__}: {exc}")
                continue
            problems = ckpt.verify_checkpoint(partial)
            if problems:
                shutil.rmtree(partial, ignore_errors=True)
                self.log(f"skipping remote checkpoint {remote}: {'; '.join(problems)}")
                continue
            if local.exists():  # a damaged local copy of this step: set aside first
                aside = local.parent / f".{local.name}.deleting"
                os.replace(local, aside)
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(partial, local)
            self.log(f"downloaded {remote} to {local}")
            return local
        return None


def _snapshot(checkpoint: Path) -> Path:
    """Hard links to the files of `checkpoint` (copies where links are not possible) beside it, hidden from
    the checkpoint listing, so that pruning the checkpoint does not pull files from under its upload."""
    snapshot = checkpoint.parent / f".{checkpoint.name}.uploading-{time.monotonic_ns()}"
    for f in (p for p in checkpoint.rglob("*") if p.is_file()):
        target = snapshot / f.relative_to(checkpoint)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    return snapshot
