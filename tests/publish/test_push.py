"""``condistill push`` / ``condistill.push_to_hub`` against a loopback fake of the hub's HTTP endpoints.

The fake (``ThreadingHTTPServer`` on 127.0.0.1, port 0) implements what huggingface_hub calls for
one commit: repo create, branch create, README metadata validation, preupload (``.safetensors`` and
``.png`` answered "lfs", the rest "regular"), the LFS batch API with basic single-part uploads, and
the ndjson commit (and a 404 for huggingface_hub's own ``/api/agent-harnesses`` lookup). Xet is switched off (``HF_HUB_DISABLE_XET``) so large files take the LFS path
the fake serves. Nothing leaves the machine.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from condistill.publish.card import set_card_source
from condistill.publish.push import PushError, export_files, push_to_hub

REPO = "my-org/codi-edge"
TOKEN = "hf_fake_token"
EXPECTED = ["README.md", "condistill_config.json", "controlnet/config.json",
            "controlnet/diffusion_pytorch_model.safetensors", "samples.png", "scheduler/scheduler_config.json"]


class FakeHub:
    """What the fake received: ``requests`` (method, path), ``created``, ``branches``, ``commits``, LFS ``objects``."""

    def __init__(self):
        self.requests, self.created, self.branches, self.commits = [], [], [], []
        self.objects: dict[str, bytes] = {}
        self.deny = False
        self.tokens = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload=None):
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                body = self._body()
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path))
                if path == "/api/agent-harnesses":  # huggingface_hub's own user-agent lookup, not part of a push
                    return self._send(404, {})
                if not path.startswith("/fake-lfs/"):  # the storage PUTs carry no hub token, like S3's
                    hub.tokens.add(self.headers.get("Authorization", ""))
                if hub.deny:
                    return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
                if path == "/api/repos/create":
                    hub.created.append(json.loads(body))
                    return self._send(200, {"url": f"{hub.url}/{REPO}", "name": REPO})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if path.startswith(f"/api/models/{REPO}/branch/"):
                    hub.branches.append(path.rsplit("/", 1)[1])
                    return self._send(200, {})
                if path.startswith(f"/api/models/{REPO}/preupload/"):
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".png"))
                         else "regular", "shouldIgnore": False, "oid": None} for f in files]})
                if path == f"/{REPO}.git/info/lfs/objects/batch":
                    request = json.loads(body)
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"], "authenticated": True,
                         "actions": {"upload": {"href": f"{hub.url}/fake-lfs/{o['oid']}"}}}
                        for o in request["objects"]]})
                if path.startswith("/fake-lfs/") and self.command == "PUT":
                    oid = path.rsplit("/", 1)[1]
                    assert hashlib.sha256(body).hexdigest() == oid
                    hub.objects[oid] = body
                    return self._send(200, {})
                if path.startswith(f"/api/models/{REPO}/commit/"):
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files, kinds = {}, {}
                    for item in lines[1:]:
                        value = item["value"]
                        if item["key"] == "file":
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "lfsFile":
                            files[value["path"]] = hub.objects[value["oid"]]
                        kinds[value["path"]] = item["key"]
                    hub.commits.append({"revision": path.rsplit("/", 1)[1], "header": lines[0]["value"],
                                        "files": files, "kinds": kinds})
                    return self._send(200, {"commitUrl": f"{hub.url}/{REPO}/commit/{'a' * 40}",
                                            "commitOid": "a" * 40})
                return self._send(404, {"error": f"fake hub: no route {self.command} {path}"})

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    hub = FakeHub()
    hub.thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the LFS path, which the fake serves
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent-harnesses.json"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield hub
    hub.server.shutdown()
    hub.server.server_close()
    hub.thread.join(timeout=5)


def sha(commit, rel):
    return hashlib.sha256(commit["files"][rel]).hexdigest()


def test_push_uploads_the_export_only_and_loads_back_from_the_cache(run_copy, fake_hub, tmp_path, monkeypatch):
    import condistill
    from helpers import make_fake_hub_cache

    # what a run folder holds besides the export never goes up
    assert {"checkpoints", "logs", "validation", "loss.jsonl", "config.json"} <= {p.name for p in run_copy.iterdir()}
    (run_copy / ".condistill.lock").write_text("")
    assert export_files(run_copy) == EXPECTED
    url = condistill.push_to_hub(run_copy, REPO, private=True, token=TOKEN, commit_message="first upload",
                                 endpoint=fake_hub.url)
    assert url == f"{fake_hub.url}/{REPO}/commit/{'a' * 40}"
    assert fake_hub.created == [{"name": "codi-edge", "organization": "my-org", "visibility": "private",
                                 "type": "model"}]
    assert fake_hub.tokens == {f"Bearer {TOKEN}"}
    (commit,) = fake_hub.commits
    assert commit["revision"] == "main" and commit["header"] == {"summary": "first upload", "description": ""}
    assert sorted(commit["files"]) == EXPECTED
    assert commit["kinds"] == {p: "lfsFile" if p.endswith((".safetensors", ".png")) else "file" for p in EXPECTED}
    for rel in EXPECTED:
        if rel != "README.md":
            assert commit["files"][rel] == (run_copy / "adapter" / rel).read_bytes(), rel
    card = commit["files"]["README.md"].decode()
    assert f'ADAPTER = "{REPO}"' in card and str(run_copy) not in card.split("## Sampling")[1].split("```")[1]
    local = (run_copy / "adapter" / "README.md").read_text()
    assert card == set_card_source(local, REPO) and card != local
    calls = [r for r in fake_hub.requests if r[1] != "/api/agent-harnesses"]
    assert calls[:4] + calls[6:] == [
        ("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"), ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch"), ("POST", f"/api/models/{REPO}/commit/main")]
    assert sorted(calls[4:6]) == sorted([("PUT", "/fake-lfs/" + sha(commit, EXPECTED[3])),  # in parallel threads
                                         ("PUT", "/fake-lfs/" + sha(commit, "samples.png"))])

    # the files the fake received, as a hub cache snapshot: load_adapter(REPO_ID) works offline
    received = tmp_path / "received"
    for rel, data in commit["files"].items():
        (received / rel).parent.mkdir(parents=True, exist_ok=True)
        (received / rel).write_bytes(data)
    cache = make_fake_hub_cache(tmp_path / "hub-cache", REPO, received, commit="a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = condistill.load_adapter(REPO)
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert pipe.condistill_defaults["num_inference_steps"] == 4


def test_push_to_a_branch_with_the_cli(run_copy, fake_hub, monkeypatch, capsys):
    from condistill.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    shutil.copyfile(run_copy / "adapter" / "README.md", run_copy / "adapter" / "card.bak")
    (run_copy / "adapter" / "README.md").unlink()  # an export without a card gets one before the push
    assert main(["push", str(run_copy), REPO, "--revision", "v1"]) == 0
    assert capsys.readouterr().out.strip() == f"{fake_hub.url}/{REPO}/commit/{'a' * 40}"
    assert fake_hub.created == [{"name": "codi-edge", "organization": "my-org", "type": "model"}]
    assert fake_hub.branches == ["v1"]
    (commit,) = fake_hub.commits
    assert commit["revision"] == "v1"
    assert commit["header"]["summary"] == "Upload condistill controlnet adapter (edge, 2 steps)"
    assert sorted(commit["files"]) == EXPECTED and (run_copy / "adapter" / "README.md").is_file()


def test_a_403_is_one_clear_line(run_copy, fake_hub, capsys):
    from condistill.cli import main

    fake_hub.deny = True
    with pytest.raises(PushError, match=r"^no permission to write to my-org/codi-edge \(HTTP 403 from the hub\)"):
        push_to_hub(run_copy, REPO, token=TOKEN, endpoint=fake_hub.url)
    assert main(["push", str(run_copy), REPO, "--token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert err.startswith("condistill push: error: no permission to write to my-org/codi-edge (HTTP 403")
    assert err.count("\n") == 1 and fake_hub.commits == []


def test_no_token_offline_and_not_an_export_refuse_before_any_request(run_copy, fake_hub, tmp_path, monkeypatch,
                                                                        capsys):
    from condistill.cli import main

    with pytest.raises(PushError, match=r"no Hugging Face token: run `hf auth login`, pass --token, or set HF_TOKEN"):
        push_to_hub(run_copy, REPO, endpoint=fake_hub.url)
    assert main(["push", str(run_copy), REPO]) == 1
    assert "`hf auth login`" in capsys.readouterr().err

    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(PushError, match=r"not-a-run is not an adapter export \(no condistill_config.json\)"):
        push_to_hub(tmp_path / "not-a-run", REPO, token=TOKEN, endpoint=fake_hub.url)
    (run_copy / "adapter" / "controlnet" / "diffusion_pytorch_model.safetensors").rename(run_copy / "adapter" / "moved.safetensors")
    with pytest.raises(PushError, match=r"not a usable adapter export: .*controlnet/diffusion_pytorch_model.safetensors "
                                        r"is missing"):
        push_to_hub(run_copy, REPO, token=TOKEN, endpoint=fake_hub.url)
    (run_copy / "adapter" / "moved.safetensors").rename(run_copy / "adapter" / "controlnet" / "diffusion_pytorch_model.safetensors")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match=r"offline mode \(HF_HUB_OFFLINE=1\)"):
        push_to_hub(run_copy, REPO, token=TOKEN, endpoint=fake_hub.url)
    assert main(["push", str(run_copy), REPO, "--token", TOKEN]) == 1
    assert "offline mode" in capsys.readouterr().err
    assert fake_hub.requests == []


def test_a_damaged_export_is_not_pushed(run_copy, fake_hub):
    weights = run_copy / "adapter" / "controlnet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(PushError, match=r"not a usable adapter export: .*diffusion_pytorch_model.safetensors changed "
                                        r"since export"):
        push_to_hub(run_copy, REPO, token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.commits == []
