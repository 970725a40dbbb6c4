"""A Hugging Face Hub on localhost, serving repos from a local folder, for download tests.

It answers the requests huggingface_hub's ``snapshot_download`` and ``list_repo_files`` make
(repo info, the file tree, each file's headers and content) and records every request, so a
test can see which files a loader actually fetched.
"""

import hashlib
import http.server
import json
import os
import threading
import urllib.parse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    """``Hub(root)`` serves ``root/org/name/...`` as the repo ``org/name`` at one commit."""

    def __init__(self, root):
        self.root = str(root)
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                self.answer(head=False)

            def do_HEAD(self):  # noqa: N802 - http.server's name
                self.answer(head=True)

            def send(self, status, body=b"", headers=(), head=False):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def answer(self, head):
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = "/".join(parts[2:4])
                    if not os.path.isdir(os.path.join(hub.root, repo)):
                        return self.send(404, b'{"error": "Repository not found"}',
                                         [("X-Error-Code", "RepoNotFound"), ("Content-Type", "application/json")])
                    if len(parts) == 4 or parts[4] == "revision":  # the repo's info, at a revision or main
                        body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in hub.files(repo)]}
                    elif parts[4] == "tree":
                        body = [{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                                for f, data in ((f, hub.content(repo, f)) for f in hub.files(repo))]
                    else:
                        return self.send(404)
                    return self.send(200, json.dumps(body).encode(), [("Content-Type", "application/json")], head)
                if len(parts) > 4 and parts[2] == "resolve":  # /org/name/resolve/<revision>/<file>
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    if name not in hub.files(repo):
                        return self.send(404, b"", [("X-Error-Code", "EntryNotFound")], head)
                    data = hub.content(repo, name)
                    return self.send(200, data, [("X-Repo-Commit", COMMIT),
                                                 ("ETag", f'"{hashlib.sha1(data).hexdigest()}"')], head)
                return self.send(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def files(self, repo):
        base = os.path.join(self.root, repo)
        return sorted(os.path.relpath(os.path.join(folder, name), base)
                      for folder, _, names in os.walk(base) for name in names)

    def content(self, repo, name):
        with open(os.path.join(self.root, repo, name), "rb") as f:
            return f.read()

    def fetched(self, repo):
        """The files of ``repo`` that were downloaded: asked for (a file whose bytes another one
        already brought is taken from huggingface_hub's cache after its headers alone)."""
        prefix = f"/{repo}/resolve/{COMMIT}/"
        return sorted({path[len(prefix):] for _, path in self.requests if path.startswith(prefix)})

    def close(self):
        self.server.shutdown()
