"""uvicorn serving the app of server.py: the graceful shutdown on SIGINT/SIGTERM (the app drains its requests, then
uvicorn closes), and a server in a background thread, as tests and benchmarks run one beside their own code."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn
from litestar import Litestar

SHUTDOWN_GRACE_S = 10.0  # on SIGINT/SIGTERM, in-flight requests get this long to finish before they are ended
# Idle keep-alive connections live this long. It must outlast a client's lag behind its own stream: a client that
# reuses a connection the server closed meanwhile fails (uvicorn's default of 5 s failed 117 of 512 requests).
KEEP_ALIVE_S = 120.0


class UvicornServer(uvicorn.Server):
    """uvicorn serving one of our apps: on SIGINT/SIGTERM (or `stop()`), the app first stops admitting and gives
    its streams the grace period, ending the rest with an error event; then uvicorn closes, and the app stops the
    engine core."""

    def __init__(self, app: Litestar, host: str = "127.0.0.1", port: int = 0, grace_s: float = SHUTDOWN_GRACE_S,
                 keep_alive_s: float = KEEP_ALIVE_S):  # fmt: skip
        # uvicorn's own wait outlasts the grace: the app ends its streams first, with an error event each.
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=keep_alive_s,
                                        timeout_graceful_shutdown=grace_s + 5))  # fmt: skip
        self.app_server = app.state.server  # server._Server
        self.grace_s = grace_s
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        self.stop()

    def stop(self) -> None:
        """Begin the graceful shutdown; safe from any thread and from a signal handler."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._drain_then_exit)
        else:
            self.should_exit = True

    def _drain_then_exit(self) -> None:
        if self.app_server.draining:  # a second signal: end the streams now
            if self.app_server.client is not None:
                self.app_server.client.end_all("the server is shutting down")
            self.should_exit = True
            return
        self.app_server.begin_shutdown(self.grace_s).add_done_callback(lambda _: setattr(self, "should_exit", True))


def free_port() -> int:
    """A loopback port nobody is listening on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """An app served by uvicorn on a free loopback port, in a thread with its own event loop: how tests run a real
    server (and its engine core process) beside their own code."""

    def __init__(self, app: Litestar, start_timeout_s: float = 120.0, wait_ready: bool = True, **server_options):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.app = app
        self.server = UvicornServer(app, port=port, **server_options)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        state = app.state.server
        while not self.server.started or (wait_ready and state.client is None and state.load_error is None):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=30)
