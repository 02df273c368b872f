"""A loopback stand-in for the Hugging Face Hub, and the Hub's cache layout, for the weights tests.

``HubStandIn`` serves folders as model repositories over the endpoints ``huggingface_hub``'s
``snapshot_download`` uses (select it with ``HF_ENDPOINT``):

- ``GET /api/models/{org}/{name}/revision/{rev}``: the commit (``sha``) and the file list;
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]``: the recursive tree listing;
- ``HEAD|GET /{org}/{name}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (the content's
  sha256), ``Content-Length`` and byte ranges (``Range: bytes=N-`` answers 206).

It records every request, answers an unknown repository with 401 ``X-Error-Code: RepoNotFound``
(as the Hub does for a caller without access) and a wrong bearer token with 401, and can cut a
file's first download after some bytes (the connection closes: an interrupted download).
``place_in_hub_cache`` lays a folder out as ``snapshot_download`` leaves it under ``HF_HOME``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def repo_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def place_in_hub_cache(folder: Path, hf_home: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """``folder`` as the Hub cache holds a download of ``repo_id`` at ``main``:
    ``hub/models--ORG--NAME/{blobs/<sha256>, refs/main, snapshots/<commit>/<path> -> blob}``."""
    storage = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    for rel, path in repo_files(folder).items():
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


class HubStandIn:
    def __init__(self, repos: dict[str, Path], token: str | None = None) -> None:
        """``repos``: repository id -> the folder it serves; ``token``: the only bearer token
        accepted (None: no token needed)."""
        self.repos = {repo: repo_files(folder) for repo, folder in repos.items()}
        self.token = token
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.cut_after: dict[str, int] = {}  # file -> bytes its first GET sends before closing
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="hub-standin", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> HubStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def downloaded(self) -> list[str]:
        """The files whose content was asked for (GET), in order, repeats included."""
        return [
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, path, _ in self.requests
            if m == "GET" and "/resolve/" in path
        ]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Range", "")))
                if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._json(401, {"error": "Invalid credentials in Authorization header"})
                if path.startswith("/api/models/"):
                    return self._api(path[len("/api/models/") :])
                parts = path.lstrip("/").split("/", 4)
                if len(parts) == 5 and parts[2] == "resolve":
                    return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], parts[4], head)
                self._json(404, {"error": "not found"})

            def _repo(self, repo: str) -> dict[str, Path] | None:
                files = hub.repos.get(repo)
                if files is None:
                    self._json(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return files

            def _api(self, rest: str) -> None:
                org, name, kind, rev, *sub = rest.split("/")
                repo = f"{org}/{name}"
                files = self._repo(repo)
                if files is None:
                    return
                if rev not in ("main", COMMIT):
                    return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                if kind == "revision":
                    siblings = [{"rfilename": f} for f in files]
                    return self._json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings})
                prefix = "/".join(sub)
                tree = [
                    {
                        "type": "file",
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                        "size": p.stat().st_size,
                        "path": f,
                    }
                    for f, p in files.items()
                    if not prefix or f.startswith(prefix + "/")
                ]
                self._json(200, tree)

            def _resolve(self, repo: str, rev: str, file: str, head: bool) -> None:
                files = self._repo(repo)
                if files is None:
                    return
                if rev not in ("main", COMMIT) or file not in files:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = files[file].read_bytes()
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and ranged.endswith("-"):
                    start = int(ranged[len("bytes=") : -1])
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                with hub._lock:
                    cut = hub.cut_after.pop(file, None)
                if cut is not None:  # an interrupted download: part of the body, then the connection closes
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def _json(self, status: int, body, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
