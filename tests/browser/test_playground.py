"""The playground (``GET /playground``) in a real headless chromium against live servers with their API
keys on: each tab is driven as a person would (typing, clicking, painting with the mouse), and the code
each tab shows under "View code" is run as shown and must give what the page showed.

Every e2e model set serves the page; each test opens it on the set whose models its tab needs.
``GENSERVE_PLAYGROUND_SCREENSHOTS=DIR`` saves a screenshot of each tab there (docs/playground.md's).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import API_KEY, TEXT, Server, ServerSets, content

UPSTREAM_SETS = ("text", "image", "audio", "molecule")  # launched with the session's servers
PLAYGROUND_DIR = Path(__file__).resolve().parents[2] / "src" / "genserve" / "app" / "playground"
SCREENSHOTS = os.environ.get("GENSERVE_PLAYGROUND_SCREENSHOTS")
# An address outside this origin in a page asset: a scheme with a host, or a scheme-relative "//host".
EXTERNAL = re.compile(r"""(?i)\b(?:https?|wss?|ftp):|(?:["'(=\s])//[a-z0-9.-]+\.[a-z]{2,}""")


class Page:
    """The playground of one server in the shared browser."""

    def __init__(self, driver: Any, server: Server) -> None:
        self.d, self.server = driver, server

    def open(self, tab: str, key: str = API_KEY) -> Page:
        self.d.get(f"{self.server.url}/playground#{tab}")
        self.d.execute_script("sessionStorage.clear()")
        self.d.refresh()
        self.wait(lambda _: self.d.execute_script("return document.getElementById('key-dialog').open"))
        self.el("key-input").send_keys(key)
        self.el("key-save").click()
        return self

    def el(self, id_: str) -> Any:
        return self.d.find_element(By.ID, id_)

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def wait(self, condition: Any, timeout: float = 90) -> Any:
        return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(condition)

    def set(self, id_: str, value: object) -> None:
        field = self.el(id_)
        field.clear()
        field.send_keys(str(value))

    def choose(self, id_: str, value: str) -> None:
        def option(_: Any) -> Any:
            return next((o for o in Select(self.el(id_)).options if o.get_attribute("value") == value), None)
        self.wait(option).click()

    def run(self, button: str, error_slot: str, done: Any) -> None:
        """Clicks ``button`` and waits until ``done()`` holds or the tab shows an error (which fails)."""
        self.el(button).click()
        self.wait(lambda _: done() or self.error(error_slot))
        assert self.error(error_slot) == "", self.error(error_slot)

    def count(self, selector: str) -> int:
        return self.js(f"return document.querySelectorAll('{selector}').length")

    def code(self, slot: str, lang: str) -> str:
        return self.js(f"return document.querySelector('#{slot} pre[data-lang=\"{lang}\"] code').textContent")

    def error(self, slot: str) -> str:
        box = self.el(slot)
        return "" if box.get_attribute("hidden") is not None else box.text

    def shot(self, name: str) -> None:
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            self.d.save_screenshot(str(Path(SCREENSHOTS) / f"{name}.png"))


def run_shown(code: str, lang: str, cwd: Path) -> str:
    """Runs the code a tab shows, as a user who pasted it would, with the key in GENSERVE_API_KEY."""
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-c", code]
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, "GENSERVE_API_KEY": API_KEY}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"the {lang} code the page shows failed:\n{code}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def sets(server_sets: ServerSets) -> ServerSets:
    return server_sets


def test_every_served_asset_stays_on_this_origin(sets: ServerSets) -> None:
    server = sets.get("text")
    page = httpx.get(server.url + "/playground")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert httpx.head(server.url + "/playground").status_code == 200
    referenced = set(re.findall(r'(?:src|href)="([^"#]+)"', page.text))
    shipped = {f"static/playground/{p.name}" for p in PLAYGROUND_DIR.iterdir() if p.name != "index.html"}
    assert shipped <= referenced, "every shipped asset is loaded by the page"
    for path in sorted(referenced - {"docs"}):
        asset = httpx.get(f"{server.url}/{path}")
        assert asset.status_code == 200, path
        if not path.endswith(".png"):
            assert not EXTERNAL.search(asset.text), f"{path} names an outside address: {EXTERNAL.search(asset.text)}"
    assert not EXTERNAL.search(page.text)
    assert httpx.get(server.url + "/v1/models").status_code == 401, "the page is open, the API is not"


