"""The explorer notebook in a real browser: JupyterLab + headless system chromium.

Run All on an empty cache (the widget, its "Computing ..." status and its progress bar must be
on screen within seconds of the explorer's cell starting, long before the figures), then every
control clicked (or typed into) like a user, then an interrupt from JupyterLab's toolbar. After
each step the figures must carry the same setting tag as the status line, the tag must say what
the control now says, a view-only change must say it redrew (no compute time of its own), and
the page must show no widget errors. Screenshots go to $DRIFT_SCREENSHOTS or tests/.browser-screens.

    .venv/bin/python -m pytest tests/test_browser.py -m browser
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from _browser import CONSOLE_IGNORED, Lab, copy_notebook, make_driver, missing_tools, screens_dir

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE.parent / "notebooks" / "01_explore.ipynb"

pytestmark = pytest.mark.browser

# One snapshot of the explorer's DOM contract (see drift/widgets.py).
STATE_JS = r"""
const root = document.querySelector('.drift-explorer');
if (!root) return {root: false, text: document.body.innerText.slice(0, 20000)};
const span = root.querySelector('.drift-status .drift-state');
const fig = root.querySelector('.drift-figures');
const render = fig && fig.querySelector('.drift-render');
const imgs = fig ? [...fig.querySelectorAll('img')] : [];
const fams = root.querySelector('.drift-families select');
return {
  root: true,
  state: span && span.getAttribute('data-drift-state'),
  status_tag: span && span.getAttribute('data-drift-setting'),
  status_text: span && span.innerText,
  render_tag: render && render.getAttribute('data-drift-setting'),
  request: render && render.getAttribute('data-drift-request'),
  caption: render && render.querySelector('.drift-caption') && render.querySelector('.drift-caption').innerText,
  imgs: imgs.map(i => ({cls: i.className, alt: i.alt, tag: i.getAttribute('data-drift-setting'),
                        w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,
                        png: (i.getAttribute('src') || '').startsWith('data:image/png;base64,')})),
  foreign: !fig ? ['no .drift-figures'] : (() => {
      const content = fig.querySelector('.widget-html-content') || fig;   // skip the widget's hidden label
      const out = [...content.children].filter(e => !e.matches('.drift-render'));
      if (render) out.push(...[...render.querySelectorAll('*')].filter(e => !e.matches('img.drift-figure, br, .drift-caption, .drift-caption code')));
      return out.map(e => e.outerHTML.slice(0, 200));
  })(),
  progress_imgs: [...root.querySelectorAll('.drift-progress img')].length,
  bar_visible: (() => {
      const bar = root.querySelector('.drift-progress .widget-hprogress');
      return !!bar && getComputedStyle(bar).visibility === 'visible';
  })(),
  // the bar's own (empty) description is a .widget-label too
  bar_text: [...root.querySelectorAll('.drift-progress .widget-label')].map(e => e.innerText.trim()).join(' ').trim(),
  value_shown: [...root.querySelectorAll('.drift-value button.mod-active')].map(b => b.innerText.trim()),
  families: fams ? [...fams.options].filter(o => o.selected).map(o => o.value || o.text) : null,
  text: document.body.innerText.slice(0, 50000),
  errors: [...document.querySelectorAll('[data-mime-type="application/vnd.jupyter.error"]')].map(e => e.innerText.slice(0, 2000)),
};
"""


# Whether the code cell before the explorer's has finished (Run All queues every cell at once,
# so this is when the explorer's cell starts).
BEFORE_EXPLORER_DONE_JS = r"""
const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
const i = cells.findIndex(c => (c.querySelector('.jp-InputArea-editor') || {}).innerText?.includes('Explorer('));
if (i < 1) return null;
return /\[\d+\]/.test(cells[i - 1].querySelector('.jp-InputPrompt').innerText);
"""


@pytest.fixture(scope="module")
def tools():
    missing = missing_tools()
    if missing:
        reason = "browser test needs " + ", ".join(missing)
        print(reason)
        pytest.skip(reason)


@pytest.fixture()
def lab(tools, tmp_path):
    root, cache, home = tmp_path / "root", tmp_path / "cache", tmp_path / "home"
    for d in (root, cache, home):
        d.mkdir()
    lab = Lab(root, cache, home)
    lab.notebook = copy_notebook(NOTEBOOK, root)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


@pytest.fixture()
def driver(lab):
    d = make_driver()
    try:
        yield d
    finally:
        d.quit()


class Page:
    def __init__(self, driver, lab, shots: Path):
        self.d, self.lab, self.shots, self.n = driver, lab, shots, 0
        self.console: list[dict] = []

    def state(self) -> dict:
        return self.d.execute_script(STATE_JS)

    def wait(self, cond, timeout: float, what: str):
        t_end, last = time.monotonic() + timeout, None
        while time.monotonic() < t_end:
            last = self.state()
            if cond(last):
                return last
            time.sleep(0.25)
        self.shot(f"timeout-{what}")
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last state: "
                    f"{ {k: v for k, v in (last or {}).items() if k != 'text'} }\n"
                    f"server log:\n{self.lab.log_tail()}")

    def kernel_idle(self, timeout: float = 240) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            ks = self.lab.kernels()
            busy = self.d.execute_script(
                "return [...document.querySelectorAll('.jp-InputPrompt')].some(p => p.innerText.includes('*'))")
            if ks and all(k["execution_state"] == "idle" for k in ks) and not busy:
                return
            time.sleep(0.5)
        self.shot("timeout-kernel-idle")
        pytest.fail(f"kernel not idle within {timeout:.0f} s: {self.lab.kernels()}")

    def shot(self, name: str) -> None:
        self.n += 1
        with_root = self.d.find_elements("css selector", ".drift-explorer")
        if with_root:
            self.d.execute_script("arguments[0].scrollIntoView({block: 'start'})", with_root[0])
        self.d.save_screenshot(str(self.shots / f"{self.n:02d}-{name}.png"))

    def drain_console(self) -> None:
        self.console += self.d.get_log("browser")

    def click(self, css: str, text: str | None = None, timeout: float = 10):
        t_end = time.monotonic() + timeout
        while True:
            for e in self.d.find_elements("css selector", css):
                if (text is None or e.text.strip() == text) and e.is_displayed():
                    self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", e)
                    e.click()
                    return e
            if time.monotonic() > t_end:
                self.shot("missing-element")
                pytest.fail(f"no element {css!r} with text {text!r}")
            time.sleep(0.2)


def parse(tag: str) -> dict:
    model, block, method, pairs, value, space, other, fams = tag.split("|")
    lo, hi = (int(x) for x in block.split("-"))
    return {"model": model, "block": (lo, hi), "method": method, "pairs": pairs, "value": value,
            "space": space, "other": other, "families": fams.split(",") if fams else []}


def check_caption(s: dict, where: str) -> None:
    """The figures' caption names the setting of the figures (their tag), in words."""
    t = parse(s["render_tag"])
    lo, hi = t["block"]
    models = t["model"] + (f" vs {t['other']}" if t["other"] else "")
    method = t["method"] or "activations (the method does not apply)"
    want = f"Figures of {models}, layers {lo}–{hi}, {method}, {t['pairs']} pairs."
    assert s["caption"] == want, f"{where}: caption {s['caption']!r}, figures {s['render_tag']!r}"


