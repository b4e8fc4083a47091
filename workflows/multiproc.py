"""Nipype's MultiProc plugin, made safe against worker processes that die.

When the system kills one of MultiProc's worker processes (the out-of-memory killer, a
``kill -9``), Python marks the whole process pool as broken: the running node's future
raises ``BrokenProcessPool`` in Nipype's done-callback, which Nipype does not catch, so the
node never counts as finished and the run waits for it forever (nipy/nipype#2548): on a
cluster, a job that burns its whole time limit and says nothing.

:class:`GuardedMultiProcPlugin` turns a dead worker into a failed node (a crash file naming
the cause, so the run ends with the subject listed as failed and the rest of the graph
continues) and starts a new pool for the nodes still to run. :meth:`terminate` stops the
workers at once when the run itself is interrupted (Ctrl-C, SIGTERM from a scheduler's time
limit), instead of leaving them running as orphans.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer

__all__ = ["GuardedMultiProcPlugin"]

LOGGER = logging.getLogger("regpipe.workflows")

#: The crash file's explanation of a node whose worker process died.
DIED = ("the worker process running this node died (killed by the system: most often out "
        "of memory; lower --nprocs or raise --mem, or give the job more memory) ({error})\n")


class GuardedMultiProcPlugin(MultiProcPlugin):
    """MultiProc that fails a node whose worker died instead of waiting for it forever."""

    def _async_callback(self, args: Future) -> None:
        if args.exception() is None:
            super()._async_callback(args)
        # else: _get_result reports it (this callback has no task id to report it under)

    def _get_result(self, taskid: int) -> dict[str, Any] | None:
        result = self._taskresult.get(taskid)
        future = self._task_obj.get(taskid)
        if result is None and future is not None and future.done():
            error = future.exception()
            if error is not None:
                LOGGER.error("a worker process died (%s); its node fails", error)
                return {"taskid": taskid, "result": None,
                        "traceback": [DIED.format(error=f"{type(error).__name__}: {error}")]}
        return result

    def _submit_job(self, node: Any, updatehash: bool = False) -> int:
        try:
            return super()._submit_job(node, updatehash)
        except BrokenProcessPool:
            self._taskid -= 1  # the parent counted the task it could not submit
            LOGGER.warning("starting a new pool of worker processes (one died)")
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = ProcessPoolExecutor(
                max_workers=self.processors, initializer=process_initializer,
                initargs=(self._cwd,),
                mp_context=mp.get_context(self.plugin_args.get("mp_context")))
            return super()._submit_job(node, updatehash)

    def terminate(self) -> None:
        """Stop every worker process now (the run was interrupted): queued nodes are
        cancelled, running ones killed; a rerun with the same work folder resumes."""
        pool = getattr(self, "pool", None)
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)
