"""The report: self-contained, escaped, and correct when a browser opens it."""

import json
import os
import shutil

import numpy as np
import pytest

import alignkit as ak


def test_report_is_self_contained_and_reads_top_down(demo_dumps, tmp_path):
    result = ak.compare(*demo_dumps["timestep"])
    html = result.to_html(tmp_path / "r.html").read_text()
    assert "http://" not in html and "https://" not in html
    order = [
        html.index(s)
        for s in (
            "id='verdict'",
            "Error per step",
            "Submodels",
            "Tensors × steps",
            "Calls and tensors",
            "Images",
            "Runs",
        )
    ]
    assert order == sorted(order)
    assert "input mismatch" in html and "unet step 1" in html and "timestep" in html
    assert html.count("data:image/png;base64,") >= 4  # curves, heatmap, image panels
    assert "port (timestep)" in html and "torch-fp32" in html  # both labels in the metadata table
    assert "<th>tgt_tensor</th>" not in html and "<th>swapped_with</th>" not in html  # names match: no such columns


def test_aligned_report_says_aligned(demo_dumps, tmp_path):
    html = ak.compare(*demo_dumps["none"]).to_html(tmp_path / "r.html").read_text()
    assert "ALIGNED" in html and "DIVERGED" not in html


def hostile_pair(tmp_path):
    name = "<script>alert(1)</script>"
    for path, scale in ((tmp_path / "ref.h5", 1.0), (tmp_path / "tgt.h5", 2.0)):
        with ak.Recorder(path, label=f"{name} run") as rec:
            f = rec.watch(lambda x: {name: x * scale, "ünï cødé/a.b c": x}, name)
            f(np.ones((1, 3, 8, 8), np.float32))
    return ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")


