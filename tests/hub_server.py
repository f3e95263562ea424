"""A local server speaking the Hugging Face Hub's protocol, for testing the hub paths without network.

The hub itself cannot run here (no network but the package registries), so this stands in for it at the wire:
the real `huggingface_hub` client, and transformers and datasets through it, talk to it over HTTP exactly as
to huggingface.co. Uploads (`--push-to-hub`): who-am-I, create repo, validate a model card's metadata,
preupload (answered "regular" for every file, so its bytes arrive base64-encoded inside the commit) and
commit, written under `root/<repo id>/` (datasets under `root/datasets/`). Downloads: the repo's info,
folder listings and paths-info, and `resolve/<revision>/<file>` with the commit and ETag headers the client
checks; "EntryNotFound", "RepoNotFound" and "RevisionNotFound" as the hub says them. So a test can push an
export, compare what arrived, and load a model or a dataset by its hub id. Requests without a bearer token
are refused, as the hub refuses them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

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

    def client_settings(self, cache: Path) -> list[tuple[Any, str, Any]]:
        """(module, attribute, value) triples that point the hub client, transformers and datasets at this
        server, with downloads cached under `cache`: set them with monkeypatch.setattr, as HF_ENDPOINT,
        HF_HUB_CACHE and HF_DATASETS_CACHE would before import."""
        import datasets.config
        import huggingface_hub.constants

        return [
            (huggingface_hub.constants, "ENDPOINT", self.endpoint),
            (
                huggingface_hub.constants,
                "HUGGINGFACE_CO_URL_TEMPLATE",
                f"{self.endpoint}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
            ),
            (huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub")),
            (datasets.config, "HF_ENDPOINT", self.endpoint),
            (
                datasets.config,
                "HUB_DATASETS_URL",
                f"{self.endpoint}/datasets/{{repo_id}}/resolve/{{revision}}/{{path}}",
            ),
            (datasets.config, "HF_DATASETS_CACHE", cache / "datasets"),
        ]

    def repo_folder(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / repo_id if repo_type == "model" else self.root / f"{repo_type}s" / repo_id

    def commit(self) -> str:
        return f"{len(self.commits):040x}"

    def has_revision(self, revision: str) -> bool:
        """`main`, or the id of one of the commits made (this server keeps the files of the last one only)."""
        return revision == "main" or revision in {f"{number:040x}" for number in range(1, len(self.commits) + 1)}

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
                path = unquote(self.path.split("?")[0])
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
                    hub.repo_folder(repo_id, request.get("type") or "model").mkdir(parents=True, exist_ok=True)
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                parts = path.strip("/").split("/")
                if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                    return self._api(parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[4:], body)
                repo_type = "dataset" if parts[0] == "datasets" else "model"
                parts = parts[1:] if repo_type == "dataset" else parts
                if len(parts) >= 5 and parts[2] == "resolve":  # <owner>/<name>/resolve/<revision>/<file>
                    if not hub.has_revision(parts[3]):
                        return self._reply(404, {"error": f"Invalid rev id: {parts[3]}"}, error_code="RevisionNotFound")
                    return self._file(repo_type, f"{parts[0]}/{parts[1]}", "/".join(parts[4:]))
                return self._reply(404, {"error": f"not served here: {self.command} {path}"})

            def _api(self, repo_type: str, repo_id: str, rest: list[str], body: bytes) -> None:
                """/api/<type>s/<owner>/<name>[/revision/<rev>], …/tree/<rev>/<folder>, …/paths-info/<rev>,
                …/preupload/<rev>, …/commit/<rev>."""
                folder = hub.repo_folder(repo_id, repo_type)
                if not folder.is_dir():
                    return self._reply(404, {"error": f"Repository not found: {repo_id}"}, error_code="RepoNotFound")
                action = rest[0] if rest else "revision"
                if len(rest) >= 2 and not hub.has_revision(rest[1]):
                    return self._reply(404, {"error": f"Invalid rev id: {rest[1]}"}, error_code="RevisionNotFound")
                if action == "revision":  # the repo's info: its commit and files
                    files = [
                        {"rfilename": str(f.relative_to(folder))} for f in sorted(folder.rglob("*")) if f.is_file()
                    ]
                    return self._reply(200, {"id": repo_id, "sha": hub.commit(), "siblings": files, "private": False})
                if action == "tree":
                    where = folder.joinpath(*rest[2:])
                    if not where.is_dir():
                        return self._reply(404, {"error": "no such folder"}, error_code="EntryNotFound")
                    recursive = "recursive=true" in self.path or "recursive=True" in self.path
                    entries = sorted(where.rglob("*") if recursive else where.iterdir())
                    return self._reply(200, [self._entry(folder, entry) for entry in entries])
                if action == "paths-info":
                    paths = parse_qs(body.decode()).get("paths", [])
                    found = [folder / name for name in paths if (folder / name).exists()]
                    return self._reply(200, [self._entry(folder, entry) for entry in found])
                if action == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": modes})
                if action == "commit":
                    return self._commit(folder, repo_id, body)
                return self._reply(404, {"error": f"not served here: {action}"})

            @staticmethod
            def _entry(folder: Path, entry: Path) -> dict:
                """A tree entry as the hub lists it."""
                name = str(entry.relative_to(folder))
                if entry.is_dir():
                    return {"type": "directory", "path": name, "oid": hub.commit()}
                oid = hashlib.sha1(entry.read_bytes()).hexdigest()
                return {"type": "file", "path": name, "size": entry.stat().st_size, "oid": oid}

            def _file(self, repo_type: str, repo_id: str, name: str) -> None:
                """A file as the hub serves it: its commit and ETag in the headers, the bytes unless HEAD."""
                folder = hub.repo_folder(repo_id, repo_type)
                if not folder.is_dir():
                    return self._reply(404, {"error": f"Repository not found: {repo_id}"}, error_code="RepoNotFound")
                if not (folder / name).is_file():
                    return self._reply(404, {"error": f"Entry not found: {name}"}, error_code="EntryNotFound")
                data = (folder / name).read_bytes()
                hub.downloads.append(name)
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.commit())
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            def _commit(self, folder: Path, repo_id: str, body: bytes) -> None:
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        hub.commits.append(item["value"])
                    elif item["key"] == "file":
                        target = folder / item["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(item["value"]["content"]))
                    else:
                        return self._reply(400, {"error": f"unsupported commit operation {item['key']}"})
                oid = hub.commit()
                return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})

            do_GET = do_POST = do_HEAD = _handle

        return Handler
