"""A TCP server that accepts connections and never says a word: a PostgreSQL client waits for the server's
reply until its own timeout (a host behind a firewall that drops packets behaves alike for a connect)."""

from __future__ import annotations

import socket
import threading


class SilentServer:
    """Accepts TCP connections and holds them, silent; `held` are those accepted so far."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=10)
        for conn in self.held:
            conn.close()
