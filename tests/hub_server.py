"""A local server speaking the Hugging Face Hub's upload protocol, for testing `--push-to-hub` without network.

The hub itself cannot run here (no network but the package registries), so this stands in for it at the wire:
the real `huggingface_hub` client talks to it over HTTP exactly as it talks to huggingface.co, through the
endpoints an upload uses (who-am-I, create repo, validate a model card's metadata, preupload, commit). It
answers "regular" to every preupload, so each file's bytes arrive base64-encoded inside the commit, and it
writes them under `root/<repo id>/`, where a test can compare them with what was exported and load them.
It serves them back as the hub does (`<repo>/resolve/<revision>/<file>` with the commit and ETag headers,
folder listings, "EntryNotFound" for a missing file), so `from_pretrained("owner/name")` loads from it.
It refuses requests without a bearer token, as the hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


class HubProtocolServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str]] = []  # (method, path), in order
        self.commits: list[dict] = []  # each commit's header
        self.validated: list[dict] = []  # each model card's metadata the client had checked
        self.downloads: list[str] = []  # each file served, in order
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubProtocolServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def client_settings(self, cache: Path) -> dict[str, str]:
        """`huggingface_hub.constants` values that point the client (and transformers through it) at this
        server, with downloads cached under `cache`: set them with monkeypatch, as HF_ENDPOINT and
        HF_HUB_CACHE would before import."""
        return {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_CACHE": str(cache),
        }

    def repo_folder(self, repo_id: str) -> Path:
        return self.root / repo_id

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest's output clean
                pass

            def _reply(self, status: int, body: dict | list, error_code: str | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                if error_code:  # how the hub tells a missing file from a missing repo
                    self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _handle(self) -> None:
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path))
                body = self._body()
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if path == "/api/whoami-v2":
                    return self._reply(200, {"type": "user", "name": "tester", "orgs": []})
                if path == "/api/validate-yaml":  # a README.md's metadata block, checked before the upload
                    content = json.loads(body)["content"]
                    metadata = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                    if not isinstance(metadata, dict):
                        return self._reply(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
                    hub.validated.append(metadata)
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
                    hub.repo_folder(repo_id).mkdir(parents=True, exist_ok=True)
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                parts = path.strip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":  # <owner>/<name>/resolve/<revision>/<file>: a download
                    return self._file(f"{parts[0]}/{parts[1]}", "/".join(parts[4:]))
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":  # a folder listing
                    folder = hub.repo_folder(f"{parts[2]}/{parts[3]}").joinpath(*parts[6:])
                    if not folder.is_dir():
                        return self._reply(404, {"error": "no such folder"}, error_code="EntryNotFound")
                    return self._reply(
                        200, [{"type": "file", "path": str(f.relative_to(folder))} for f in folder.iterdir()]
                    )
                # api/models/<owner>/<name>/<action>/<revision>
                if len(parts) == 6 and parts[:2] == ["api", "models"]:
                    repo_id, action = f"{parts[2]}/{parts[3]}", parts[4]
                    if not hub.repo_folder(repo_id).is_dir():
                        return self._reply(404, {"error": f"Repository not found: {repo_id}"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                                ]
                            },
                        )
                    if action == "commit":
                        return self._commit(repo_id, body)
                return self._reply(404, {"error": f"not served here: {self.command} {path}"})

            def _file(self, repo_id: str, name: str) -> None:
                """A file as the hub serves it: its commit and ETag in the headers, the bytes unless HEAD."""
                target = hub.repo_folder(repo_id) / name
                if not hub.repo_folder(repo_id).is_dir():
                    return self._reply(404, {"error": f"Repository not found: {repo_id}"}, error_code="RepoNotFound")
                if not target.is_file():
                    return self._reply(404, {"error": f"Entry not found: {name}"}, error_code="EntryNotFound")
                data = target.read_bytes()
                hub.downloads.append(name)
                self.send_response(200)
                self.send_header("X-Repo-Commit", f"{len(hub.commits):040x}")
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            def _commit(self, repo_id: str, body: bytes) -> None:
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        hub.commits.append(item["value"])
                    elif item["key"] == "file":
                        target = hub.repo_folder(repo_id) / item["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(item["value"]["content"]))
                    else:
                        return self._reply(400, {"error": f"unsupported commit operation {item['key']}"})
                oid = f"{len(hub.commits):040x}"
                return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})

            do_GET = do_POST = do_HEAD = _handle

        return Handler
