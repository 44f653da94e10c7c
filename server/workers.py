"""N discountd processes on one port: the kernel spreads connections over them (SO_REUSEPORT,
which gRPC sets on Linux when told to), so Python's per-call work runs on every core.

The parent forks before any gRPC object exists (gRPC's core does not survive a fork once
started), then only relays signals: SIGHUP to every worker, SIGTERM/SIGINT to every worker
for a graceful drain. When a worker exits on its own the others are stopped too, so the
process supervisor sees one failed service rather than a silently shrunken one. When the parent
dies (killed, out of memory) its workers drain and exit too: left running, they would keep
serving the port unsupervised, beside the workers of the service the supervisor restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from server.settings import Settings, address

log = logging.getLogger("discountd.workers")

Serve = Callable[[Settings], Coroutine[Any, Any, int]]
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def supervise(settings: Settings, serve: Serve) -> int:
    """Fork settings.workers processes running serve; the exit code: 0 when all drained."""
    try:
        port = unowned_port(settings.host, settings.port)
    except OSError as e:  # as serve() reports a port it cannot bind
        where = address(settings.host, settings.port)
        log.error("cannot listen on %s: %s", where, e)
        return 1
    children: dict[int, int] = {}
    stopping = False

    def relay(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or sig != signal.SIGHUP
        for pid in list(children):
            _signal(pid, sig)

    # Before forking: a SIGTERM from now on reaches every worker started so far.
    for sig in RELAYED:
        signal.signal(sig, relay)
    parent = os.getpid()
    for n in range(settings.workers):
        if stopping:  # told to stop while starting: no more workers
            break
        metrics = settings.metrics_port
        if metrics:  # each worker serves its own registry, on consecutive ports
            metrics += n
        worker = dataclasses.replace(settings, port=port, metrics_port=metrics)
        # Held from the fork until the worker is recorded: a signal in between would be
        # relayed to the workers recorded so far, and never to this one.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)
        pid = os.fork()
        if pid == 0:
            _run_child(worker, serve, parent)
        children[pid] = n
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)  # one held is relayed now
    log.info("%d workers on %s", settings.workers, address(settings.host, port))
    code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        exit_code = os.waitstatus_to_exitcode(status)
        index = children.pop(pid)
        if exit_code != 0 or not stopping:
            log.error(
                "worker %d (pid %d) exited with %d; stopping the others", index, pid, exit_code
            )
            code = 1
            if not stopping:
                stopping = True
                for other in children:
                    _signal(other, signal.SIGTERM)
    return code


def _run_child(settings: Settings, serve: Serve, parent: int) -> None:
    # The parent's handlers relay; a worker installs its own in serve(), and only then lets the
    # signals in (held since the fork): one that comes meanwhile, while the worker opens its
    # store, drains it then instead of killing it undrained.
    for sig in RELAYED:
        signal.signal(sig, signal.SIG_DFL)
    _drain_when_orphaned(parent)
    code = 1
    try:
        code = asyncio.run(serve(settings))
    except Exception:
        # os._exit below skips the interpreter's report of an escaping error: say what it was.
        log.exception("worker (pid %d) failed", os.getpid())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _drain_when_orphaned(parent: int) -> None:
    """SIGTERM this worker (a graceful drain) when the parent dies; Linux only."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("worker (pid %d) will not stop with its parent: prctl failed", os.getpid())
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone; os.wait collects it
        os.kill(pid, sig)


def unowned_port(host: str, port: int) -> int:
    """The port for all workers, checked to be no other process's; 0 picks one (the workers
    cannot each pick one). The workers share it with SO_REUSEPORT, which would as well let them
    join another discountd already on it, so the check binds without: another service's
    listener, shared or not, refuses it. The workers bind once their model is loaded: a process
    that takes the port meanwhile makes them fail (cannot listen)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # A previous run's connections in TIME_WAIT own nothing; gRPC binds past them too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        return int(probe.getsockname()[1])
