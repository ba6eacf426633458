"""`dinokit explore` in a real headless browser: Debian's chromium driven by Selenium through Debian's
chromedriver (never a downloaded browser or driver). Each view is screenshotted and the pictures checked;
they are written under pytest's temporary folder, and into $DINOKIT_SCREENSHOTS when it is set (the README's
docs/img/explore-*.png are made so).

By default the models are tiny random ViTs on generated images. With DINOKIT_EXPLORE_RUN=RUN_DIR (a
`dinokit train` run folder on Fashion-MNIST), the same tests run on that run's checkpoints and 300
Fashion-MNIST test images: what the README's screenshots show."""
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from test_explore_server import make_explorer, make_world, serve

CHROMIUM = Path(os.environ.get("DINOKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DINOKIT_CHROMEDRIVER", "/usr/bin/chromedriver"))
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"no {CHROMIUM} or {CHROMEDRIVER}: install Debian's chromium and chromium-driver "
                "(make test does when it can: apt-get install chromium chromium-driver)", allow_module_level=True)
pytest.importorskip("selenium", reason="the browser tests need selenium (pip install 'dinokit[test]')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from dinokit import cli  # noqa: E402
from dinokit.eval.search import search  # noqa: E402
from dinokit.explore.server import create_app  # noqa: E402

VIEWPORT = (1280, 900)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--force-device-scale-factor=1"]


def fashion_mnist_world(run: Path, root: Path) -> SimpleNamespace:
    """A trained run's checkpoints (the last, and the one before when kept), 30 Fashion-MNIST test images
    per class in class folders, their index, a copy of the run's metrics (the live test appends to it)."""
    from dinokit.data.sources import open_source
    if not (run / "checkpoint.pt").is_file():
        pytest.fail(f"DINOKIT_EXPLORE_RUN={run} holds no checkpoint.pt")
    try:
        test = open_source("fashion-mnist:test")
    except FileNotFoundError as e:
        pytest.skip(str(e).splitlines()[0])
    taken: dict[int, int] = {}
    for i, label in enumerate(test.labels):
        if taken.get(label, 0) < 30:
            folder = root / "data" / test.classes[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(test.read(i).permute(1, 2, 0).numpy()).save(folder / f"test{i:05d}.png")
            taken[label] = taken.get(label, 0) + 1
    query = root / "query.png"
    Image.fromarray(test.read(9000).permute(1, 2, 0).numpy()).save(query)  # an image not in the folder
    weights = [str(run / "checkpoint.pt")] + [str(p) for p in [run / "checkpoint.prev.pt"] if p.is_file()]
    index = root / "index.safetensors"
    with open(os.devnull, "w") as quiet, __import__("contextlib").redirect_stdout(quiet):
        assert cli.main(["index", "--weights", weights[0], "--data", str(root / "data"), "--out", str(index)]) == 0
    (root / "run").mkdir()
    shutil.copy(run / "metrics.jsonl", root / "run" / "metrics.jsonl")
    return SimpleNamespace(root=root, data=root / "data", query=query, weights=weights, index=index,
                           run=root / "run")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore-browser")
    run = os.environ.get("DINOKIT_EXPLORE_RUN")
    return fashion_mnist_world(Path(run), root) if run else make_world(root)


@pytest.fixture(scope="module")
def explorer(world):
    return make_explorer(world)


@pytest.fixture(scope="module")
def url(explorer):
    with serve(create_app(explorer)) as base:
        yield base


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # a driver path given: Selenium Manager (which would download one) is never run
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("explore-screenshots")


@pytest.fixture
def page(driver, url):
    """The page, freshly loaded and ready."""
    driver.get(url + "/")
    wait_for(driver, "document.body.dataset.ready === '1'")
    return driver


def wait_for(driver, script: str, timeout: float = 20):
    """Until the JavaScript expression is true; its value."""
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(f"return {script}"),
                                                             message=f"timed out waiting for: {script}")
    return driver.execute_script(f"return {script}")


def idle(driver):
    wait_for(driver, "document.body.dataset.pending === '0'")


def screenshot(driver, shots: Path, name: str, readme: bool = True) -> np.ndarray:
    """Save the viewport as explore-NAME.png (into $DINOKIT_SCREENSHOTS too, for the README's views) and
    check it: the viewport's size, and a picture rather than a blank page."""
    png = driver.get_screenshot_as_png()
    (shots / f"explore-{name}.png").write_bytes(png)
    if readme and os.environ.get("DINOKIT_SCREENSHOTS"):
        out = Path(os.environ["DINOKIT_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"explore-{name}.png").write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert pixels.shape == (VIEWPORT[1], VIEWPORT[0], 3)
    packed = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | pixels[..., 2]
    colours = len(np.unique(packed))
    assert colours > 50 and pixels.std() > 10, f"{name}: the screenshot looks blank ({colours} colours)"
    return pixels


def upload(driver, path: Path) -> str:
    """Choose a file as a user would; the id of the image the page then shows."""
    before = driver.execute_script("return state.looked && state.looked.id")
    driver.find_element(By.ID, "upload").send_keys(str(path))
    wait_for(driver, f"(state.looked && state.looked.id) !== {json.dumps(before)} || !$('#error').hidden")
    idle(driver)
    return driver.execute_script("return state.looked && state.looked.id")


def masks(driver, model: int) -> list[str]:
    return driver.execute_script(
        f"return [...document.querySelectorAll('.panel[data-model=\"{model}\"] img.mask')].map(i => i.src)")


def test_page_loads(page, explorer):
    assert page.title == "dinokit explore"
    assert page.execute_script("return $('#models').title").split("\n") == explorer.names
    labels = page.execute_script("return $('#models').textContent").split("   |   ")
    assert len(labels) == len(explorer.names) and all(n.endswith(l) for n, l in zip(explorer.names, labels))
    assert all(b.is_enabled() for b in page.find_elements(By.CSS_SELECTOR, "#tabs button"))
    wait_for(page, f"document.querySelectorAll('#gallery button[data-ref]').length === {min(48, len(explorer.data))}")
    assert not page.find_element(By.ID, "error").is_displayed()
    errors = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_upload_shows_one_overlay_per_head(page, world, explorer, shots):
    upload(page, world.query)
    assert not page.find_element(By.ID, "error").is_displayed()
    for i, model in enumerate(explorer.models):
        panel = page.find_element(By.CSS_SELECTOR, f'.panel[data-model="{i}"]')
        overlays = panel.find_elements(By.CSS_SELECTOR, "img.overlay")
        assert len(overlays) == model.num_heads and all(o.is_displayed() for o in overlays)
        assert len(panel.find_elements(By.CSS_SELECTOR, "img.mask")) == model.num_heads
        grid = page.execute_script("return state.looked.models[arguments[0]].grid", i)
        loaded = [page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", o) for o in overlays]
        assert loaded == [grid[1]] * model.num_heads  # each a patch-grid map, decoded by the browser
        assert panel.get_attribute("data-threshold") == "0.6"
    screenshot(page, shots, "attention")


def test_slider_changes_the_masks(page, world, shots):
    upload(page, world.query)
    before = masks(page, 0)
    captions = page.execute_script("return [...document.querySelectorAll('.panel figcaption')].map(c => c.textContent)")
    first = screenshot(page, shots, "slider-60", readme=False)
    slider = page.find_element(By.ID, "threshold")
    slider.send_keys(Keys.HOME)  # the keyboard, as a user moves it: to the lowest mass, 5%
    wait_for(page, "[...document.querySelectorAll('.panel')].every(p => p.dataset.threshold === '0.05')")
    idle(page)
    assert page.find_element(By.ID, "threshold-value").text == "5%"
    after = masks(page, 0)
    assert len(after) == len(before) and after != before
    assert captions != page.execute_script(
        "return [...document.querySelectorAll('.panel figcaption')].map(c => c.textContent)")
    second = screenshot(page, shots, "slider-5", readme=False)
    assert (np.abs(first.astype(int) - second.astype(int)).sum(-1) > 30).sum() > 1000  # the masks look different


def test_layer_and_head_selectors(page, world, explorer):
    upload(page, world.query)
    panel = page.find_element(By.CSS_SELECTOR, '.panel[data-model="0"]')

    def heats():
        return [i.get_attribute("src") for i in panel.find_elements(By.CSS_SELECTOR, "img.overlay")]

    last = heats()
    Select(panel.find_element(By.CSS_SELECTOR, "select.layer")).select_by_value("0")
    wait_for(page, "document.querySelector('.panel[data-model=\"0\"]').dataset.layer === '0'")
    idle(page)
    assert heats() != last
    Select(panel.find_element(By.CSS_SELECTOR, "select.head")).select_by_value("1")
    shown = [o for o in panel.find_elements(By.CSS_SELECTOR, "img.overlay") if o.is_displayed()]
    assert len(shown) == 1 and shown[0].get_attribute("alt") == "head 1 attention"


def test_neighbours_order_equals_dinokit_search(page, world, shots):
    key = upload(page, world.query)
    page.find_element(By.CSS_SELECTOR, '#tabs button[data-view="neighbours"]').click()
    wait_for(page, f"document.querySelector('#neighbour-list').dataset.query === '{key}'")
    idle(page)
    items = page.find_elements(By.CSS_SELECTOR, "#neighbour-list li.neighbour")
    shown = [(i.get_attribute("data-path"), float(i.get_attribute("data-similarity"))) for i in items]
    expected = search(str(world.index), [str(world.query)], k=10)[0]["results"]
    assert shown == [(m["path"], m["similarity"]) for m in expected]
    assert all(i.is_displayed() for i in items)
    screenshot(page, shots, "neighbours")


def test_map_renders_every_indexed_image(page, world, explorer, shots):
    page.find_element(By.CSS_SELECTOR, '#tabs button[data-view="map"]').click()
    count = int(wait_for(page, "document.querySelector('#map').dataset.count"))
    assert count == len(explorer.index_paths)
    assert page.find_element(By.ID, "map-status").text.startswith(f"{count} points")
    canvas = page.find_element(By.ID, "map")
    pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB"))
    coloured = pixels[(pixels.max(-1).astype(int) - pixels.min(-1)) > 60]  # the points, not the white ground
    assert len(coloured) > 5 * count
    classes = page.execute_script("return state.map.classes.length")
    assert len(np.unique(coloured // 32, axis=0)) >= min(classes, 3)  # coloured by class folder
    x, y = page.execute_script("return state.mapXY[0]")
    ActionChains(page).move_to_element_with_offset(canvas, x - canvas.size["width"] / 2,
                                                   y - canvas.size["height"] / 2).perform()
    wait_for(page, "!document.querySelector('#map-tip').hidden && document.querySelector('#map-tip img').complete")
    assert page.find_element(By.CSS_SELECTOR, "#map-tip span").text.startswith(explorer.index_paths[0])
    screenshot(page, shots, "map")
    ActionChains(page).click().perform()  # opens that image in the attention view
    wait_for(page, "state.view === 'attention' && state.looked && state.looked.ref !== undefined")
    idle(page)
    assert page.find_element(By.ID, "current").text == str(Path(explorer.index_paths[0]).relative_to(world.data))


def test_bad_upload_shows_an_error_and_the_next_upload_works(page, world, explorer, shots, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is no picture")
    upload(page, bad)
    error = page.find_element(By.ID, "error")
    assert error.is_displayed() and error.text.startswith("broken.png: not a usable image")
    screenshot(page, shots, "error", readme=False)
    key = upload(page, world.query)
    assert not error.is_displayed() and key
    wait_for(page, "[...document.querySelectorAll('.panel')].every(p => p.dataset.threshold)")
    assert len(page.find_elements(By.CSS_SELECTOR, "img.overlay")) == sum(m.num_heads for m in explorer.models)


def test_run_view_follows_metrics_live(page, world, shots):
    path = world.run / "metrics.jsonl"
    rows = len(path.read_text().splitlines())
    page.find_element(By.CSS_SELECTOR, '#tabs button[data-view="run"]').click()
    wait_for(page, f"document.querySelector('#curves').dataset.rows === '{rows}'")
    assert len(page.find_elements(By.CSS_SELECTOR, "#curves canvas")) >= 2
    screenshot(page, shots, "run")
    last = json.loads(path.read_text().splitlines()[-1])
    with open(path, "a") as f:  # the run goes on training
        f.write(json.dumps(last | {"step": last["step"] + 10}) + "\n")
    wait_for(page, f"document.querySelector('#curves').dataset.rows === '{rows + 1}'", timeout=10)
    assert f"last step {last['step'] + 10}" in page.find_element(By.ID, "run-status").text
