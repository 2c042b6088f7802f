"""A local stand-in for the Hugging Face Hub's HTTP API, enough for
huggingface_hub's create_repo / create_branch / upload_folder with regular
(non-LFS) files, and, for models added with :meth:`FakeHub.add_model`, for
downloads: ``model_info`` / ``repo_info`` (with file sizes), ``list_repo_tree``,
``hf_hub_download`` / ``snapshot_download`` (HEAD and GET of ``/resolve/``, with
HTTP ranges, which ``get_safetensors_metadata`` uses). It records every request,
so tests can assert exactly what would be published, which files were fetched
and which credentials were sent."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []  # method, path, headers, body
        self.repos: dict[str, dict] = {}  # repo_id -> {"private":..., "branches": set, "commits": [...]}
        self.fail_commits_for: set[str] = set()
        # repos whose commits are refused with a message quoting the credentials
        # received (as a careless server or proxy might): the client must scrub it
        self.echo_token_for: set[str] = set()
        self.models: dict[str, dict] = {}  # repo_id -> {"sha": str, "files": {path: bytes}}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, code: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return True

            def _reply_list(self, payload: list):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return True

            def _handle(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append({"method": method, "path": self.path, "headers": dict(self.headers), "body": body})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    hub.repos.setdefault(repo_id, {"private": req.get("visibility") == "private" or req.get("private"),
                                                   "branches": {"main"}, "commits": []})
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)$", path)
                if m and method == "POST":
                    repo_id, action, rev = m.group(1), m.group(2), m.group(3)
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._reply(404, {"error": "Repository not found"})
                    if action == "branch":
                        repo["branches"].add(rev)
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
                    if repo_id in hub.fail_commits_for:
                        return self._reply(500, {"error": "simulated failure"})
                    if repo_id in hub.echo_token_for:
                        auth = self.headers.get("Authorization", "")
                        return self._reply(403, {"error": f"simulated refusal: credentials '{auth}' may not write to {repo_id}"})
                    header, files = None, {}
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            header = item["value"]
                        elif item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo["commits"].append({"revision": rev, "header": header, "files": files})
                    oid = f"{len(repo['commits']):040x}"
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                                             "commitOid": oid, "pullRequestUrl": None})
                served = hub._serve_download(self, method, path)
                if served is not None:
                    return served
                return self._reply(404, {"error": f"fake hub: no route for {method} {path}"})

            def do_POST(self):
                self._handle("POST")

            def do_GET(self):
                self._handle("GET")

            def do_HEAD(self):
                self._handle("HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # --- downloads ------------------------------------------------------------------------

    def add_model(self, repo_id: str, folder=None, files: dict | None = None, sha: str = "c0ffee" * 6 + "beef") -> str:
        """Serve a model repository: every file of ``folder`` (recursively) and/or
        ``files`` ({path: bytes}); returns its commit sha."""
        from pathlib import Path

        content = {}
        if folder is not None:
            root = Path(folder)
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    content[f.relative_to(root).as_posix()] = f.read_bytes()
        content.update(files or {})
        self.models[repo_id] = {"sha": sha, "files": content}
        return sha

    def fetched(self, repo_id: str, ranges: bool = False) -> list[str]:
        """The files of ``repo_id`` whose whole content was requested (GET of
        /resolve/ without a Range header); with ``ranges``, those read in part."""
        out = []
        for r in self.requests:
            m = re.match(rf"^/{re.escape(repo_id)}/resolve/[^/]+/(.+)$", r["path"].split("?")[0])
            partial = any(k.lower() == "range" for k in r["headers"])
            if m and r["method"] == "GET" and partial == ranges:
                out.append(m.group(1))
        return out

    def _serve_download(self, handler, method: str, path: str):
        from urllib.parse import unquote

        m = re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$", path)
        if m and method == "GET" and m.group(1) in self.models:
            model = self.models[m.group(1)]
            return handler._reply(200, {
                "id": m.group(1), "modelId": m.group(1), "sha": model["sha"], "private": False,
                "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(model["files"].items())],
            })
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
        if m and method == "GET" and m.group(1) in self.models:
            model = self.models[m.group(1)]
            return handler._reply_list([
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in sorted(model["files"].items())
            ])
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and method in ("GET", "HEAD"):
            model = self.models.get(m.group(1))
            name = unquote(m.group(3))
            if model is None or name not in model["files"]:
                handler.send_response(404)
                handler.send_header("X-Error-Code", "EntryNotFound" if model else "RepoNotFound")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return True
            data = model["files"][name]
            status, body = 200, data
            rng = handler.headers.get("Range")
            if rng and method == "GET":
                a, _, b = rng.removeprefix("bytes=").partition("-")
                a = int(a)
                b = min(int(b) if b else len(data) - 1, len(data) - 1)
                status, body = 206, data[a : b + 1]
            handler.send_response(status)
            handler.send_header("X-Repo-Commit", model["sha"])
            handler.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            handler.send_header("Content-Length", str(len(body) if method == "GET" else len(data)))
            if status == 206:
                handler.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{len(data)}")
            handler.end_headers()
            if method == "GET":
                handler.wfile.write(body)
            return True
        return None
