"""The chat page at / in headless Chromium (Debian's package, driven by Python playwright): pick a model, type a
question, watch the answer stream in, equal to what the API returns."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _serve import (
    ServerThread,
    make_fixture,
    one_thread,  # noqa: F401  (a fixture, used through pytestmark)
    wait_for,
)

from llmlab.serve import load_engine
from llmlab.serve.api import create_app
from llmlab.serve.request import GenerationRequest
from llmlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser")
                             or "") if p and Path(p).is_file()), None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
KEY = "page-key"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed (dev extra)")
    if CHROMIUM is None:
        pytest.skip("no Chromium binary: install Debian's `chromium` package (make test does when run as root)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt, adapters = make_fixture(tmp_path_factory.mktemp("serve_page"))
    engine, tok = load_engine(ckpt, adapters, max_batch=4, max_seq_len=128)
    srv = ServerThread(create_app(engine, tok, "tiny", api_key=KEY))
    srv.engine, srv.tokenizer = engine, Tokenizer.from_folder(ckpt)
    yield srv
    srv.stop()
    engine.close()


def test_page_streams_an_answer_with_the_chosen_adapter(browser, server):
    page = browser.new_page()
    page.add_init_script(f"localStorage.setItem('llmlab-api-key', '{KEY}')")
    # record every text the answer bubble shows, to see it grow in pieces while streaming
    page.add_init_script("""
        window.__seen = [];
        new MutationObserver(() => {
            const a = document.querySelector('.assistant');
            if (a && window.__seen[window.__seen.length - 1] !== a.textContent) window.__seen.push(a.textContent);
        }).observe(document, {subtree: true, childList: true, characterData: true});
    """)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 3")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny", "alpha", "beta"]
    page.select_option("#model", "alpha")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "What does the cat say?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".assistant[data-state='done']", timeout=60_000)
    answer = page.text_content(".assistant")
    expected = server.engine.generate(GenerationRequest(
        server.tokenizer.encode_chat([{"role": "user", "content": "What does the cat say?"}]), 24, adapter="alpha"))
    assert answer == expected[0][0] and answer
    seen = page.evaluate("window.__seen")
    assert len(seen) > 2 and all(answer.startswith(s) for s in seen), "the answer should arrive in pieces"
    assert page.text_content(".user") == "What does the cat say?"
    assert wait_for(lambda: server.engine.status()["running"] == 0)
    page.close()


def test_page_shows_api_errors(browser, server):
    page = browser.new_page()
    page.add_init_script("localStorage.setItem('llmlab-api-key', 'wrong')")
    page.goto(server.url + "/")
    page.wait_for_selector(".error")
    assert "Incorrect API key" in page.text_content(".error")
    page.close()
