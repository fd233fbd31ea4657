"""A real browser (headless Chromium, Debian's package) runs a reader's page from disk: a
scripted reader answers with the keyboard, reloads halfway and resumes, downloads the answers;
scoring them gives back the planted accuracies; no page shows a truth."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from hydra import compose, initialize_config_module

from cfexplain.study.__main__ import study as study_command
from tests.explain.test_browser import browser  # noqa: F401 (fixture)
from tests.study.conftest import make_study

FLIP = {"real": "generated", "generated": "real"}


def open_reader(browser, page_file: Path):  # noqa: F811
    """A fresh browser profile on ``page_file``; console errors and every URL requested."""
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    urls: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    # A load the page itself abandons (a reload, the next image replacing this one) is aborted,
    # not failed: only a request that could not be served is an error.
    page.on(
        "requestfailed",
        lambda r: None if "ERR_ABORTED" in (r.failure or "") else errors.append(f"failed {r.url}"),
    )
    page.on("request", lambda r: urls.append(r.url))
    page.goto(page_file.as_uri())
    page.wait_for_load_state("load")
    return ctx, page, errors, urls


def reload(page) -> None:
    """Reload ``page`` and wait until its script has drawn the stage, which stays empty in the
    new document until then (CI once looked at it in between)."""
    page.reload()
    page.wait_for_function("document.getElementById('stage').childElementCount > 0", timeout=5000)


def neutral_dom(page) -> str:
    """The page's DOM with the image names and the item number blanked out."""
    dom = page.evaluate("document.documentElement.outerHTML")
    dom = re.sub(r"images/[0-9a-f]{12}\.png", "IMG", dom)
    return re.sub(r"([Ii]mage) \d+", r"\1 #", dom)


def decoded(page) -> None:
    """Wait until the page's images are decoded (its CSP forbids wait_for_function's eval)."""
    for _ in range(100):
        if page.evaluate("Array.from(document.images).every(i => i.naturalWidth > 0)"):
            return
        page.wait_for_timeout(50)
    raise AssertionError("the image was not decoded")


def read_through(page, key: dict, plan: dict, right: int, reload_at: int | None) -> set[str]:
    """Answer every item with the keyboard: the first ``right`` Turing items right, the rest
    wrong, confidence 1..5 in turn; counterfactuals rated 4, 2, 5 with a comment. Returns the
    neutral DOMs of the Turing items (one if nothing tells them apart)."""
    doms = set()
    page.keyboard.press("Enter")  # past the instructions
    for i, entry in enumerate(plan["turing"]):
        if i == reload_at:
            reload(page)
            assert (
                page.locator("#progress").inner_text() == f"Image {i + 1} of {len(plan['turing'])}"
            )
        img = page.locator("#stage img")
        assert img.get_attribute("src") == f"images/{entry['token']}.png"
        decoded(page)
        doms.add(neutral_dom(page))
        truth = key["items"][entry["item"]]["truth"]
        page.evaluate("window.shown = document.querySelector('#stage img')")
        page.keyboard.press("r" if (truth if i < right else FLIP[truth]) == "real" else "g")
        page.keyboard.press(str(1 + i % 5))
        # answering re-draws the buttons, not the image: it is neither reloaded nor flickers
        assert page.evaluate("document.querySelector('#stage img') === window.shown")
        page.keyboard.press("Enter")
    page.keyboard.press("Enter")  # past the counterfactual instructions
    for entry in plan["counterfactual"]:
        assert (
            page.locator(".view img").first.get_attribute("src") == f"images/{entry['token']}.png"
        )
        decoded(page)
        page.keyboard.press("ArrowRight")
        for v in "425":
            page.keyboard.press(v)
        page.keyboard.press("c")
        page.keyboard.type("edges moved, 3 > 2")
        page.keyboard.press("Escape")
        decoded(page)
        page.keyboard.press("Enter")
    assert page.locator("h1").inner_text() == "Thank you"
    return doms


def test_scripted_readers_resume_download_and_are_scored_exactly(browser, study_run, tmp_path):  # noqa: F811
    folder = make_study(study_run, tmp_path / "study")
    key = json.loads((folder / "key.json").read_text())
    answers = tmp_path / "answers"
    planted = {0: 5, 1: 3}  # Turing items right, of 8
    for r, right in planted.items():
        plan = key["readers"][r]
        ctx, page, errors, urls = open_reader(browser, folder / plan["reader"] / "index.html")
        try:
            doms = read_through(page, key, plan, right, reload_at=4 if r == 0 else None)
            # real and generated items look the same but for the image: no truth in the DOM
            assert len(doms) == 1
            with page.expect_download() as dl:
                page.keyboard.press("d")
            dl.value.save_as(answers / f"{plan['reader']}.json")
            with page.expect_download() as dl:
                page.locator("#download-csv").click()
            dl.value.save_as(tmp_path / f"{plan['reader']}.csv")
            assert not errors, errors
            assert all(u.startswith(("file:", "blob:")) for u in urls), urls
        finally:
            ctx.close()
    data = json.loads((answers / "reader-1.json").read_text())
    assert data["finished"] and len(data["turing"]) == 8 and len(data["counterfactual"]) == 2
    assert [a["confidence"] for a in data["turing"]] == [1, 2, 3, 4, 5, 1, 2, 3]
    assert data["counterfactual"][0]["comment"] == "edges moved, 3 > 2"
    rows = list(csv.DictReader((tmp_path / "reader-1.csv").open()))
    assert len(rows) == 10 and rows[-1]["comment"] == "edges moved, 3 > 2"

    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        cfg = compose(
            config_name="study",
            overrides=[
                "command=score",
                f"study={folder}",
                f"answers={answers}/*.json",
                "logger=none",
            ],
        )
    index = study_command(cfg)
    summary = json.loads((index.parent / "summary.json").read_text())
    assert [r["accuracy"] for r in summary["readers"]] == [5 / 8, 3 / 8]
    assert (summary["pooled"]["correct"], summary["pooled"]["n"]) == (8, 16)
    assert summary["likert"][0]["4"] == 4 and summary["likert"][1]["2"] == 4
    assert summary["agreement"]["items"] == 8


def test_time_limit_hides_the_image_and_survives_a_reload(browser, study_run, tmp_path):  # noqa: F811
    folder = make_study(study_run, tmp_path / "study", readers=1, n_cf=0, time_limit_s=1.0)
    ctx, page, errors, _ = open_reader(browser, folder / "reader-1" / "index.html")
    try:
        page.keyboard.press("Enter")
        assert page.locator("#stage img").count() == 1
        page.wait_for_selector("#hidden", timeout=5000)
        assert page.locator("#stage img").count() == 0
        reload(page)  # drawn long before a clock restarted by the reload could hide the image
        state = page.evaluate("document.getElementById('stage').innerHTML.slice(0, 300)")
        assert page.locator("#stage img").count() == 0, state  # a reload does not show it again
        assert page.locator("#hidden").count() == 1, state
        page.keyboard.press("g")
        page.keyboard.press("3")
        page.keyboard.press("Enter")
        assert page.locator("#progress").inner_text() == "Image 2 of 8"
        assert not errors, errors
    finally:
        ctx.close()