def test_a_wrong_key_shows_the_apis_message_and_asks_again(browser: Any, sets: ServerSets) -> None:
    page = Page(browser, sets.get("text")).open("chat", key="not-the-key")
    page.wait(lambda _: page.error("global-error"))
    assert page.error("global-error") == "Incorrect API key provided. [invalid_api_key]"
    assert page.js("return document.getElementById('key-dialog').open")
    page.el("key-input").clear()
    page.el("key-input").send_keys(API_KEY)
    page.el("key-save").click()
    page.choose("chat-model", TEXT)
    assert page.error("global-error") == ""
    requested = page.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert requested and all(u.startswith(page.server.url + "/") for u in requested), requested


def test_chat_streams_its_code_runs_as_shown_and_stop_stops_it(browser: Any, sets: ServerSets, tmp_path: Path) -> None:
    server = sets.get("text")
    page = Page(browser, server).open("chat")
    page.choose("chat-model", TEXT)
    page.set("chat-seed", 4)
    page.set("chat-max-tokens", 100)
    page.set("chat-min-tokens", 30)  # an answer long enough to watch it stream
    page.set("chat-input", "Tell me a long story.")
    page.js("""window.lengths = [];
      new MutationObserver(() => {
        const out = [...document.querySelectorAll('#chat-log .msg.assistant .text')].pop();
        if (out) window.lengths.push(out.textContent.length);
      }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});""")
    page.el("chat-send").click()
    page.wait(lambda _: "finish:" in page.el("chat-stats").text)
    stats = page.el("chat-stats").text
    assert "TTFT" in stats and "completion tokens" in stats and "finish: stop" in stats, stats
    lengths = [n for n in page.js("return window.lengths") if n]
    assert len(set(lengths)) >= 3, f"the answer arrived in one piece, not streamed: {lengths}"
    answer = page.js("return [...document.querySelectorAll('#chat-log .msg.assistant .text')].pop().textContent")
    assert answer
    page.js("document.querySelector('#chat-code details').open = true")
    page.shot("chat")
    # The Python the page shows streams the same answer (the page drew no seed: the field said 4).
    assert run_shown(page.code("chat-code", "python"), "python", tmp_path) == answer + "\n"

    # Stop, pressed from inside the page as soon as the first words show (a long completion).
    aborts = server.metric("genserve_request_success_total", model_name=TEXT, finished_reason="abort")
    tokens = server.metric("genserve_generation_tokens_total", model_name=TEXT)
    page.el("chat-clear").click()
    page.d.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="completions"]').click()
    page.set("chat-max-tokens", 480)
    page.set("chat-min-tokens", 480)
    page.set("chat-input", "The json module")
    page.js("""new MutationObserver((_, observer) => {
        const out = [...document.querySelectorAll('#chat-log .msg.assistant .text')].pop();
        if (out && out.textContent) { window.shownAtStop = out.textContent.length; observer.disconnect();
          document.getElementById('chat-stop-button').click(); }
      }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});""")
    page.el("chat-send").click()
    page.wait(lambda _: "finish: stopped by you" in page.el("chat-stats").text)
    shown = page.js("return [...document.querySelectorAll('#chat-log .msg.assistant .text')].pop().textContent")
    deadline = time.monotonic() + 15
    while server.metric("genserve_request_success_total", model_name=TEXT, finished_reason="abort") <= aborts:
        assert time.monotonic() < deadline, "the server never aborted the stopped request"
        time.sleep(0.05)
    generated = server.metric("genserve_generation_tokens_total", model_name=TEXT) - tokens
    assert generated < 480, f"{generated} tokens generated: the stop did not stop the engine"
    assert page.js("return [...document.querySelectorAll('#chat-log .msg.assistant .text')].pop().textContent") == shown
    assert len(shown) == page.js("return window.shownAtStop") and page.el("chat-send").is_enabled()

    # A flagged prompt: the page shows moderation's message, which names the categories.
    page.d.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="chat"]').click()
    page.set("chat-input", "I am going to kill you tomorrow, you will not see it coming.")
    page.el("chat-send").click()
    page.wait(lambda _: page.error("chat-error"))
    message = page.error("chat-error")
    assert "rejected by genserve's moderation" in message and "violence" in message
    assert "content_policy_violation" in message


def _image_srcs(page: Page, grid: str) -> list[str]:
    return page.js(f"return [...document.querySelectorAll('#{grid} figure img')].map(i => i.src)")