def check_consistent(s: dict, where: str) -> None:
    assert s["root"], f"{where}: no .drift-explorer on the page"
    for bad in ("Error displaying widget", "model not found"):
        assert bad not in s["text"], f"{where}: page shows {bad!r}"
    assert not s["errors"], f"{where}: tracebacks on the page: {s['errors']}"
    assert s["state"] == "done", f"{where}: status state {s['state']!r}: {s['status_text']!r}"
    assert s["render_tag"] == s["status_tag"], f"{where}: stale figures {s['render_tag']!r} vs status {s['status_tag']!r}"
    imgs = s["imgs"]
    assert imgs, f"{where}: no figures"
    assert not s["foreign"], f"{where}: foreign output in the figures: {s['foreign']}"
    assert not s["progress_imgs"], f"{where}: figures in the progress area"
    for i in imgs:
        assert i["cls"] == "drift-figure" and i["png"], f"{where}: not a drift figure: {i}"
        assert i["tag"] == s["status_tag"], f"{where}: figure {i['alt']} shows {i['tag']!r}, status {s['status_tag']!r}"
        assert i["complete"] and i["w"] > 0 and i["h"] > 0, f"{where}: figure {i['alt']} not drawn: {i}"
    alts = [i["alt"] for i in imgs]
    want = ["ranking", "diagonal_along" if parse(s["status_tag"])["other"] else "drift_along", "heatmaps"]
    assert alts == want or alts == ["ranking", "heatmaps"], f"{where}: figures {alts}"
    check_caption(s, where)
    lo, hi = parse(s["status_tag"])["block"]
    if hi > lo:  # a block of two or more layers always has consecutive pairs
        assert alts == want, f"{where}: figures {alts}, expected {want}"