def test_names_from_dumps_are_escaped(tmp_path):
    result = hostile_pair(tmp_path)
    assert result.first_divergence.submodel == "<script>alert(1)</script>"
    html = result.to_html(tmp_path / "r.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ünï cødé/a.b c" in html


def chromium_driver():
    """Headless Chromium; its absence fails the test unless the user opts out, out loud."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("ALIGNKIT_SKIP_BROWSER") == "1":
            pytest.skip("ALIGNKIT_SKIP_BROWSER=1: the report was not opened in a browser")
        pytest.fail(
            "chromium and chromedriver are not installed: apt-get install chromium chromium-driver "
            "(or set ALIGNKIT_SKIP_BROWSER=1 to skip the browser tests, knowingly)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1600",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.parametrize("bug", ["timestep", "hostile"])
def test_browser_opens_the_report_with_everything_loaded(demo_dumps, tmp_path, bug):
    result = hostile_pair(tmp_path) if bug == "hostile" else ak.compare(*demo_dumps[bug])
    path = result.to_html(tmp_path / "report.html")
    driver = chromium_driver()
    try:
        driver.get(path.resolve().as_uri())
        driver.save_screenshot(str(tmp_path / "shot.png"))
        verdict = driver.find_element("id", "verdict").text
        assert "DIVERGED" in verdict
        if bug == "timestep":
            assert "unet step 1" in verdict and "timestep" in verdict
        else:
            assert "<script>alert(1)</script>" in verdict  # shown as text, not run
        images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert images and all(done and width > 0 for done, width in images)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
        assert all(u.startswith(("file:", "data:")) for u in urls), urls
    finally:
        driver.quit()
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_a_click_on_a_header_sorts_the_table_both_ways(demo_dumps, tmp_path):
    path = ak.compare(*demo_dumps["timestep"]).to_html(tmp_path / "report.html")
    driver = chromium_driver()
    try:
        driver.get(path.resolve().as_uri())
        table = driver.find_element("css selector", "table.sortable")
        headers = [th.text for th in table.find_elements("css selector", "thead th")]
        column = headers.index("rel_l1")
        header = table.find_elements("css selector", "thead th")[column]

        def values() -> list[float]:
            cells = driver.execute_script(
                "return Array.from(arguments[0].tBodies[0].rows).map(r => r.cells[arguments[1]].textContent)",
                table,
                column,
            )
            return [float(c) for c in cells if c.strip() not in ("", "-", "nan")]

        before = values()
        assert before != sorted(before)  # mismatches first: not already in order
        header.click()
        assert values() == sorted(before)
        header.click()
        assert values() == sorted(before, reverse=True)
    finally:
        driver.quit()


def test_a_large_comparison_shows_its_worst_rows_and_says_so(tmp_path, monkeypatch):
    from alignkit.reporting import html as report
    from alignkit.reporting import plots

    for path, noise in ((tmp_path / "ref.h5", 0.0), (tmp_path / "tgt.h5", 0.01)):
        with ak.Recorder(path) as rec:
            f = rec.watch(lambda **kw: None, "net")
            for _ in range(2):
                f(**{f"t{i}": np.linspace(1, 2, 8, dtype=np.float32) * (1 + noise * i) for i in range(12)})
                ak.step()
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    monkeypatch.setattr(report, "CALL_ROWS", 10)
    monkeypatch.setattr(plots, "HEATMAP_ROWS", 3)
    figures = []
    data_uri = plots._data_uri
    monkeypatch.setattr(
        plots,
        "_data_uri",
        lambda fig: figures.append([t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]) or data_uri(fig),
    )
    html = result.to_html(tmp_path / "r.html").read_text()
    assert "The first 10 of 24 rows, mismatches first" in html
    assert html.count("<tr class='bad'>") == 10
    assert "the 3 of 12 tensors that differ most" in html
    assert any(
        labels[:3] == ["net input t9", "net input t10", "net input t11"] for labels in figures
    )  # the largest noise


def _drawn(tmp_path, monkeypatch, steps: int) -> list:
    """The figures of the error curves and the heatmap of a comparison over ``steps`` steps."""
    from alignkit.reporting import plots

    for path, noise in ((tmp_path / "ref.h5", 0.0), (tmp_path / "tgt.h5", 0.01)):
        with ak.Recorder(path) as rec:
            f = rec.watch(lambda x: x * 2, "decoder")
            for step in range(steps):  # a step a call, as in an LLM decode loop
                f(np.linspace(1, 2, 8, dtype=np.float32) * (1 + noise * step))
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    figures = []
    monkeypatch.setattr(plots, "_data_uri", lambda fig: figures.append(fig) or "data:")
    plots.error_curves(result)
    plots.heatmap(result)
    return figures


def test_steps_are_whole_numbers_on_the_error_curves(tmp_path, monkeypatch):
    curves, _ = _drawn(tmp_path, monkeypatch, steps=5)
    ticks = [t for t in curves.axes[0].get_xticks() if 0 <= t <= 4]
    assert len(ticks) > 1 and all(float(t).is_integer() for t in ticks)


def test_many_steps_are_labelled_sparsely_on_the_heatmap(tmp_path, monkeypatch):
    _, grid = _drawn(tmp_path, monkeypatch, steps=90)
    assert [t.get_text() for t in grid.axes[0].get_xticklabels()] == [str(s) for s in range(0, 90, 3)]


def test_a_decoded_video_is_shown_at_the_frame_that_differs_most(tmp_path):
    from alignkit.reporting import plots

    video = (
        np.random.default_rng(0).uniform(-1, 1, (1, 3, 5, 16, 16)).astype(np.float32)
    )  # batch, channels, frames, h, w
    port = video.copy()
    port[:, :, 3] += 0.5  # one frame off
    for path, value in ((tmp_path / "ref.h5", video), (tmp_path / "tgt.h5", port)):
        with ak.Recorder(path) as rec:
            rec.watch(lambda z: value, "vae.decode")(np.zeros((1, 16, 2, 4, 4), np.float32))
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    with ak.open_dump(result.reference) as r, ak.open_dump(result.target) as t:
        panels = plots.image_panels(result, r, t)
    assert [title for title, _ in panels] == ["vae.decode step 0 output output, frame 3 of 5"]
    assert panels[0][1].startswith("data:image/png;base64,")