def test_images_stream_progress_and_a_reused_seed_gives_the_same_picture(browser: Any, sets: ServerSets,
                                                                        tmp_path: Path) -> None:
    page = Page(browser, sets.get("image")).open("images")
    page.choose("images-model", "genserve-diffusion")
    page.set("images-prompt", "red apple")
    page.set("images-n", 2)
    page.set("images-steps", 4)
    page.js("""window.statuses = [];
      new MutationObserver(() => window.statuses.push(document.getElementById('images-status').textContent))
        .observe(document.getElementById('images-status'), {childList: true, characterData: true, subtree: true});""")
    page.run("images-generate", "images-error", lambda: len(_image_srcs(page, "images-grid")) == 2)
    steps = [s for s in page.js("return window.statuses") if s.startswith("denoising step")]
    assert "denoising step 4 of 4" in steps, f"no progress from the stream: {page.js('return window.statuses')}"
    page.shot("images")
    first = _image_srcs(page, "images-grid")
    seeds = page.js("return [...document.querySelectorAll('#images-grid figure')].map(f => Number(f.dataset.seed))")
    assert seeds[1] == seeds[0] + 1 and all(s.startswith("data:image/png;base64,") for s in first)

    page.d.find_elements(By.CSS_SELECTOR, "#images-grid button.thumb")[1].click()  # reuse the second seed
    assert page.el("images-seed").get_attribute("value") == str(seeds[1])
    page.set("images-n", 1)
    page.el("images-generate").click()
    page.wait(lambda _: _image_srcs(page, "images-grid") != first and len(_image_srcs(page, "images-grid")) == 1)
    again = _image_srcs(page, "images-grid")[0]
    assert content(again.split(",", 1)[1]) == content(first[1].split(",", 1)[1]), "the reused seed drew another picture"

    run_shown(page.code("images-code", "python"), "python", tmp_path)
    assert content((tmp_path / "image-0.png").read_bytes()) == content(again.split(",", 1)[1])

    # An image that moderation's checker flags: the error event that ends the stream is shown.
    page.choose("images-model", "tiny-sd-flagged")
    page.set("images-steps", 2)
    page.el("images-generate").click()
    page.wait(lambda _: page.error("images-error"))
    assert page.error("images-error").startswith("Your request was rejected by genserve's moderation: a generated "
                                                 "image was flagged")


def test_an_inpainting_mask_painted_with_the_mouse_changes_only_that_region(browser: Any, sets: ServerSets) -> None:
    page = Page(browser, sets.get("image")).open("images")
    page.choose("images-model", "genserve-diffusion")
    page.set("images-prompt", "cat face")
    page.set("images-n", 1)
    page.set("images-steps", 4)
    page.set("images-seed", 11)
    page.run("images-generate", "images-error", lambda: len(_image_srcs(page, "images-grid")) == 1)
    page.d.find_element(By.XPATH, "//div[@id='images-grid']//button[text()='Edit']").click()
    page.wait(lambda _: page.js("return document.getElementById('inpaint-image').width") == 32)
    mask = page.el("inpaint-mask")
    ActionChains(page.d).move_to_element_with_offset(mask, -60, -20).click_and_hold() \
        .move_by_offset(60, 0).move_by_offset(60, 30).release().perform()
    painted = page.js("return document.getElementById('inpaint-mask').getContext('2d')"
                      ".getImageData(0, 0, 32, 32).data.filter((v, i) => i % 4 === 3 && v > 0).length")
    assert 30 < painted < 32 * 32 / 2, f"{painted} pixels painted"
    page.set("inpaint-seed", 3)
    page.set("inpaint-prompt", "rocket")
    page.run("inpaint-run", "inpaint-error", lambda: _image_srcs(page, "inpaint-result"))
    page.js("document.getElementById('inpaint-run').scrollIntoView()")
    page.shot("inpainting")
    changed = page.d.execute_async_script("""
      const done = arguments[arguments.length - 1];
      const before = document.getElementById('inpaint-image').getContext('2d').getImageData(0, 0, 32, 32).data;
      const mask = document.getElementById('inpaint-mask').getContext('2d').getImageData(0, 0, 32, 32).data;
      const img = new Image();
      img.onload = () => {
        const c = document.createElement('canvas'); c.width = 32; c.height = 32;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        const after = ctx.getImageData(0, 0, 32, 32).data;
        let inside = 0, outside = 0;
        for (let p = 0; p < 32 * 32; p++) {
          const differs = [0, 1, 2].some(k => before[p * 4 + k] !== after[p * 4 + k]);
          if (differs) { if (mask[p * 4 + 3] > 0) inside++; else outside++; }
        }
        done([inside, outside]);
      };
      img.src = document.querySelector('#inpaint-result img').src;""")
    inside, outside = changed
    assert outside == 0, f"{outside} pixels outside the painted mask changed"
    assert inside > painted // 4, f"only {inside} of {painted} painted pixels were redone"

    # The same brush from the keyboard: Space paints under the cursor, Shift+arrows paint along.
    page.el("inpaint-clear").click()
    mask.send_keys(Keys.SPACE)
    dab = page.js("return document.getElementById('inpaint-mask').getContext('2d')"
                  ".getImageData(0, 0, 32, 32).data.filter((v, i) => i % 4 === 3 && v > 0).length")
    mask.send_keys(Keys.SHIFT + Keys.ARROW_RIGHT + Keys.ARROW_RIGHT + Keys.ARROW_DOWN)
    stroke = page.js("return document.getElementById('inpaint-mask').getContext('2d')"
                     ".getImageData(0, 0, 32, 32).data.filter((v, i) => i % 4 === 3 && v > 0).length")
    assert 0 < dab < stroke, (dab, stroke)
    assert page.el("inpaint-cursor").is_displayed()