def test_explorer_in_jupyterlab(lab, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    t0 = time.monotonic()
    page = Page(driver, lab, screens_dir(HERE / ".browser-screens"))
    driver.get(lab.url(lab.notebook))
    page.wait(lambda s: driver.execute_script(
        "return !!document.querySelector('.jp-NotebookPanel .jp-Cell')"
        " && !!document.querySelector('.jp-NotebookPanel-toolbar')"), 90, "the notebook to open")
    # A kernel-choice dialog appears only when the kernelspec is unknown; accept its default.
    for b in driver.find_elements("css selector", ".jp-Dialog .jp-mod-accept"):
        b.click()
    page.wait(lambda s: lab.kernels() and lab.kernels()[0]["execution_state"] == "idle", 60, "the kernel to start")

    # Run → Run All Cells (menu items carry no command id in the DOM; matched by label).
    page.click(".lm-MenuBar-item", "Run")
    page.click('.lm-Menu .lm-Menu-itemLabel', "Run All Cells")
    # The cache is empty: the first result is computed. The widget must be on screen, saying
    # what it computes, with its progress bar, long before the figures come.
    t_cell = t_widget = first = None
    progress_seen = set()
    t_end = time.monotonic() + 240
    while time.monotonic() < t_end:
        now, s = time.monotonic(), page.state()
        if t_cell is None and driver.execute_script(BEFORE_EXPLORER_DONE_JS):
            t_cell = now
        if s["root"] and first is None:
            t_widget, first = now, s
            page.shot("run-all-first-frame")
        if s["root"] and s["state"] == "running" and s["bar_text"]:
            progress_seen.add(s["bar_text"])
        if s["root"] and s["state"] in ("done", "error", "interrupted"):
            break
        time.sleep(0.25)
    else:
        page.shot("timeout-run-all")
        pytest.fail(f"no first result within 240 s; first frame {first and {k: v for k, v in first.items() if k != 'text'}}")
    t_done = now
    assert t_cell is not None, "never saw the cell before the explorer's finish"
    print(f"Run All: explorer cell started at {t_cell - t0:.1f} s, widget at {t_widget - t0:.1f} s, "
          f"figures at {t_done - t0:.1f} s; progress seen {sorted(progress_seen)}")
    assert first["state"] == "running" and not first["imgs"], \
        f"the first frame of the explorer is not a running one without figures: {first['state']!r}, {len(first['imgs'])} figures"
    assert first["status_text"].startswith("Computing minilm, layers 0–5, exact, all pairs"), first["status_text"]
    assert first["bar_visible"], "no progress bar while the first result is computed"
    assert t_widget - t_cell < 10, f"the widget came {t_widget - t_cell:.1f} s after its cell started"
    counts = [tuple(map(int, m.groups())) for t in progress_seen if (m := re.fullmatch(r"(\d+)/(\d+) pairs", t))]
    assert any(0 < done < total for done, total in counts), f"the bar never moved: {sorted(progress_seen)}"
    page.kernel_idle(240)
    s = page.wait(lambda s: s.get("state") in ("done", "error", "interrupted"), 30, "the explorer's first result")
    page.shot("run-all")
    check_consistent(s, "after Run All")
    assert not s["bar_visible"], "the progress bar stays after the first result"
    assert "result computed in" in s["status_text"], s["status_text"]
    print(f"Run All done in {time.monotonic() - t0:.0f} s; tag {s['status_tag']}")

    def step(name: str, act, expect, view_only: bool = False) -> dict:
        before = page.state()["status_tag"]
        act()
        s = page.wait(lambda s: s.get("state") == "done" and s["status_tag"] != before
                      and s["render_tag"] == s["status_tag"], 90, f"a new result after {name}")
        page.shot(name)
        check_consistent(s, name)
        tag = parse(s["status_tag"])
        assert expect(tag), f"{name}: tag {s['status_tag']!r} does not reflect the change"
        # A view-only change redraws the result it has: no compute time is claimed for it.
        redrawn = "redrawn in" in s["status_text"] and not re.search(r"(computed|cache) in", s["status_text"])
        assert redrawn == view_only, f"{name}: status {s['status_text']!r}"
        return s

    for m in ("rotation", "raw", "exact"):
        step(f"method-{m}", lambda m=m: page.click(".drift-method button", m), lambda t, m=m: t["method"] == m)
    step("pairs-consecutive", lambda: page.click(".drift-pairs button", "consecutive"),
         lambda t: t["pairs"] == "consecutive")

    def type_other(text: str) -> None:  # the second model's box commits on Enter
        box = driver.find_element("css selector", ".drift-other input")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text + Keys.ENTER if text else Keys.ENTER)

    # MiniLM against itself: layer i of A vs layer i of B, the diagonal (cheap: 6 pairs).
    step("other-minilm", lambda: type_other("minilm"),
         lambda t: t["other"] == "minilm" and t["pairs"] == "diagonal" and t["space"] == "weights")
    step("other-none", lambda: type_other(""), lambda t: t["other"] == "" and t["pairs"] == "consecutive")
    hi0 = parse(page.state()["status_tag"])["block"][1]

    def key_on(handle_css: str, key):
        h = driver.find_element("css selector", handle_css)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", h)
        h.click()
        h.send_keys(key)

    step("block-hi-left", lambda: key_on(".drift-block .noUi-handle-upper", Keys.ARROW_LEFT),
         lambda t: t["block"][1] == hi0 - 1)
    step("block-hi-right", lambda: key_on(".drift-block .noUi-handle-upper", Keys.ARROW_RIGHT),
         lambda t: t["block"][1] == hi0)
    step("pairs-all", lambda: page.click(".drift-pairs button", "all"), lambda t: t["pairs"] == "all")
    step("value-residual", lambda: page.click(".drift-value button", "residual"), lambda t: t["value"] == "residual",
         view_only=True)
    step("value-rho", lambda: page.click(".drift-value button", "ρ"), lambda t: t["value"] == "rho", view_only=True)

    def disabled(name: str) -> bool:
        return driver.execute_script(
            f"return [...document.querySelectorAll('.drift-{name} button')].every(b => b.disabled)")

    step("space-activations", lambda: page.click(".drift-space button", "activations"),
         lambda t: t["space"] == "activations" and t["method"] == "" and t["value"] == "residual")
    assert disabled("method") and disabled("value"), "method / value controls enabled for activations"
    shown = page.state()["value_shown"]  # what the heatmaps draw: activations have no null, no ρ
    assert shown == ["residual"], f"the heatmap toggle shows {shown} for activations"
    step("space-weights", lambda: page.click(".drift-space button", "weights"),
         lambda t: t["space"] == "weights" and t["method"] == "exact" and t["value"] == "rho")
    assert not disabled("method") and not disabled("value")
    assert page.state()["value_shown"] == ["ρ"], "the weights' heatmap value did not come back"

    opts = driver.find_elements("css selector", ".drift-families select option")
    assert len(opts) >= 2, "too few families"
    all_fams = parse(page.state()["status_tag"])["families"]
    victim = opts[1]
    name = victim.get_attribute("value") or victim.text

    def ctrl_click(e):
        ActionChains(driver).key_down(Keys.CONTROL).click(e).key_up(Keys.CONTROL).perform()

    s = step("families-deselect", lambda: ctrl_click(victim), lambda t: len(t["families"]) == len(all_fams) - 1,
             view_only=True)
    assert parse(s["status_tag"])["families"] == [f for f in all_fams if f != all_fams[1]], s["status_tag"]
    step("families-reselect", lambda: ctrl_click(victim), lambda t: t["families"] == all_fams, view_only=True)

    # Interrupt: a block not computed yet (lower handle right: 1..hi, exact, all pairs) takes
    # well over a few seconds on the 6-layer MiniLM.
    cache = lab.cache_dir
    entries_before = sorted(p.name for p in cache.rglob("*.json"))
    prev = page.state()["status_tag"]
    key_on(".drift-block .noUi-handle-lower", Keys.ARROW_RIGHT)
    s = page.wait(lambda s: s.get("state") == "running", 30, "the slow setting to start")
    assert parse(s["status_tag"])["block"][0] == 1, s["status_tag"]
    time.sleep(1.0)
    page.click('.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"] jp-button, '
               '.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"] button, '
               '.jp-NotebookPanel-toolbar [data-command="notebook:interrupt-kernel"], '
               '.jp-NotebookPanel-toolbar [title^="Interrupt the kernel"]')
    s = page.wait(lambda s: s.get("state") != "running", 60, "the interrupt to land")
    page.shot("interrupted")
    assert s["state"] == "interrupted", f"state {s['state']!r}: {s['status_text']!r}"
    assert s["render_tag"] == prev and all(i["tag"] == prev for i in s["imgs"]), \
        f"figures changed on interrupt: {s['render_tag']!r}, expected {prev!r}"
    assert all(i["w"] > 0 for i in s["imgs"]) and len(s["imgs"]) >= 2
    check_caption(s, "interrupted")  # says the block the figures are of, not the slider's
    page.kernel_idle(30)
    entries_after = sorted(p.name for p in cache.rglob("*.json"))
    assert len(entries_after) <= len(entries_before) and set(entries_after) <= set(entries_before), \
        f"interrupted analysis left cache entries: {sorted(set(entries_after) - set(entries_before))}"

    page.drain_console()
    severe = [e for e in page.console if e.get("level") == "SEVERE"
              and not any(x in e.get("message", "") for x in CONSOLE_IGNORED)]
    assert not severe, "SEVERE browser console entries:\n" + "\n".join(e["message"] for e in severe)
    print(f"browser test done in {time.monotonic() - t0:.0f} s")
