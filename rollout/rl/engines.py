"""The RL loop's engine process: the rollout engine (and the bf16 control engine) behind HTTP servers in a
spawned child process, driven by the trainer as it would drive a remote `mxroll serve`.

The trainer reaches the engines through `EngineClient`s (generation, weight-sync calls) and the weight
update group (the tensors). The pipe to the child carries only "ready" with the servers' URLs, or why
the start failed, and then "stop". The child also stops when the pipe breaks (the trainer died, so no
orphan is left behind) and ignores Ctrl-C: the trainer's `stop()` shuts it down in order.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
import traceback

import torch.multiprocessing as mp

from ..config import EngineConfig

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0  # for the child to stop its servers and engines before it is terminated
CHILD_LOG_FORMAT = "%(asctime)s [engine process] %(name)s %(levelname)s %(message)s"


class EngineStartError(RuntimeError):
    """The engine process could not start serving (its error, or its exit, is in the message)."""


class EngineProcess:
    """`with EngineProcess([cfg, ...], token) as urls:` one HTTP server per engine config, in one child."""

    def __init__(self, engine_configs: list[EngineConfig], admin_token: str, log_level: str = "WARNING",
                 start_timeout: float = 300.0):
        self.configs, self.token = list(engine_configs), admin_token
        self.log_level, self.start_timeout = log_level, start_timeout
        self.proc = self._conn = None

    def start(self) -> list[str]:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no state (threads, CUDA) copied from the trainer
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(self.configs, self.token, self.log_level, child),
                                name="mxroll-engine", daemon=True)
        self.proc.start()
        child.close()  # the child's end lives in the child only: its exit reads as EOF here
        try:
            return self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> list[str]:
        deadline = time.monotonic() + self.start_timeout
        while not self._conn.poll(0.2):
            if time.monotonic() > deadline:
                raise EngineStartError(f"the engine process did not serve within engine_start_timeout="
                                       f"{self.start_timeout:g} s")
        try:
            kind, *payload = self._conn.recv()
        except EOFError:
            self.proc.join(5)
            raise EngineStartError(f"the engine process exited (exit code {self.proc.exitcode}) before serving; "
                                   "its output above says why") from None
        if kind == "error":
            message, trace = payload
            log.debug("engine process traceback:\n%s", trace)
            raise EngineStartError(f"the engine process failed to start: {message}")
        return payload[0]

    def stop(self) -> None:
        """Ask the child to stop (servers, then engines); terminate it if it does not exit in time."""
        if self.proc is None:
            return
        try:
            self._conn.send("stop")
        except (OSError, ValueError):  # the child is already gone
            pass
        self.proc.join(STOP_TIMEOUT_S)
        if self.proc.is_alive():
            log.warning("the engine process did not stop within %.0f s; terminating it", STOP_TIMEOUT_S)
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self._conn.close()
        self.proc = None

    def __enter__(self) -> list[str]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _serve(configs: list[EngineConfig], admin_token: str, log_level: str, conn) -> None:
    """The child's main: build the engines and their servers, report, serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _log_to_stderr(log_level)  # a process of its own: its entry point configures its logging
    from ..engine import Engine
    from ..server import BackgroundServer, create_app

    engines, servers = [], []
    try:
        try:
            for cfg in configs:
                engines.append(Engine(cfg))
                servers.append(BackgroundServer(create_app(engines[-1], admin_token=admin_token)).start())
        except BaseException as e:  # noqa: BLE001 - reported to the trainer, which raises it
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
            return
        conn.send(("ready", [s.url for s in servers]))
        try:
            conn.recv()  # "stop"
        except (EOFError, OSError):  # the trainer is gone
            pass
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.shutdown()
        conn.close()


def _log_to_stderr(level: str) -> None:
    logger = logging.getLogger("mxroll")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(CHILD_LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
