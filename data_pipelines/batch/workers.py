"""How the loader's worker processes start. Light (multiprocessing only): the CLI imports it before torch, to start
the forkserver early.

Workers start from a forkserver, not by fork: a training process has threads (gloo's, DeepSpeed's, a previous
loader's queue feeders), and a fork taken while one of them holds a lock leaves the child waiting on it forever
(a clean-clone run hung so, in os.fork of a stage-2 worker). The forkserver is a fresh single-threaded process;
it imports the data path once (PRELOAD), so each worker start is a fork of it plus unpickling the config.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver

WORKER_START = "forkserver"
PRELOAD = ["data_pipelines.batch.loader", "transformers"]


def worker_context():
    """The multiprocessing context the loader's DataLoader starts its workers with."""
    context = multiprocessing.get_context(WORKER_START)
    context.set_forkserver_preload(PRELOAD)  # read when the forkserver starts (once per process)
    return context


def start_worker_server() -> None:
    """Start the forkserver now instead of at the first stage's first batch. Its imports (PRELOAD, about 2 s) then
    run on another core while this process imports the model code, instead of while the first stage waits for its
    first batch: a short one-process training ends about 1 s sooner (docs/performance.md, "Loader worker start")."""
    if WORKER_START == "forkserver":
        worker_context()
        multiprocessing.forkserver.ensure_running()
