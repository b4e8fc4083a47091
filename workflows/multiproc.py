"""Nipype's MultiProc plugin, made safe against worker processes that die.

When the system kills one of MultiProc's worker processes (the out-of-memory killer, a
``kill -9``), Python marks the whole process pool as broken: the running node's future
raises ``BrokenProcessPool`` in Nipype's done-callback, which Nipype does not catch, so the
node never counts as finished and the run waits for it forever (nipy/nipype#2548): on a
cluster, a job that burns its whole time limit and says nothing.

:class:`GuardedMultiProcPlugin` runs every node of a broken pool again, each in a pool of its
own (Python cannot tell whose worker died, and all of the pool's futures fail alike): the
others finish, and the one whose worker dies again fails with a crash file naming the cause, so
the run ends with its subject listed as failed instead of hanging. New nodes go to a new pool.
:meth:`terminate` stops the workers, and the processes they started, at once when the run
itself is interrupted (Ctrl-C, SIGTERM from a scheduler's time limit), instead of leaving them
running as orphans.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer, run_node

__all__ = ["GuardedMultiProcPlugin"]

LOGGER = logging.getLogger("regpipe.workflows")

#: The crash file's explanation of a node whose worker process died (on its retry alone).
DIED = ("the worker process running this node died, twice: killed by the system, most often "
        "for lack of memory (the first time in the shared pool of workers, the second time "
        "alone). Lower --nprocs or raise --mem, or give the job more memory; rerunning the "
        "same command retries it (finished nodes are cached) ({error})\n")


class GuardedMultiProcPlugin(MultiProcPlugin):
    """MultiProc that fails a node whose worker died instead of waiting for it forever."""

    def __init__(self, plugin_args: dict[str, Any] | None = None) -> None:
        super().__init__(plugin_args=plugin_args)
        self._submitted: dict[int, tuple[Any, bool]] = {}  # taskid: (node, updatehash)
        self._alone: dict[int, ProcessPoolExecutor] = {}  # taskid: its own one-worker pool

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=workers, initializer=process_initializer, initargs=(self._cwd,),
            mp_context=mp.get_context(self.plugin_args.get("mp_context")))

    def _async_callback(self, args: Future) -> None:
        if args.exception() is None:
            super()._async_callback(args)
        # else: _get_result reports it (this callback has no task id to report it under)

    def _get_result(self, taskid: int) -> dict[str, Any] | None:
        result = self._taskresult.get(taskid)
        future = self._task_obj.get(taskid)
        if result is None and future is not None and future.done():
            error = future.exception()
            if isinstance(error, BrokenProcessPool) and taskid not in self._alone:
                # every task of a broken pool fails the same way, and Python cannot tell
                # whose worker died: run each again in a pool of its own, where only the
                # culprit breaks again
                node, updatehash = self._submitted[taskid]
                LOGGER.warning("a worker process died (killed by the system?); running %s "
                               "again on its own", node.fullname)
                self._alone[taskid] = pool = self._new_pool(1)
                retry = pool.submit(run_node, node, updatehash, taskid)
                retry.add_done_callback(self._async_callback)
                self._task_obj[taskid] = retry
                return None
            if isinstance(error, BrokenProcessPool):
                LOGGER.error("the worker process of %s died again: the node fails",
                             self._submitted[taskid][0].fullname)
                return {"taskid": taskid, "result": None,
                        "traceback": [DIED.format(error=f"{type(error).__name__}: {error}")]}
            if error is not None:  # any other failure to run the node (pickling...): its own
                return {"taskid": taskid, "result": None,
                        "traceback": traceback.format_exception(error)}
        return result

    def _clear_task(self, taskid: int) -> None:
        super()._clear_task(taskid)
        self._submitted.pop(taskid, None)
        pool = self._alone.pop(taskid, None)
        if pool is not None:
            pool.shutdown(wait=False)

    def _submit_job(self, node: Any, updatehash: bool = False) -> int:
        try:
            taskid = super()._submit_job(node, updatehash)
        except BrokenProcessPool:
            self._taskid -= 1  # the parent counted the task it could not submit
            LOGGER.warning("starting a new pool of worker processes (one died)")
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool(self.processors)
            taskid = super()._submit_job(node, updatehash)
        self._submitted[taskid] = (node, updatehash)
        return taskid

    def terminate(self) -> None:
        """Stop every worker process and what they started (an ANTs process, a command line
        tool) now, the run being interrupted: queued nodes are cancelled, running ones
        killed; a rerun with the same work folder resumes."""
        pools = [pool for pool in (getattr(self, "pool", None), *self._alone.values())
                 if pool is not None]
        processes = [process for pool in pools
                     for process in (getattr(pool, "_processes", None) or {}).values()]
        workers = [process.pid for process in processes if process.pid]
        family = workers + _descendants(workers)
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        _signal_all(family, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(pid) for pid in family):
            time.sleep(0.1)
        _signal_all([pid for pid in family if _alive(pid)], signal.SIGKILL)
        for process in processes:
            process.join(timeout=1)


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first, then the
    parent's pid); ``OSError`` where the process is gone (or there is no ``/proc``)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def _descendants(pids: list[int]) -> list[int]:
    """Every process below ``pids`` (children first found, then theirs), from one scan of
    ``/proc``; none where there is no ``/proc`` (not Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents.setdefault(int(_stat_fields(entry.name)[1]), []).append(int(entry.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
    found, queue = [], list(pids)
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has ended
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) is not running
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return True
