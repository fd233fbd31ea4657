"""A real browser opens galleries from disk: headless Chromium (Debian's package) via playwright.

``make test`` installs chromium when it runs as root and it is missing; where it still is not
there, these tests fail with the reason (they never skip).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cfexplain.explain.__main__ import explain
from cfexplain.explain.gallery import GalleryWriter
from tests.explain.test_command import FAST, classifier_run, explain_cfg  # noqa: F401 (fixture)
from tests.explain.test_gallery import EVIL, make_row

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        found = shutil.which("chromium")
        pytest.fail(
            f"headless Chromium is needed at {CHROMIUM} (found: {found}); install Debian's package: "
            "apt-get install -y chromium (make test does this when run as root)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, index: Path):
    """The page at ``index`` (file://) and the console errors / failed requests it produced."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed {r.url}"))
    page.goto(index.as_uri())
    page.wait_for_load_state("load")
    return page, errors


def visible_rows(page) -> int:
    return page.evaluate(
        "Array.from(document.querySelectorAll('section.row')).filter(r => r.offsetParent !== null).length"
    )


def assert_images_decoded(page) -> int:
    sizes = page.evaluate(
        "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    bad = [s for s in sizes if not (s[1] and s[2] > 0)]
    assert not bad, f"images not decoded: {bad[:5]}"
    return len(sizes)


def test_command_gallery_in_chromium(browser, classifier_run, tmp_path):  # noqa: F811
    index = explain(
        explain_cfg(
            f"run={classifier_run}",
            f"out={tmp_path / 'g'}",
            "limit=8",
            "batch_size=4",
            FAST,
            "logger=none",
        )
    )
    page, errors = open_page(browser, index)
    try:
        assert page.locator("section.row").count() == 8
        assert visible_rows(page) == 8
        assert assert_images_decoded(page) == 8 * 4  # input + gradcam, saliency, cam
        labels = page.evaluate(
            "Array.from(new Set(Array.from(document.querySelectorAll('section.row')).map(r => r.dataset.true)))"
        )
        assert len(labels) == 2, labels  # the smoke test split has both classes in its first 8
        page.locator(f'button[data-filter="true"][data-value="{labels[0]}"]').click()
        shown = visible_rows(page)
        assert 0 < shown < 8
        assert page.locator("#count").inner_text() == f"{shown} of 8 shown"
        page.locator('button[data-filter="true"][data-value="all"]').click()
        assert visible_rows(page) == 8
        page.select_option("#sort", "prob")
        probs = page.evaluate(
            "Array.from(document.querySelectorAll('section.row')).map(r => parseFloat(r.dataset.prob))"
        )
        assert probs == sorted(probs, reverse=True)
        assert not errors, errors
    finally:
        page.close()


def test_counterfactual_rows_gifs_and_escaped_names_in_chromium(browser, tmp_path):
    w = GalleryWriter(tmp_path / "g", target="sick", size=32)
    w.add_batch(
        [make_row(EVIL), make_row("b.png", true="1"), make_row("c.png", counterfactual=False)],
        {"run": "<i>r</i>"},
    )
    index = w.close({"run": "<i>r</i>"}, {})
    page, errors = open_page(browser, index)
    try:
        # the evil name is text, not an element: no extra <img>, the heading shows it verbatim
        assert page.locator("section.row h3").first.inner_text() == EVIL
        assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
        # with counterfactual: input, reconstruction, 5 frames, difference, 2 maps, plot, gif
        assert assert_images_decoded(page) == 2 * 12 + 3
        page.locator('button[data-filter="flip"][data-value="n/a"]').click()
        assert visible_rows(page) == 1
        assert not errors, errors
    finally:
        page.close()


def test_flagged_rows_banner_header_counts_and_guard_filter_in_chromium(browser, tmp_path):
    from cfexplain.explain.guard import IN_DISTRIBUTION, READ_DIFFERENTLY, UNLIKE_TRAINING, Verdict
    from cfexplain.explain.pipeline import Tally

    rows = [make_row(f"{i}.png") for i in range(4)]
    verdicts = [
        Verdict(IN_DISTRIBUTION, {"recon_error": 0.03}),
        Verdict(UNLIKE_TRAINING, {"recon_error": 0.5}, ["recon_error 0.5 > 0.07 (…)"]),
        Verdict(READ_DIFFERENTLY, {"recon_prob_gap": 0.9}, ["recon_prob_gap 0.9 > 0.2 (…)"]),
        Verdict(IN_DISTRIBUTION, {"recon_error": 0.04}),
    ]
    tally = Tally()
    for row, v in zip(rows, verdicts):
        row.guard = v
        row.metrics = {"flipped": 1.0 if v.flagged else 0.0}
        tally.add(row)
    header = {"run": "r", **tally.header()}
    w = GalleryWriter(tmp_path / "g", target="sick", size=32)
    w.add_batch(rows, header)
    index = w.close(header, {})
    page, errors = open_page(browser, index)
    try:
        banners = page.locator(".guard-banner")
        assert banners.count() == 2 and banners.first.is_visible()
        assert (
            "does not look like the images the model was trained on" in banners.first.inner_text()
        )
        text = page.locator("header").inner_text()
        assert "2 of 4 images flagged" in text
        # The flip rate counts the in-distribution images alone (0 of 2), the flagged apart (2 of 2).
        assert header["flip_rate"] == 0.0 and header["flagged: flip_rate"] == 1.0
        page.locator(f'button[data-filter="guard"][data-value="{UNLIKE_TRAINING}"]').click()
        assert visible_rows(page) == 1
        page.locator(f'button[data-filter="guard"][data-value="{IN_DISTRIBUTION}"]').click()
        assert visible_rows(page) == 2
        assert not errors, errors
    finally:
        page.close()


def test_capsule_rows_show_the_attribute_table_and_capsule_images_in_chromium(browser, tmp_path):
    from tests.explain.test_capsules import concept_row

    w = GalleryWriter(tmp_path / "g", target="sick", size=32)
    w.add_batch([concept_row("a.png"), concept_row("b.png")], {"run": "r"})
    index = w.close({"run": "r"}, {})
    page, errors = open_page(browser, index)
    try:
        tables = page.locator("table.concepts")
        assert tables.count() == 2 and tables.first.is_visible()
        # header: attribute, reading, truth, one column per frame; then one row per attribute
        head = tables.first.locator("th").all_inner_texts()
        assert head[:3] == ["attribute", "reading", "truth"] and len(head) == 3 + 5
        spur = tables.first.locator("tr").nth(2).locator("td").all_inner_texts()
        assert spur[0] == "<b>spur</b>" and spur[1].strip() == "0.75" and spur[2].strip() == "1.00"
        assert spur[3:] == ["0.90", "0.80", "0.70", "0.60", "0.50"]
        width = page.evaluate(
            "document.querySelector('table.concepts tr:nth-child(3) .bar').getBoundingClientRect().width"
        )
        assert width == pytest.approx(45, abs=1)  # the reading's bar: 0.75 of 60 px
        # with counterfactual: 12 images as before, plus one per attribute capsule
        assert assert_images_decoded(page) == 2 * (12 + 2)
        assert page.locator("figure.capsule figcaption").first.inner_text() == "capsule narrowing"
        assert not errors, errors
    finally:
        page.close()


def test_report_text_and_word_heatmaps_render_in_chromium(browser, tmp_path):
    from tests.explain.test_reporter import report_row

    w = GalleryWriter(tmp_path / "g", target="sick", size=32)
    w.add_batch([report_row(EVIL), make_row("b.png", counterfactual=False)], {"run": "r"})
    index = w.close({"run": "r"}, {})
    page, errors = open_page(browser, index)
    try:
        text = page.locator(".report-text")
        assert text.count() == 1 and text.first.is_visible()
        assert "Severe medial joint-space narrowing." in text.first.inner_text()
        assert EVIL in text.first.inner_text()  # shown as text, never parsed as an element
        assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
        words = page.locator(".words figcaption").all_inner_texts()
        assert words == ["osteophyte", "narrowing", "sclerosis (absent)"]
        # input + 2 maps per row, and the report row's 3 word heatmaps
        assert assert_images_decoded(page) == 2 * 3 + 3
        assert not errors, errors
    finally:
        page.close()


def test_attribute_strips_read_back_in_chromium(browser, tmp_path):
    from tests.explain.test_gallery import attribute_row

    rows = [attribute_row(EVIL), make_row("b.png", counterfactual=False)]
    w = GalleryWriter(tmp_path / "g", target="sick", size=32)
    w.add_batch(rows, {"run": "r"})
    index = w.close({"run": "r"}, {})
    page, errors = open_page(browser, index)
    try:
        found = page.evaluate(
            "Array.from(document.querySelectorAll('section.row')).map(r => "
            "Array.from(r.querySelectorAll('figure.attribute')).map(f => "
            "[f.dataset.attribute, JSON.parse(f.dataset.probs), f.querySelector('img').naturalWidth]))"
        )
        assert [[(n, p) for n, p, _ in row] for row in found] == [
            [(a.label, pytest.approx(list(a.probs))) for a in rows[0].attributes],
            [],
        ]
        assert all(width == 5 * (32 + 2) for _, _, width in found[0])
        # the input, reconstruction, 5 frames, difference, 2 maps, plot, gif; 3 strips; input, 2 maps
        assert assert_images_decoded(page) == 12 + 3 + 3
        assert not errors, errors
    finally:
        page.close()


def test_ordinal_rows_show_grades_and_their_plot_in_chromium(browser, tmp_path):
    from tests.explain.test_gallery import make_ordinal_row

    w = GalleryWriter(tmp_path / "g", target="KL4", size=32)
    w.add_batch([make_ordinal_row("a.png"), make_ordinal_row("b.png")], {"run": "kl"})
    index = w.close({"run": "kl"}, {})
    page, errors = open_page(browser, index)
    try:
        # input, reconstruction, 5 frames, difference, 2 maps, p plot, grade plot, gif
        assert assert_images_decoded(page) == 2 * 13
        caps = page.evaluate(
            "Array.from(document.querySelectorAll('section.row')[0]"
            ".querySelectorAll('figure.frame figcaption')).map(c => c.textContent)"
        )
        assert caps[0] == "λ=-2.0 E=0.30 KL0" and caps[-1] == "λ=+2.0 E=3.70 KL4"
        plot = page.locator('section.row img[alt="grade vs λ"]').first
        assert plot.evaluate("i => i.naturalWidth") > 100
        assert not errors, errors
    finally:
        page.close()
