"""A remote copy of a run's checkpoints (`train.remote_dir`): each checkpoint is uploaded in the background
after it is saved, the remote copies are pruned like the local ones, and a run resumed where it has no
checkpoint (a new machine, a lost disk) downloads the newest remote one that verifies.

Any fsspec URL works (``s3://bucket/runs/x`` with s3fs, ``gs://`` with gcsfs, ...) and so does a plain path
(a network file system). A checkpoint's manifest is uploaded last, so a copy without one is an unfinished
upload: it is never downloaded, and pruning removes it.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Callable

from cliptrain.training import checkpoint as ckpt

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
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="cliptrain-remote", daemon=True)
            self._thread.start()
        self._queue.put(Path(checkpoint))

    @property
    def pending(self) -> int:
        """Checkpoints queued or being uploaded."""
        return self._queue.unfinished_tasks

    def wait(self) -> None:
        """Block until every queued checkpoint is uploaded (or has failed, which is reported)."""
        self._queue.join()

    def _work(self) -> None:
        while True:
            path = self._queue.get()
            try:
                self._put(path)
                self._prune()
            except Exception as exc:  # noqa: BLE001 - the run goes on; the failure is reported
                message = f"uploading {path.name} to {self.url} failed ({type(exc).__name__}: {exc})"
                if not path.exists():
                    message += "; it was pruned locally first, and the next checkpoint will be uploaded"
                self.failed.append(message)
                self.log(f"warning: {message}")
            finally:
                self._queue.task_done()

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _put(self, path: Path) -> None:
        manifest = self._remote(path.name, ckpt.MANIFEST)
        if self.fs.exists(manifest):  # a copy being replaced is unfinished until its new manifest arrives
            self.fs.rm(manifest)
        files = sorted((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.name == ckpt.MANIFEST)
        for f in files:  # the manifest last: a copy without it is unfinished
            target = self._remote(path.name, f.relative_to(path).as_posix())
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(f), target)

    def _steps(self) -> tuple[list[int], list[str]]:
        """(steps of the complete remote copies, names of unfinished ones)."""
        if not self.fs.exists(self.root):
            return [], []
        complete, unfinished = [], []
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if not ckpt.is_checkpoint_name(name):
                continue
            if self.fs.exists(self._remote(name, ckpt.MANIFEST)):
                complete.append(ckpt.checkpoint_step(Path(name)))
            else:
                unfinished.append(name)
        return sorted(complete), unfinished

    def _prune(self) -> None:
        complete, unfinished = self._steps()
        doomed = [ckpt.checkpoint_dir("", s).name for s in ckpt.steps_to_prune(complete, self.keep_last,
                                                                               self.keep_every)]
        newest = ckpt.checkpoint_dir("", complete[-1]).name if complete else ""
        for name in doomed + [n for n in unfinished if n < newest]:  # an older unfinished upload is abandoned
            self.fs.rm(self._remote(name), recursive=True)

    # ------------------------------------------------------------------ download
    def download_latest(self, run_dir: Path) -> Path | None:
        """Copy the newest remote checkpoint that verifies into `run_dir`/checkpoints and return its local path
        (None when the remote holds none); each newer one that fails to verify is reported and skipped."""
        complete, _ = self._steps()
        for step in reversed(complete):
            local = ckpt.checkpoint_dir(run_dir, step)
            partial = local.parent / f".{local.name}.downloading"
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(self._remote(local.name) + "/", str(partial), recursive=True)
            problems = ckpt.verify_checkpoint(partial)
            if problems:
                shutil.rmtree(partial, ignore_errors=True)
                self.log(f"skipping remote checkpoint {self._remote(local.name)}: {'; '.join(problems)}")
                continue
            os.replace(partial, local)
            self.log(f"downloaded {self._remote(local.name)} to {local}")
            return local
        return None
