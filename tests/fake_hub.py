"""A local stand-in for the Hugging Face Hub's HTTP API, enough for
huggingface_hub's create_repo / create_branch / upload_folder with regular
(non-LFS) files. It records every request, so tests can assert exactly what
would be published and which credentials were sent."""

from __future__ import annotations

import base64
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