def test_latent_models_interpolate_to_frames_and_a_gif(browser: Any, sets: ServerSets) -> None:
    page = Page(browser, sets.get("image")).open("images")
    page.js("document.getElementById('interp').open = true")
    page.choose("interp-model", "genserve-gan")
    page.set("interp-frames", 4)
    page.run("interp-run", "interp-error", lambda: page.count("#interp-gif img") == 1)
    assert len(_image_srcs(page, "interp-frames-out")) == 4
    assert _image_srcs(page, "interp-gif")[0].startswith("data:image/gif;base64,R0lG")  # "GIF8"


def _blob_b64(page: Page, selector: str) -> str:
    return page.d.execute_async_script("""
      const done = arguments[arguments.length - 1];
      fetch(document.querySelector(arguments[0]).src).then(r => r.arrayBuffer()).then(b => {
        let s = ''; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); done(btoa(s));
      }).catch(e => done(`failed: ${e}`));""", selector)


def _duration(page: Page, selector: str) -> float:
    return page.d.execute_async_script("""
      const done = arguments[arguments.length - 1];
      const audio = document.querySelector(arguments[0]);
      if (audio.readyState >= 1) done(audio.duration);
      else audio.addEventListener('loadedmetadata', () => done(audio.duration));""", selector)


def test_speech_plays_in_the_page_and_music_draws_its_piano_roll(browser: Any, sets: ServerSets,
                                                                 tmp_path: Path) -> None:
    page = Page(browser, sets.get("audio")).open("audio")
    page.choose("speech-model", "genserve-speech")
    page.choose("speech-format", "wav")
    page.run("speech-run", "speech-error", lambda: page.count("#speech-out audio") == 1)
    assert 0.5 < _duration(page, "#speech-out audio") < 5
    run_shown(page.code("speech-code", "python"), "python", tmp_path)
    assert base64.b64encode((tmp_path / "speech.wav").read_bytes()).decode() == _blob_b64(page, "#speech-out audio")

    page.choose("music-model", "genserve-music")
    page.set("music-seconds", 3)
    page.set("music-seed", 7)
    page.run("music-run", "music-error", lambda: page.el("music-roll").get_attribute("data-notes"))
    assert int(page.el("music-roll").get_attribute("data-notes")) > 3
    assert 2.5 < _duration(page, "#music-out audio") < 3.5
    assert page.d.find_element(By.CSS_SELECTOR, '#music-out a[download="music.mid"]')
    page.shot("audio")


