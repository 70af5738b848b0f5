"""Helpers for the serving tests: a tiny checkpoint with LoRA adapters, an engine on it, a real uvicorn server in a
thread on a free localhost port."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from _tiny import tiny_checkpoint

from llmlab.args import LoRAConfig
from llmlab.checkpoint import load_checkpoint
from llmlab.generate import generate
from llmlab.methods import load_adapter
from llmlab.methods.adapters import adapter_params
from llmlab.methods.lora import LoRA
from llmlab.tokenizer import Tokenizer

PROMPTS = ["What does the cat say?", "The dog", "What does the owl say? The owl says", "cow"]


def make_adapter(ckpt: Path, folder: Path, seed: int, targets: str = "q,v,o,gate,down", r: int = 4) -> Path:
    """A LoRA adapter with random (non-zero) A and B, large enough to change the tiny model's greedy output."""
    method = LoRA(LoRAConfig(r=r, alpha=2 * r, targets=targets), base_model=str(ckpt))
    model = method.prepare(load_checkpoint(ckpt))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return method.save(model, folder)


def make_fixture(tmp: Path) -> tuple[Path, dict[str, Path]]:
    """(tiny checkpoint, {adapter name: folder}) under `tmp`."""
    ckpt = tiny_checkpoint(tmp / "tiny", std=0.1)
    adapters = {"alpha": make_adapter(ckpt, tmp / "alpha", 1), "beta": make_adapter(ckpt, tmp / "beta", 2, "k,up")}
    return ckpt, adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `url` is its base address."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_for(condition, timeout: float = 20.0) -> bool:
    """Poll `condition()` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def raw_request(server: ServerThread, method: str, path: str, body: bytes | dict | None = None, key: str | None = None,
         timeout: float = 30.0) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send one raw HTTP request (stdlib only) and return the open connection and response, to read or drop."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        conn.request(method, path, body=data, headers=headers)
        return conn, conn.getresponse()
    except BaseException:
        conn.close()  # a client that gives up hangs up
        raise


def http_json(server: ServerThread, method: str, path: str, body: bytes | dict | None = None,
              key: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one raw HTTP request."""
    conn, resp = raw_request(server, method, path, body, key)
    try:
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Decode the tiny model on one intra-op thread: on a shared 2-core machine two OpenMP threads spin against
    other processes and a tiny step gets ~10x slower. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def alone(ckpt, prompt_ids, max_tokens, adapter=None, stop=()) -> tuple[str, str]:
    """What `llmlab.generate.generate` gives for one prompt (with the adapter loaded the training way)."""
    model = load_checkpoint(ckpt).eval()
    if adapter is not None:
        load_adapter(model, adapter)
    tok = Tokenizer.from_folder(ckpt)
    out = generate(model, tok, [prompt_ids], max_tokens, stop=stop)[0]
    return out.text, out.finish_reason


def submit_all(engine, reqs) -> list[list[tuple[str, str]]]:
    """Submit every request while the engine is paused, so they are admitted into one batch; wait for all."""
    results: list = [None] * len(reqs)
    with engine.lock:
        threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, engine.generate(r, 60)))
                   for i, r in enumerate(reqs)]
        for t in threads:
            t.start()
        assert wait_for(lambda: engine.status()["waiting"] == len(reqs))
    for t in threads:
        t.join()
    return results
