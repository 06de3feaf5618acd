"""The web page of ``lookalike serve`` (``lookalike/serve/static``), in a real headless chromium.

The page's three fixed routes and their headers (no browser needed), then, driven with
selenium: a query uploaded through the file input and searched (the top result is that
same image, its label recognised), a crop box drawn with the pointer and cleared, the
match drawing of a result opened and closed with Escape, the add form's error path and
the remembered key, the keyboard reaching Search, and no console errors (a CSP violation
or a script error would show there).

Needs Debian's ``chromium`` and ``chromium-driver`` (skipped, saying so, without them);
Selenium Manager is never used, so nothing is downloaded.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import photo
from PIL import Image
from serve_helpers import KEY, NAMES, build_gallery

from lookalike.index import IndexStore
from lookalike.serve import ServeConf, serving
from lookalike.serve.page import CSP

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60  # the longest wait for the page (a search on a busy 2-core machine)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """A headless chromium driven by the system chromedriver (never Selenium Manager)."""
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "no chromium / chromedriver on PATH: apt-get install chromium chromium-driver"
        print(reason)
        pytest.skip(reason)
    pytest.importorskip("selenium", reason="selenium is missing: pip install -e '.[dev]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # a driver path is given; this forbids any download
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, default_extractor) -> dict:
    """6 photos labelled by their folder, indexed (as tests/test_serve.py serves them)."""
    return build_gallery(tmp_path_factory.mktemp("web"), default_extractor)


@pytest.fixture(scope="module")
def site(gallery: dict) -> Iterator[str]:
    """The service over the gallery (reads open, writes with the key), with its page."""
    with serving(gallery["index"], ServeConf(port=0, api_key=KEY)) as url:
        yield url


def image_id(index: Path, name: str) -> int:
    with IndexStore.open(index) as store:
        (found,) = [r.id for r in store.records("ok") if Path(r.path).parent.name == name]
    return found


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def loaded(driver, element) -> bool:
    return bool(js(driver, "return arguments[0].complete && arguments[0].naturalWidth", element))


def test_page_routes_serve_three_fixed_files(site: str) -> None:
    page = httpx.get(f"{site}/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == CSP
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = httpx.get(f"{site}/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-type"] == f"{kind}; charset=utf-8"
        assert asset.headers["x-content-type-options"] == "nosniff"
        assert asset.headers["cache-control"] == "no-cache"
        assert "http://" not in asset.text and "https://" not in asset.text  # nothing external
    html = page.text
    assert page.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"\son[a-z]+\s*=", html)  # no inline handlers (the CSP forbids them)
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))  # no inline script
    assert "http://" not in html and "https://" not in html
    for other in ("/index.html", "/static/app.js", "/page.py", "/app.js/../page.py"):
        assert httpx.get(f"{site}{other}").status_code == 404, other  # no file mount


@pytest.mark.browser
def test_search_box_recognise_and_match(
    browser,
    site: str,
    gallery: dict,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver, wait = browser, WebDriverWait(browser, WAIT_S)
    info = httpx.get(f"{site}/info").json()
    expected = image_id(gallery["index"], "coffee")

    driver.get(f"{site}/")
    wait.until(lambda d: "·" in d.find_element(By.ID, "info").text)
    assert driver.find_element(By.ID, "info").text == (
        f"{info['counts']['ok']} images · {info['model']['name']}"
    )
    driver.find_element(By.ID, "file").send_keys(str(gallery["base"] / "photos/coffee/0.png"))
    query = driver.find_element(By.ID, "query-img")
    wait.until(lambda d: loaded(d, query))

    # a crop box dragged with the pointer from 60, 40 px above-left of the centre to 40, 20
    # below-right, shown at its natural 192 x 128: so 36,24 to 136,84 in original pixels
    drag = ActionChains(driver).move_to_element_with_offset(query, -60, -40).click_and_hold()
    drag.move_by_offset(60, 40).move_by_offset(40, 20).release().perform()
    box = driver.find_element(By.ID, "box")
    assert box.is_displayed()
    drawn = [int(v) for v in re.findall(r"\d+", driver.find_element(By.ID, "box-text").text)]
    assert len(drawn) == 4, drawn
    assert all(abs(a - b) <= 2 for a, b in zip(drawn, (36, 24, 136, 84), strict=True)), drawn
    driver.find_element(By.ID, "clear-box").click()
    assert not box.is_displayed() and driver.find_element(By.ID, "box-text").text == ""

    driver.find_element(By.ID, "search").click()
    cells = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result"))
    assert len(cells) == len(NAMES)  # k = 10 over 6 images
    assert cells[0].get_attribute("data-id") == str(expected)
    assert cells[0].tag_name == "button" and "#1 · " in cells[0].text and "coffee" in cells[0].text
    assert "inliers" in cells[0].text  # a small gallery is verified by default (rerank auto)
    status = driver.find_element(By.ID, "status").text
    assert re.fullmatch(rf"{len(NAMES)} results in [\d.]+ ms", status), status
    wait.until(lambda d: d.find_element(By.ID, "recognized").text)
    assert driver.find_element(By.ID, "recognized").text.startswith("Recognised: coffee")
    thumbs = driver.find_elements(By.CSS_SELECTOR, ".result img")
    wait.until(lambda d: all(loaded(d, t) for t in thumbs))  # GET /images/{id}/thumbnail

    cells[0].click()
    panel = driver.find_element(By.ID, "match")
    assert panel.is_displayed()
    overlay = driver.find_element(By.ID, "match-img")
    wait.until(lambda d: loaded(d, overlay))  # POST /match?b=ID with the query
    assert js(driver, "return arguments[0].src", overlay).startswith("blob:")
    assert driver.find_element(By.ID, "match-status").text == ""
    shot = tmp_path / "web.png"
    assert driver.save_screenshot(str(shot))
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.width >= 640 and img.height >= 400
        assert any(low < high for low, high in img.convert("RGB").getextrema())  # not blank
    assert shot.stat().st_size > 10_000

    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    assert not panel.is_displayed()
    assert driver.switch_to.active_element.get_attribute("data-id") == str(expected)

    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []  # no script error, no CSP violation, no failed request


@pytest.mark.browser
def test_keyboard_and_add_form(browser, site: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver, wait = browser, WebDriverWait(browser, WAIT_S)
    driver.get(f"{site}/")
    js(driver, "sessionStorage.clear()")
    driver.refresh()
    for _ in range(12):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        if driver.switch_to.active_element.get_attribute("id") == "search":
            break
    focused = driver.switch_to.active_element
    assert focused.get_attribute("id") == "search", "Tab does not reach the Search button"
    assert js(driver, "return getComputedStyle(arguments[0]).outlineStyle", focused) != "none"
    ActionChains(driver).send_keys(Keys.ENTER).perform()  # no image yet: told so
    status = driver.find_element(By.ID, "status")
    assert status.text.startswith("choose, drop or paste") and "error" in status.get_attribute(
        "class"
    )

    driver.find_element(By.CSS_SELECTOR, "details.add summary").click()
    new = tmp_path / "new.png"
    photo("hubble_deep_field", 160).save(new)  # not in the gallery
    driver.find_element(By.ID, "add-file").send_keys(str(new))
    driver.find_element(By.ID, "add-label").send_keys("space")
    driver.find_element(By.ID, "add-metadata").send_keys("[1, 2]")
    submit = driver.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]")
    added = driver.find_element(By.ID, "add-status")

    def outcome() -> str:
        wait.until(lambda d: added.text not in ("", "adding…"))
        return added.text

    submit.click()
    assert outcome().startswith("metadata must be a JSON object")  # checked before sending
    driver.find_element(By.ID, "add-metadata").clear()
    driver.find_element(By.ID, "add-metadata").send_keys('{"source": "web"}')
    key = driver.find_element(By.ID, "api-key")
    key.send_keys("not-the-key")
    js(driver, "arguments[0].textContent = ''", added)
    submit.click()
    assert outcome() == "wrong API key"  # the service's one line
    key.clear()
    key.send_keys(KEY)
    driver.find_element(By.ID, "remember").click()
    js(driver, "arguments[0].textContent = ''", added)
    submit.click()
    text = outcome()
    assert re.fullmatch(r"added as #\d+", text), text
    new_id = int(text.rsplit("#", 1)[1])
    wait.until(lambda d: d.find_element(By.ID, "info").text.startswith("7 images"))
    js(driver, "arguments[0].textContent = ''", added)
    submit.click()
    assert outcome() == f"already in the collection as #{new_id}"
    stored = httpx.get(f"{site}/images/{new_id}").json()
    assert stored["metadata"] == {"source": "web", "label": "space"}  # the form's fields
    assert js(driver, "return sessionStorage.getItem('lookalike.apiKey')") == KEY
    driver.refresh()
    assert driver.find_element(By.ID, "api-key").get_attribute("value") == KEY
    assert driver.find_element(By.ID, "remember").is_selected()
    driver.find_element(By.CSS_SELECTOR, "details.add summary").click()  # closed on reload
    driver.find_element(By.ID, "remember").click()  # unticked: forgotten
    assert js(driver, "return sessionStorage.getItem('lookalike.apiKey')") is None
