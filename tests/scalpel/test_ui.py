"""The dashboard at /ui, driven in a real headless Chromium (the system's, through Selenium).

A tiny base with one adapter in two versions (v2 live, with a gate evaluation as `scalpel update` records it),
an update log, and `scalpel serve`'s own app (scalpel.serve.build) on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from core import adapter_store, model_store, paths
from core.job_store import Job, JobStore
from scalpel.demo import BackgroundServer
from scalpel.publish import publish_staged, read_training_data, stage_version, train_and_publish
from scalpel.serve import ServeSettings, build
from scalpel.ui.routes import ui_router
from serving.app import DEFAULT_ROUTERS, create_app
from serving.engine import Engine
from tests.tiny_models import registered_home
from training.config import parse_config

KEY = "sekret"
# SCALPEL_UI_SCREENSHOT=docs/dashboard.png refreshes the README's screenshot; otherwise it goes to a temp folder
SCREENSHOT_ENV = "SCALPEL_UI_SCREENSHOT"
EVAL_V2 = {
    "ref": "tiny_a@v2",
    "suites": {
        "greetings": {"name": "greetings", "accuracy": 1.0, "per_concept": {"greeting": 1.0}, "answers": []},
        "numbers": {"name": "numbers", "accuracy": 0.5, "per_concept": {"two": 1.0, "one": 0.0}, "answers": []},
    },
    "base_regression": {"agreement": 0.97, "perplexity_change": 0.012, "perplexity": 9.1},
    "retention": {"greetings": 1.0},
    "promoted": True,
    "reasons": [],
    "live_before": "tiny_a@v1",
}
EVAL_V3 = {  # a candidate the gates rejected: it is kept as a record, v2 stays live
    "ref": "tiny_a@v3",
    "suites": {
        "greetings": {"name": "greetings", "accuracy": 0.5, "per_concept": {"greeting": 0.5}, "answers": []},
        "numbers": {"name": "numbers", "accuracy": 1.0, "per_concept": {"two": 1.0, "one": 1.0}, "answers": []},
    },
    "base_regression": {"agreement": 0.91, "perplexity_change": 0.04, "perplexity": 9.5},
    "retention": {"greetings": 0.5, "numbers": 1.0},
    "promoted": False,
    "reasons": ["retention greetings: 50% of what the live version knew < 90%", "base agreement 91.0% < 95.0%"],
    "live_before": "tiny_a@v2",
}
UPDATES = [  # .scalpel/updates.jsonl as scalpel.update._record writes it, oldest first
    {
        "at": "2026-11-29T19:02:11+00:00",
        "adapter": "tiny_a",
        "version": "v2",
        "promoted": True,
        "reasons": [],
        "seconds": 41.0,
        "candidates": [{"version": "v2", "promoted": True, "reasons": []}],
        "suites": {"greetings": 1.0, "numbers": 0.5},
        "base_agreement": 0.97,
    },
    {
        "at": "2026-11-30T19:00:05+00:00",
        "adapter": "tiny_a",
        "version": "v3",
        "promoted": False,
        "reasons": EVAL_V3["reasons"],
        "seconds": 38.5,
        "candidates": [{"version": "v3", "promoted": False, "reasons": EVAL_V3["reasons"]}],
        "suites": {"greetings": 0.5, "numbers": 1.0},
        "base_agreement": 0.91,
    },
]


def _browser_paths() -> tuple[str, str]:
    chromium = next(
        (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None
    )
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "no headless browser: the dashboard tests need chromium and chromedriver on PATH "
            "(Debian: apt-get install -y chromium chromium-driver; scripts/setup.sh does it as root)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("home"), tiny_llama) as home:
        config = parse_config(
            {
                "model_name": "tiny",
                "output_dir": "adapters/tiny_a",
                "training_config": {"num_epochs": 2, "learning_rate": 5e-2, "save_steps": 1000},
            }
        )
        first, second = home / "d.json", home / "e.json"
        first.write_text(json.dumps([{"instruction": "hi", "output": "FOR TWO"}] * 4))
        second.write_text(json.dumps([{"instruction": "hi", "output": "never 2 1"}] * 4))
        train_and_publish(config, first, progress=False)
        # v2 is gated as `scalpel update` gates a candidate: its evaluation goes into the manifest before publishing
        for evaluation in (EVAL_V2, EVAL_V3):
            with stage_version(config, read_training_data(second), progress=False) as staged:
                staged.manifest.eval = evaluation
                publish_staged(staged, activate=evaluation["promoted"])
        paths.state_dir().mkdir(parents=True, exist_ok=True)
        (paths.state_dir() / "updates.jsonl").write_text("".join(json.dumps(u) + "\n" for u in UPDATES))
        yield home


def _live() -> str | None:
    return adapter_store.active_version(adapter_store.root_for_name("tiny_a"))


def _serve(**settings):
    return build(ServeSettings(_env_file=None, model="tiny", **settings))


def _wait(browser, condition, timeout: float = 30):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the page re-renders on every poll: an element found a moment ago may be gone, so look again
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(browser, timeout, ignored_exceptions=ignored).until(condition)


def _click(browser, selector: str) -> None:
    """Click what `selector` finds, looking again if the page re-rendered it between finding and clicking."""

    def clicked(d) -> bool:
        d.find_element("css selector", selector).click()
        return True

    _wait(browser, clicked)


def _loaded(browser):
    _wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded") == "yes")


def _accept_confirm(browser):
    from selenium.webdriver.support import expected_conditions

    _wait(browser, expected_conditions.alert_is_present(), 10).accept()


def _screenshot(browser, tmp_path: Path) -> Path:
    """The whole page, top first, as a PNG."""
    target = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
    browser.execute_script("window.scrollTo(0, 0)")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(max(height, 900), 2400))
    target.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(target))
    browser.set_window_size(1280, 900)
    assert target.read_bytes().startswith(b"\x89PNG")
    return target


def _reply(root: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    resp = httpx.post(f"{root}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def test_page_is_ours_and_offline(home):
    """Every asset comes from the server; the state needs the client key; plots are served by name only."""
    engine, app = _serve(api_keys=frozenset({KEY}))
    try:
        with BackgroundServer(app) as server:
            root = server.base_url.removesuffix("/v1")
            page = httpx.get(f"{root}/ui")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert "http://" not in page.text and "https://" not in page.text
            for asset in ("app.js", "style.css"):
                text = httpx.get(f"{root}/ui/static/{asset}").text
                assert "https://" not in text and "@import" not in text and "url(" not in text
            assert httpx.get(f"{root}/ui/static/..%2Froutes.py").status_code == 404
            assert httpx.get(f"{root}/ui/api/state").status_code == 401
            auth = {"Authorization": f"Bearer {KEY}"}
            state = httpx.get(f"{root}/ui/api/state", headers=auth).json()
            [adapter] = state["adapters"]
            assert adapter["live"] == "v2" and [v["parent_version"] for v in adapter["versions"]] == [None, "v1", "v2"]
            assert "loss.png" in adapter["versions"][0]["plots"]
            png = httpx.get(f"{root}/ui/api/adapters/tiny_a/v1/plots/loss.png", headers=auth)
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            for bad in (
                "tiny_a/v1/plots/manifest.json",
                "tiny_a/v9/plots/loss.png",
                "..%2F..%2Fmodels/v1/plots/loss.png",
            ):
                assert httpx.get(f"{root}/ui/api/adapters/{bad}", headers=auth).status_code in (400, 404), bad
    finally:
        engine.close()


def test_live_version_marked_and_rollback_from_the_page(home, browser, tmp_path):
    from selenium.webdriver.common.by import By

    engine, app = _serve(api_keys=frozenset({KEY}))
    try:
        with BackgroundServer(app) as server:
            root = server.base_url.removesuffix("/v1")
            browser.get(f"{root}/ui")
            # Without the key the page reads nothing, and says why.
            _wait(browser, lambda d: "401" in d.find_element(By.ID, "status").text)
            browser.find_element(By.ID, "key").send_keys(KEY)
            browser.find_element(By.ID, "key-save").click()
            _loaded(browser)
            live = browser.find_elements(By.CSS_SELECTOR, 'tr[data-adapter="tiny_a"][data-live="true"]')
            assert [row.get_attribute("data-version") for row in live] == ["v2"]
            assert "live" in live[0].find_element(By.CLASS_NAME, "live-badge").text
            rejected = browser.find_element(By.CSS_SELECTOR, 'tr[data-version="v3"]')
            assert "rejected" in rejected.text and "v1 → v2 → v3" in rejected.text  # kept, with its lineage
            assert browser.find_elements(By.CSS_SELECTOR, 'svg[data-heatmap="tiny_a"] rect[data-cell="v2:numbers"]')
            assert "retention greetings: 50%" in browser.find_element(By.ID, "updates").text
            assert "tiny" in browser.find_element(By.CSS_SELECTOR, 'tr[data-base="tiny"]').text

            # One version's scores and plots, drawn from the store through the key.
            live[0].find_element(By.CLASS_NAME, "version-link").click()
            _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#detail img[data-plot="loss.png"]'))
            _wait(browser, lambda d: d.execute_script("return [...document.images].every(i => i.naturalWidth > 0)"))
            assert "base agreement 97%" in browser.find_element(By.ID, "detail").text

            _screenshot(browser, tmp_path)
            # The first version was published live with no gate: the page says so, with its general questions.
            browser.find_element(By.CSS_SELECTOR, 'tr[data-version="v1"] .version-link').click()
            _wait(browser, lambda d: "first version: published live" in d.find_element(By.ID, "detail").text)
            assert "general questions" in browser.find_element(By.ID, "detail").text

            # The chat playground, on the live adapter.
            browser.find_element(By.ID, "chat-model").send_keys("tiny_a")
            browser.find_element(By.ID, "chat-input").send_keys("hi")
            browser.find_element(By.ID, "chat-send").click()
            _wait(browser, lambda d: "tiny_a:" in d.find_element(By.CSS_SELECTOR, "#chat-log .assistant").text, 60)

            # Rollback from the page: the live pointer moves, and so does what the name serves.
            assert _reply(root, "tiny_a") == _reply(root, "tiny_a@v2") != _reply(root, "tiny_a@v1")
            _click(browser, '[data-adapter-card="tiny_a"] button.rollback')
            _accept_confirm(browser)
            _wait(browser, lambda d: "v2 → v1" in d.find_element(By.CSS_SELECTOR, '[data-result-for="tiny_a"]').text)
            auth = {"Authorization": f"Bearer {KEY}"}
            assert httpx.get(f"{root}/api/adapters/tiny_a", headers=auth).json()["active_version"] == "v1"
            assert _live() == "v1"
            assert _reply(root, "tiny_a") == _reply(root, "tiny_a@v1")
            models = {m["id"] for m in httpx.get(f"{server.base_url}/models", headers=auth).json()["data"]}
            assert {"tiny_a", "tiny_a@v1", "tiny_a@v2"} <= models
            _wait(
                browser,
                lambda d: (
                    [
                        r.get_attribute("data-version")
                        for r in d.find_elements(By.CSS_SELECTOR, 'tr[data-adapter="tiny_a"][data-live="true"]')
                    ]
                    == ["v1"]
                ),
            )

            # And promote v2 back, from its row.
            _click(browser, 'tr[data-version="v2"] button.promote')
            _accept_confirm(browser)
            _wait(browser, lambda d: "v1 → v2" in d.find_element(By.CSS_SELECTOR, '[data-result-for="tiny_a"]').text)
            assert _live() == "v2"
    finally:
        engine.close()


def test_page_refuses_admin_actions_without_the_key(home, browser):
    """Beyond loopback without keys, reading is open and admin routes answer 401: the page shows it."""
    from selenium.webdriver.common.by import By

    engine, app = _serve(host="0.0.0.0")  # the app's rule for that host; the test server binds 127.0.0.1
    try:
        with BackgroundServer(app) as server:
            root = server.base_url.removesuffix("/v1")
            assert httpx.post(f"{root}/api/adapters/tiny_a/rollback", json={}).status_code == 401
            browser.get(f"{root}/ui")
            browser.execute_script("sessionStorage.clear()")
            browser.refresh()
            _loaded(browser)
            assert "read-only" in browser.find_element(By.ID, "key-state").text
            _click(browser, '[data-adapter-card="tiny_a"] button.rollback')
            _accept_confirm(browser)
            _wait(browser, lambda d: "admin key" in d.find_element(By.ID, "status").text)
            shown = browser.execute_script(
                "return [document.querySelector('[data-result-for=\"tiny_a\"]').textContent,"
                ' [...document.querySelectorAll(\'tr[data-adapter="tiny_a"][data-live="true"]\')]'
                ".map(r => r.dataset.version)]"
            )
            assert "refused: 401" in shown[0] and shown[1] == ["v2"]
            assert _live() == "v2"
    finally:
        engine.close()


def test_client_key_reads_and_admin_key_acts(home, browser):
    """With client and admin keys apart, a client key shows the page but promote/rollback answer 403."""
    from selenium.webdriver.common.by import By

    from serving.settings import AppSettings

    if "admin_keys" not in AppSettings.model_fields:
        pytest.skip("this server has one key role (no admin_keys setting)")
    engine, app = _serve(api_keys=frozenset({"reader"}), admin_keys=frozenset({KEY}))
    try:
        with BackgroundServer(app) as server:
            browser.get(f"{server.base_url.removesuffix('/v1')}/ui")
            browser.find_element(By.ID, "key").send_keys("reader")
            browser.find_element(By.ID, "key-save").click()
            _loaded(browser)
            _click(browser, '[data-adapter-card="tiny_a"] button.rollback')
            _accept_confirm(browser)
            _wait(
                browser, lambda d: "refused: 403" in d.find_element(By.CSS_SELECTOR, '[data-result-for="tiny_a"]').text
            )
            assert "admin key" in browser.find_element(By.ID, "status").text and _live() == "v2"
            browser.find_element(By.ID, "key").send_keys(KEY)
            browser.find_element(By.ID, "key-save").click()
            _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-adapter-card="tiny_a"] button.rollback'))
            _click(browser, '[data-adapter-card="tiny_a"] button.rollback')
            _accept_confirm(browser)
            _wait(browser, lambda d: "v2 → v1" in d.find_element(By.CSS_SELECTOR, '[data-result-for="tiny_a"]').text)
            assert _live() == "v1"
            adapter_store.promote("tiny_a", "v2")  # as the other tests expect it
    finally:
        engine.close()


def test_running_job_draws_a_live_loss_chart(home, browser, tmp_path):
    from selenium.webdriver.common.by import By

    store = JobStore(tmp_path / "jobs.db")
    job = Job(
        id="job-ui1",
        kind="training",
        status="running",
        model="tiny",
        adapter="tiny_a",
        config={},
        training_file="d.json",
    )
    store.create(job)
    for step, loss in enumerate([2.5, 2.1, 1.7], start=1):
        store.add_event(job.id, f"step {step}", type="metrics", data={"step": step, "max_steps": 8, "loss": loss})
    engine = Engine(model_store.get("tiny"))
    try:
        app = create_app(engine, routers=(*DEFAULT_ROUTERS, ui_router(store)))
        with BackgroundServer(app) as server:
            browser.get(f"{server.base_url.removesuffix('/v1')}/ui")
            _loaded(browser)
            chart = _wait(
                browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'svg[data-loss-chart="job-ui1"] polyline')
            )
            assert len(chart[0].get_attribute("points").split()) == 3
            assert "3/8" in browser.find_element(By.CSS_SELECTOR, 'tr[data-job="job-ui1"]').text
            # the page polls while a job runs: a new step shows up without a reload
            store.add_event(job.id, "step 4", type="metrics", data={"step": 4, "max_steps": 8, "loss": 1.2})
            _wait(
                browser,
                lambda d: (
                    len(
                        d.find_element(By.CSS_SELECTOR, 'svg[data-loss-chart="job-ui1"] polyline')
                        .get_attribute("points")
                        .split()
                    )
                    == 4
                ),
                15,
            )
    finally:
        engine.close()
