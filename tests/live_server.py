"""An ASGI app served by uvicorn in a background thread on a free 127.0.0.1 port, for tests that need a real
HTTP server (a browser, a second process, a client library):

    with LiveServer(app) as server:
        requests.get(server.url + "/health")

Startup is bounded (``startup_timeout`` seconds; an app whose startup fails raises), and leaving the block
stops the server and joins its thread (``shutdown_timeout``).
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any


class LiveServer:
    def __init__(self, app: Any, startup_timeout: float = 20.0, shutdown_timeout: float = 10.0,
                 log_level: str = "warning") -> None:
        self.app = app
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.log_level = log_level
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LiveServer is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        import uvicorn

        # Bind here and hand the socket over: no window in which another process could take the port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level=self.log_level,
                                lifespan="on", access_log=False)
        self._server = uvicorn.Server(config)

        def serve() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as e:  # reported to the starting thread
                self._error = e
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name=f"live-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} stopped while starting") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on port {self.port} did not start within "
                                   f"{self.startup_timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(self.shutdown_timeout)
        if self._thread.is_alive():  # a request that would not end: cut the connections
            self._server.force_exit = True
            self._thread.join(self.shutdown_timeout)
        self._server, self._thread = None, None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
