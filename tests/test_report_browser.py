"""report.html in a real browser: headless Chromium renders it without console errors.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Skipped when
they are missing, unless ``INTERP_FER_REQUIRE_BROWSER=1`` (set by CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

from interp_fer.detectors import DetectorOptions
from interp_fer.layer_mapping import MappingOptions
from interp_fer.mapping import map_dataset
from interp_fer.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("INTERP_FER_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are required here but missing")
        pytest.skip("headless Chromium (Debian chromium, chromium-driver) not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Flags for a machine without network or display (no background fetches, no sandbox as root).
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1300,1800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report(tmp_path_factory, mini_xception, sample_faces):
    result = map_dataset(mini_xception, sample_faces, ["conv2", "block2"], locate="rf-center",
                         options=MappingOptions(n_boot=8, n_null=4),
                         detector=DetectorOptions(seed=8, n_perm=200, n_boot=20),
                         progress=False)
    return write_report(result, mini_xception, sample_faces,
                        tmp_path_factory.mktemp("report") / "report.html")


def test_report_renders_without_console_errors(browser, report, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(report.as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
    rows = browser.find_elements(By.CSS_SELECTOR, "table#mapping tbody tr")
    assert len(rows) == 8 + 32
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 5  # two heatmaps per layer, the projection grid
    # Question 1's heatmap per layer draws the detector test's effect beside the control bar.
    effect = [i for i in images if "detector test effect per AU and channel, with the "
              "random-weights control_bar per AU" in i.get_attribute("alt")]
    assert len(effect) == 2 and all(i.is_displayed() for i in effect)
    legend = browser.find_element(By.XPATH, "//p[contains(., 'p_value: permutation p-value')]")
    assert "p_value: permutation p-value of effect" in legend.text
    assert "partial: the association of the in-minus-out contrast" in legend.text
    assert "see docs/method.md in the interp_fer repository" in legend.text
    warning = browser.find_element(By.CSS_SELECTOR, "p.warning")
    assert "the numbers are not evidence" in warning.text and warning.is_displayed()
    for image in images:
        assert browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", image)
    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


def test_mapping_table_sorts_on_click(browser, report):
    from selenium.webdriver.common.by import By

    browser.get(report.as_uri())
    headers = browser.find_elements(By.CSS_SELECTOR, "table#mapping thead th")
    column = [h.text for h in headers].index("auc")

    def values():
        cells = browser.find_elements(By.CSS_SELECTOR,
                                      f"table#mapping tbody tr td:nth-child({column + 1})")
        return [float(c.get_attribute("data-value")) for c in cells]

    headers[column].click()
    ascending = values()
    assert ascending == sorted(ascending)
    headers[column].click()
    assert values() == sorted(ascending, reverse=True)
