"""A raw.githubusercontent.com stand-in on the loopback address, for tests of pinned downloads."""

from __future__ import annotations

import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lilyexp import downloads as dl

SERVER_LIFETIME_S = 120  # the server shuts itself down after this even if a teardown never runs


class Loopback:
    """A raw.githubusercontent.com stand-in on 127.0.0.1 serving ``root/<owner>/<name>/<commit>/<path>``;
    it records every request and can answer 404 to everything or hang (``mode``)."""

    def __init__(self, root: Path):
        self.root, self.requests, self.mode, self.release = root, [], "serve", threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.timer = threading.Timer(SERVER_LIFETIME_S, self.httpd.shutdown)
        self.timer.daemon = True

    def _handler(self):
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.root), **kwargs)

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("User-Agent")))
                if server.mode == "404":
                    return self.send_error(404)
                if server.mode == "hang":
                    server.release.wait(5)  # longer than the client's timeout; returns without answering
                    return None
                return super().do_GET()

            def log_message(self, *args):
                pass

        return Handler

    def path_of(self, repo: dl.PinnedRepo, path: str) -> Path:
        return self.root / repo.owner / repo.name / repo.commit / path

    def put(self, repo: dl.PinnedRepo, path: str, source: Path | None = None, data: bytes | None = None):
        """Serve ``source`` (linked) or ``data`` at ``path``; replaces the link, never writes through it."""
        target = self.path_of(repo, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if source is not None:
            target.symlink_to(source)
        else:
            target.write_bytes(data)

    def stop(self):
        self.release.set()
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
