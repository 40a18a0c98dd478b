# prometheus-client's multiprocess mode under gunicorn (docs/deployment.md): add these lines to
# gunicorn.conf.py, and start gunicorn with PROMETHEUS_MULTIPROC_DIR set in its environment.
import os
import shutil
from typing import Any

from prometheus_client import multiprocess


def on_starting(server: Any) -> None:  # in the arbiter, before any worker exists
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)  # files of a previous run would be added in
    os.makedirs(path)


def child_exit(server: Any, worker: Any) -> None:  # in the arbiter, once a worker exited
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
