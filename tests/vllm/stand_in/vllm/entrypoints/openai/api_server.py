"""A stand-in for `python -m vllm.entrypoints.openai.api_server`, for the fast tests.

It takes vLLM's flags and behaves like vLLM where supervision is concerned (see
vllm/entrypoints/launchers/api_server/entry.py): the port refuses connections while the "model
loads", then /health answers 200; the API server spawns an EngineCore process, which spawns one
Worker per tensor-parallel rank. Workers ignore SIGTERM; the engine shuts down (with its workers)
on SIGTERM, failing the requests in flight; all of them outlive a SIGKILL of the parent unless the
whole group is killed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

CHILD = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); sys.argv[0] = {name!r}; time.sleep(3600)"


def engine_core(tp: int) -> None:
    workers = [
        subprocess.Popen([sys.executable, "-c", CHILD.format(name=f"VllmWorker-{rank}"), f"VllmWorker-{rank}"]) for rank in range(tp)
    ]

    def shut_down(signum, frame):  # as vLLM's EngineCore: SIGTERM shuts it down, with its workers
        for w in workers:
            w.kill()
            w.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, shut_down)
    print("ready", flush=True)  # the API server serves only once its workers exist, as vLLM does
    time.sleep(3600)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--engine-core":
        engine_core(int(sys.argv[2]))
    else:
        from vllm.entrypoints.launchers.api_server.entry import main

        main()