def test_molecules_render_as_svg_with_properties_sort_and_repeat_from_curl(browser: Any, sets: ServerSets,
                                                                          tmp_path: Path) -> None:
    page = Page(browser, sets.get("molecule")).open("molecules")
    page.choose("mol-model", "genserve-mol")
    page.set("mol-n", 6)
    page.set("mol-seed", 7)
    page.set("mol-qed-min", 0.3)
    page.run("mol-run", "mol-error", lambda: page.count("#mol-grid figure") == 6)
    figures = page.d.find_elements(By.CSS_SELECTOR, "#mol-grid figure")
    for fig in figures:
        assert fig.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/svg+xml")
        assert fig.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") != "0", "the SVG did not render"
        assert "QED" in fig.find_element(By.CSS_SELECTOR, "table.props").text
    order = page.js("return [...document.querySelectorAll('#mol-grid figure')].map(f => f.dataset.smiles)")
    assert "returned\n6" in page.el("mol-stats").text.replace(" ", "\n") or "returned 6" in page.el("mol-stats").text

    page.choose("mol-sort", "qed")
    page.choose("mol-order", "asc")
    qeds = [float(t) for t in page.js("return [...document.querySelectorAll('#mol-grid table.props tr:first-child "
                                      "td:last-child')].map(td => td.textContent)")]
    assert qeds == sorted(qeds) and min(qeds) >= 0.3
    page.shot("molecules")

    shown = json.loads(run_shown(page.code("mol-code", "curl"), "curl", tmp_path))
    assert [m["smiles"] for m in shown["data"]] == order
    printed = run_shown(page.code("mol-code", "python"), "python", tmp_path).splitlines()
    assert [line.split()[0] for line in printed[:6]] == order

    page.js("document.getElementById('props').open = true")
    page.run("props-run", "props-error", lambda: page.count("#props-out figure") == 3)
    assert "QED" in page.d.find_elements(By.CSS_SELECTOR, "#props-out figure")[0].text
    assert page.d.find_elements(By.CSS_SELECTOR, "#props-out figure .error")

    page.js("document.getElementById('molint').open = true")
    page.choose("molint-model", "genserve-mol-vae")
    page.set("molint-steps", 4)
    page.run("molint-run", "molint-error", lambda: page.count("#molint-out figure") == 4)


def test_embeddings_heatmap_matches_the_code_it_shows(browser: Any, sets: ServerSets, tmp_path: Path) -> None:
    page = Page(browser, sets.get("text")).open("embeddings")
    page.choose("emb-model", "all-minilm-l6-v2")
    page.run("emb-run", "emb-error", lambda: page.el("emb-matrix").is_displayed())
    cells = page.js("return [...document.querySelectorAll('#emb-matrix tr')].slice(1)"
                    ".map(r => [...r.querySelectorAll('td')].map(td => td.textContent))")
    assert len(cells) == 4 and all(row[i] == "1.00" for i, row in enumerate(cells))
    assert float(cells[0][1]) > float(cells[0][2]), "the two cat sentences are closer than cat and stocks"
    page.shot("embeddings")
    printed = [line.split() for line in run_shown(page.code("emb-code", "python"), "python", tmp_path).splitlines()]
    assert printed == cells

    # Six sentences on a phone: the heatmap scrolls inside its box, the page does not.
    page.set("emb-input", "\n".join(f"Sentence number {i} about something else." for i in range(6)))
    page.run("emb-run", "emb-error", lambda: page.count("#emb-matrix tr") == 7)
    page.d.set_window_size(390, 844)
    try:
        width = page.js("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the heatmap makes the page scroll sideways on a phone: {width}"
    finally:
        page.d.set_window_size(1280, 1000)


def test_tabs_work_from_the_keyboard_and_fit_a_phone(browser: Any, sets: ServerSets) -> None:
    page = Page(browser, sets.get("text")).open("chat")
    page.choose("chat-model", TEXT)
    page.el("tab-chat").send_keys(Keys.ARROW_RIGHT)
    assert page.el("tab-images").get_attribute("aria-selected") == "true"
    assert page.el("panel-images").is_displayed() and not page.el("panel-chat").is_displayed()
    assert page.d.switch_to.active_element == page.el("tab-images")
    page.el("tab-images").send_keys(Keys.END)
    assert page.el("panel-embeddings").is_displayed()
    unlabelled = page.js("""return [...document.querySelectorAll('input, select, textarea')]
        .filter(f => !(f.labels && f.labels.length) && !f.getAttribute('aria-label')).map(f => f.id)""")
    assert unlabelled == [], f"fields without a label: {unlabelled}"
    page.d.set_window_size(390, 844)
    try:
        for tab in ("chat", "images", "audio", "molecules", "embeddings"):
            page.el(f"tab-{tab}").click()
            width = page.js("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], f"the {tab} tab scrolls sideways on a phone: {width}"
    finally:
        page.d.set_window_size(1280, 1000)
