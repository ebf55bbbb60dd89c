"""Real browser checks (Debian's chromium driven by selenium): /docs and /redoc render offline, and the results
page shows a digits attribution as pictures beside each query, reached from the jobs page."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

from attrib import Client
from service.demo import ARCHITECTURE, train_digits_mlp
from tests.client.conftest import Served

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]
TOP_K = 5
WAIT_SECONDS = 30


def require_chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the browser tests must run)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Any) -> Any:
    """Wait until ``condition(driver)`` is truthy; elements replaced by a re-render meanwhile just mean 'not yet'."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver, WAIT_SECONDS, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    )
    return wait.until(condition)


def resources_outside(driver: Any, base_url: str) -> list[str]:
    """Resources the page loaded from anywhere but our server (the pages' CSP refuses them: Redoc's footer
    logo, say, is refused and never fetched, so a refused request is not counted)."""
    names = driver.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.responseStatus > 0).map(e => e.name)"
    )
    return [name for name in names if not name.startswith(base_url)]


def test_docs_render_offline_with_every_operation(served: Served, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{served.url}/docs")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) > 10)
    paths = {
        e.get_attribute("data-path") or e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert {"/v1/attributions", "/v1/datasets/{dataset_id}/examples", "/v1/jobs/{job_id}"} <= paths
    assert resources_outside(browser, served.url) == []

    browser.get(f"{served.url}/redoc")
    wait_for(browser, lambda d: "Queue an attribution" in d.find_element(By.TAG_NAME, "body").text)
    assert resources_outside(browser, served.url) == []
    if os.environ.get("ATTRIB_SCREENSHOT_DIR"):
        browser.save_screenshot(str(Path(os.environ["ATTRIB_SCREENSHOT_DIR"]) / "redoc.png"))


@pytest.fixture(scope="module")
def digits_attribution(served: Served) -> dict[str, Any]:
    """The demo's digits MLP behind a Flatten, so the datasets hold 8 × 8 images."""
    trained, data = train_digits_mlp()
    model = nn.Sequential(nn.Flatten(), *trained)
    architecture = [{"type": "flatten"}, *ARCHITECTURE["layers"]]
    with Client(served.url, served.key) as client:
        uploaded = client.upload_model(model, name="digits", architecture=architecture, loss="cross_entropy")
        train = client.upload_dataset(
            name="digits-train",
            inputs=data["train_x"].reshape(-1, 8, 8),
            targets=data["train_y"],
            ids=data["train_ids"],
        )
        queries = client.upload_dataset(
            name="digits-queries", inputs=data["test_x"].reshape(-1, 8, 8), targets=data["test_y"], ids=data["test_ids"]
        )
        attribution = client.attribute(uploaded, train, queries, top_k=TOP_K, measurement="margin")
        attribution.job.wait(progress=False, timeout=180)
        outliers = client.attribute(uploaded, train, mode="self", top_k=TOP_K)
        outliers.job.wait(progress=False, timeout=180)
        # the first page only: walking all of a self-influence ranking 5 rows a page is hundreds of requests
        most_unusual = [str(row.train_id) for row in islice(client.results(outliers, page_size=TOP_K), TOP_K)]
        expected = {direction: {} for direction in ("positive", "negative")}
        for direction, by_query in expected.items():
            for row in client.results(attribution, direction=direction):
                by_query.setdefault(str(row.query_id), []).append(str(row.train_id))
    return {
        "id": attribution.id,
        "expected": expected,
        "query_ids": [str(q) for q in data["test_ids"].tolist()],
        "self_id": outliers.id,
        "most_unusual": most_unusual,
    }


def open_with_key(browser: Any, served: Served, path: str) -> None:
    """Open a page with the key already in this tab's sessionStorage (as after typing it in once)."""
    browser.get(f"{served.url}/ui/jobs")
    browser.execute_script("sessionStorage.setItem('attrib-api-key', arguments[0])", served.key)
    browser.get(f"{served.url}{path}")


def canvas_is_a_picture(png: bytes) -> bool:
    """Non-blank: both ink and paper, and many grey levels (a drawn digit, not a flat box)."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    inner = pixels[2:-2, 2:-2]
    return bool(inner.std() > 30 and inner.min() < 100 and inner.max() > 200 and len(np.unique(inner)) > 4)


def test_results_page_shows_digits_beside_each_query(
    served: Served, browser: Any, digits_attribution: dict[str, Any], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    attribution_id = digits_attribution["id"]
    browser.get(f"{served.url}/ui/jobs")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_for(browser, lambda d: d.find_element(By.ID, "key-form").is_displayed())
    browser.find_element(By.ID, "key-input").send_keys(served.key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    link = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'a[href="/ui/attributions/{attribution_id}"]'))
    if os.environ.get("ATTRIB_SCREENSHOT_DIR"):
        browser.save_screenshot(str(Path(os.environ["ATTRIB_SCREENSHOT_DIR"]) / "jobs-page.png"))
    link.click()  # the jobs page links to the results page; the key stays in this tab's sessionStorage
    wait_for(
        browser,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "article.query .example canvas"))
            == len(digits_attribution["query_ids"]) * 2 * TOP_K
        ),
    )
    assert served.key not in browser.current_url

    articles = browser.find_elements(By.CSS_SELECTOR, "article.query")
    assert [a.get_attribute("data-query-id") for a in articles] == digits_attribution["query_ids"]
    for article in articles:
        query_id = article.get_attribute("data-query-id")
        for direction in ("positive", "negative"):
            shown = [
                e.get_attribute("data-train-id")
                for e in article.find_elements(By.CSS_SELECTOR, f".side.{direction} .example")
            ]
            assert shown == digits_attribution["expected"][direction][query_id]
            texts = [e.text for e in article.find_elements(By.CSS_SELECTOR, f".side.{direction} .train-id")]
            assert texts == [f"#{train_id}" for train_id in shown]

    screenshot = tmp_path / "results-page.png"
    browser.save_screenshot(str(screenshot))
    if os.environ.get("ATTRIB_SCREENSHOT_DIR"):
        shutil.copy(screenshot, Path(os.environ["ATTRIB_SCREENSHOT_DIR"]) / "results-page.png")
    canvases = browser.find_elements(By.CSS_SELECTOR, "article.query canvas")
    assert len(canvases) == len(digits_attribution["query_ids"]) * (1 + 2 * TOP_K)
    blank = [i for i, canvas in enumerate(canvases) if not canvas_is_a_picture(canvas.screenshot_as_png)]
    assert blank == []


def test_results_page_filters_by_query_and_direction(
    served: Served, browser: Any, digits_attribution: dict[str, Any]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    query_id = digits_attribution["query_ids"][1]
    open_with_key(browser, served, f"/ui/attributions/{digits_attribution['id']}")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "article.query canvas"))
    browser.find_element(By.ID, "filter-query").send_keys(query_id)
    Select(browser.find_element(By.ID, "filter-direction")).select_by_value("negative")
    browser.find_element(By.CSS_SELECTOR, "#filters button").click()
    wait_for(
        browser,
        lambda d: (
            [a.get_attribute("data-query-id") for a in d.find_elements(By.CSS_SELECTOR, "article.query")] == [query_id]
        ),
    )
    assert browser.find_elements(By.CSS_SELECTOR, ".side.positive") == []
    tiles = browser.find_elements(By.CSS_SELECTOR, ".side.negative .example")
    shown = [tile.get_attribute("data-train-id") for tile in tiles]
    assert shown == digits_attribution["expected"]["negative"][query_id]


def test_results_page_of_self_influence(served: Served, browser: Any, digits_attribution: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    open_with_key(browser, served, f"/ui/attributions/{digits_attribution['self_id']}")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.query .side.positive canvas")) == TOP_K)
    cards = browser.find_elements(By.CSS_SELECTOR, "article.query")
    assert len(cards) == 1 and cards[0].text.startswith("Self-influence")
    tiles = cards[0].find_elements(By.CSS_SELECTOR, ".side.positive .example")
    assert [tile.get_attribute("data-train-id") for tile in tiles] == digits_attribution["most_unusual"]
    assert not browser.find_element(By.ID, "filter-query").is_enabled()
    if os.environ.get("ATTRIB_SCREENSHOT_DIR"):
        browser.save_screenshot(str(Path(os.environ["ATTRIB_SCREENSHOT_DIR"]) / "self-influence.png"))
    canvases = cards[0].find_elements(By.CSS_SELECTOR, "canvas")
    assert all(canvas_is_a_picture(canvas.screenshot_as_png) for canvas in canvases)
