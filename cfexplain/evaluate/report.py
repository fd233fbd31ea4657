"""The evaluation's files: ``table.csv``, ``table.md``, ``per_image.csv``, ``summary.json``,
``randomisation.png`` and a self-contained ``index.html`` (relative paths, every string escaped)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from cfexplain.utils.artifacts import write_bytes, write_json, write_text
from cfexplain.utils.markup import esc, fmt, page

# Column, heading, which way is better (for the page's legend).
COLUMNS = (
    ("pointing_game", "pointing game", "↑"),
    ("relevance_mass", "relevance mass", "↑"),
    ("relevance_rank", "relevance rank", "↑"),
    ("iou_at_area", "IoU at mask area", "↑"),
    ("deletion_auc", "deletion AUC", "↓"),
    ("insertion_auc", "insertion AUC", "↑"),
    ("randomisation_cascade", "mean |ρ| over the randomisation", "↓"),
    ("randomisation_final", "ρ with every layer random", "↓"),
    ("sanity", "sanity check", ""),
    ("marker_exposure", "marker exposure", "↑ when the model uses it"),
)


def _cell(v: Any) -> str:
    return esc(fmt(v))


def table_csv(table: dict[str, dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", *[c for c, _, _ in COLUMNS]])
    for name, row in table.items():
        w.writerow([name, *[row.get(c, "") for c, _, _ in COLUMNS]])
    return buf.getvalue()


def table_markdown(table: dict[str, dict[str, Any]]) -> str:
    head = ["method", *[f"{h} {arrow}".strip() for _, h, arrow in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        lines.append(
            "| " + " | ".join([name, *[fmt(row.get(c, "")) for c, _, _ in COLUMNS]]) + " |"
        )
    return "\n".join(lines) + "\n"


def per_image_csv(per: dict[str, Any]) -> str:
    """One row per image: every method's scores, and the counterfactual's factor changes."""
    maps, cf = per["maps"], per["cf"]
    cols: dict[str, list] = {"localised": per["localised"].int().tolist()}
    for name, scores in maps.items():
        for k, v in scores.items():
            cols[f"{name}/{k}"] = v.tolist()
    if "changes" in cf:
        for i, f in enumerate(cf["factor_names"]):
            cols[f"counterfactual/change_{f}"] = cf["changes"][:, i].tolist()
        for k in ("flipped", "mnac", "marker_changed", "marker_effect", "focused_marker_changed"):
            if k in cf:
                cols[f"counterfactual/{k}"] = cf[k].float().tolist()
    if "sufficiency" in cf:
        cols["counterfactual/focus_sufficiency"] = cf["sufficiency"].tolist()
    if "cout" in cf:
        cols["counterfactual/cout"] = cf["cout"].tolist()
    if "grades" in cf:
        from cfexplain.explain.metrics import grade_rises

        cols["counterfactual/grade_rises"] = grade_rises(cf["grades"]).float().tolist()
    n = len(cols["localised"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", *cols])
    for i in range(n):
        w.writerow([i, *[fmt(float(c[i])) for c in cols.values()]])
    return buf.getvalue()


def _ordinal_section(cf: dict[str, Any]) -> list[str]:
    if "ordinal" not in cf:
        return []
    return [
        "<h2>Ordinal walk</h2>",
        "<p>Along the walk from the lowest grade to the highest: the share of images whose "
        "expected grade Σk·p_k never falls, and the factors the oracles read on every "
        "frame (joint space should narrow, osteophytes, sclerosis and deformity grow).</p>",
        _kv_table({k: _value(v) for k, v in cf["ordinal"].items()}),
    ]


def _value(v: Any) -> Any:
    return ", ".join(fmt(x) for x in v) if isinstance(v, list) else v


def plot_randomisation(sanity: dict[str, Any], path: Path) -> None:
    """Spearman correlation with the trained model's maps as layers are randomised, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, r in sanity.items():
        ax.plot(range(1, len(r["spearman"]) + 1), r["spearman"], marker=".", label=name)
    threshold = next(iter(sanity.values()))["threshold"] if sanity else 0.5
    ax.axhline(threshold, color="k", ls="--", lw=0.8, label="threshold")
    ax.set_xlabel("layers randomised (from the output)")
    ax.set_ylabel("Spearman ρ with trained maps")
    ax.set_ylim(-0.2, 1.05)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_cell(k)}</td><td>{_cell(v)}</td></tr>" for k, v in d.items())
    return f'<table class="kv">{rows}</table>'


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right}td:first-child,th:first-child{text-align:left}"
    ".kv td{text-align:left}.fail{background:#fdd}.pass{background:#dfd}.note{color:#a50}img{max-width:100%}"
)


def _reporter_section(summary: dict[str, Any]) -> list[str]:
    """The reporter's scores (``evaluate methods=[...,report]``), or nothing."""
    if "reporter" not in summary:
        return []
    return [
        "<h2>Generated reports (reporter stage)</h2>",
        "<p>The reports the reporter writes for the evaluated images: BLEU-4 against the "
        "phantom's own report; the findings read back from the text against the factors "
        "(an unstated finding counts as wrong); word pointing: for each finding word of a "
        "sentence that states the finding present and whose mask is non-empty, whether its "
        "map (params.report.span; peak: the attention of the sentence's step that looked "
        "hardest) peaks in the mask (pointing/) or within pointing_tolerance px of it "
        "(pointing_&lt;t&gt;px/), the share of its attention in the mask (mass/) and the "
        "mask's share of the image, what a uniform map would get (area/). "
        "The <i>report</i> row above scores the mean of the present words' maps as a "
        "heatmap.</p>",
        _kv_table(summary["reporter"]),
    ]


def attribute_table(attrs: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of the attribute × factor table: mean signed change per factor (std
    units; probability for binary factors), dominant factor, specificity, marker toggles; then
    the calibration rows (true one-factor edits: mean |change|)."""
    factors = list(attrs["factors"])
    columns = ["attribute", *factors, "dominant", "specificity", "dominant_mean",
               "specificity_mean", "marker_toggled"]  # fmt: skip
    rows = []
    for r in [*attrs["rows"], *attrs["calibration"]]:
        values = r.get("change", r["abs_change"])
        rows.append(
            [r["attribute"], *[values[f] for f in factors], r["dominant"], r["specificity"],
             r.get("dominant_mean", ""), r.get("specificity_mean", ""), r.get("marker_toggled", "")]
        )  # fmt: skip
    return columns, rows


def attributes_html(attrs: dict[str, Any]) -> list[str]:
    columns, rows = attribute_table(attrs)
    head = "".join(f"<th>{_cell(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return [
        "<h2>StyleSpace attributes, factor by factor</h2>",
        f"<p>The target's attributes (AttFind, shift d = {_cell(attrs['shift'])} std) on "
        f"{_cell(attrs['images'])} {_cell(attrs.get('source', 'images'))}: the oracles read every factor "
        "before and after each attribute's counterfactual. Factor columns: mean signed change "
        "(factor std units; probability for binary factors). Dominant: the factor with the "
        "largest mean |change|; specificity: its share of the summed mean |changes| (the "
        "same of the mean signed changes, where single images' reading noise averages out: "
        "dominant_mean, specificity_mean). Marker "
        f"toggled: share of the {_cell(attrs['images_with_marker'])} images with a marker whose "
        "marker reading crosses 0.5 at +d or -d. The rows “true edit” are pairs of phantoms "
        "that differ in one factor only: what a perfectly specific change reads "
        "through the same oracles (mean signed change).</p>",
        f'<table class="attributes"><tr>{head}</tr>{body}</table>',
        *(marker_corners_html(attrs["marker_by_corner"]) if "marker_by_corner" in attrs else []),
        *(coordinates_html(attrs) if attrs.get("best_coordinates") else []),
    ]


def marker_corner_line(r: dict[str, Any]) -> str:
    """One corner of :func:`~cfexplain.evaluate.factors.marker_by_corner`."""
    if not r["images"]:
        return f"{r['corner']}: no image has its marker there"
    if r["attribute"] is None:
        return f"{r['corner']}: no attribute toggles it in any of {r['images']}"
    return (f"{r['corner']}: {r['attribute']} (class {r['class']}, rank {r['rank'] + 1}) "
            f"toggles it in {r['toggled']:.2f} of {r['images']}")  # fmt: skip


def marker_corners_html(by_corner: dict[str, Any]) -> list[str]:
    rows = "".join(
        f"<tr><td>{_cell(marker_corner_line(r))}</td></tr>" for r in by_corner["corners"]
    )
    return [
        "<h3>The marker, corner by corner</h3>",
        "<p>A style coordinate scales one channel of one layer, and a generator may draw each "
        "corner's marker with its own channels. Per corner where the test images have their "
        "marker: of every class's attributes, the one that toggles it (at +d or -d) in most of "
        "those images. Together they toggle the marker in "
        f"{_cell(by_corner['toggled'])} of the images with one.</p>",
        f'<table class="attributes">{rows}</table>',
    ]


def coordinate_line(r: dict[str, Any]) -> str:
    """One factor's best single style coordinate (:func:`~cfexplain.evaluate.factors.factor_coordinates`)."""
    arrow = "+" if r["sign"] > 0 else "-"
    chosen = r.get("attfind")
    found = (
        f"AttFind's attribute {chosen[1] + 1} of class {chosen[0]}"
        if chosen
        else "not chosen by AttFind"
    )
    marker = f", marker toggled {r['marker_toggled']:.2f}" if "marker_toggled" in r else ""
    line = (f"{r['layer']}[{r['channel']}]{arrow} change {r['change']:.2f}, specificity "
            f"{r['specificity']:.2f}{marker} ({found})")  # fmt: skip
    top = r.get("most_specific")
    if top is None:
        return line + "; no coordinate moves it by the MNAC threshold"
    if top["coordinate"] == r["coordinate"] and top["sign"] == r["sign"]:
        return line + "; also the most specific"
    arrow = "+" if top["sign"] > 0 else "-"
    return (line + f"; most specific: {top['layer']}[{top['channel']}]{arrow} change "
            f"{top['change']:.2f}, specificity {top['specificity']:.2f}")  # fmt: skip


def coordinates_html(attrs: dict[str, Any]) -> list[str]:
    rows = "".join(
        f"<tr><td>{_cell(r['factor'])}</td><td>{_cell(coordinate_line(r))}</td></tr>"
        for r in attrs["best_coordinates"]
    )
    return [
        "<h3>The best single coordinate per factor</h3>",
        f"<p>Every style coordinate shifted alone by ±d std on {_cell(attrs['scan_images'])} of "
        "the images; per factor, the one that moves it most (mean |standardised change|; the "
        "marker: the one that toggles it in most images with one) and its specificity; then, of the "
        "coordinates that move it by at least the MNAC threshold, the most specific. What "
        "AttFind could at best find for that factor, whatever the classifier reads: an "
        "unspecific best coordinate means G has no single attribute for the factor.</p>",
        f'<table class="attributes">{rows}</table>',
    ]


def page_html(summary: dict[str, Any], gallery: str | None) -> str:
    table = summary["table"]
    head = "".join(f"<th>{_cell(h)} {_cell(a)}</th>" for _, h, a in COLUMNS)
    body = ""
    for name, row in table.items():
        cells = ""
        for c, _, _ in COLUMNS:
            v = row.get(c, "")
            cls = f' class="{"pass" if v == "pass" else "fail"}"' if c == "sanity" else ""
            cells += f"<td{cls}>{_cell(v)}</td>"
        body += f"<tr><td>{_cell(name)}</td>{cells}</tr>"
    header = {
        k: summary.get(k)
        for k in (
            "run",
            "classifier",
            "classifier_test_auc",
            "shortcut_rate",
            "images",
            "positives_with_mask",
            "target",
            "seconds",
        )
    }
    parts = []
    if gallery:
        parts.append(f'<p><a href="{esc(gallery)}">the gallery of this run</a></p>')
    parts += [f'<p class="note">{_cell(n)}</p>' for n in summary.get("notes", [])]
    parts += [
        "<h2>Heatmaps against the ground truth</h2>",
        "<p>Localisation over the positive test images with a pathology mask; deletion and "
        "insertion over all evaluated images; the sanity check re-initialises the classifier "
        "layer by layer from the output and fails a method whose maps keep correlating with the "
        "trained model's while it is destroyed (mean |ρ| over the cascade at or above the "
        "threshold, the dashed line).</p>",
        f"<table><tr><th>method</th>{head}</tr>{body}</table>",
        '<p><img src="randomisation.png" alt="randomisation curves"></p>',
    ]
    cf = summary.get("counterfactual")
    if cf:
        scalars = {k: v for k, v in cf.items() if not isinstance(v, (dict, list))}
        parts += ["<h2>Counterfactuals, factor by factor</h2>", _kv_table(scalars)]
        parts += _ordinal_section(cf)
        if "mean_change" in cf:
            parts += [
                "<p>Mean standardised change per factor between the reconstruction and the "
                "flipping frame (factor std units; probability for binary factors):</p>",
                _kv_table(cf["mean_change"]),
            ]
    parts += _reporter_section(summary)
    if "attributes" in summary:
        parts += attributes_html(summary["attributes"])
    oracle = summary.get("oracle")
    if oracle and "metrics" in oracle:
        rows = {
            name: ", ".join(f"{k} {fmt(v)}" for k, v in m.items())
            for name, m in oracle["metrics"].get("factors", {}).items()
        }
        parts += ["<h2>Oracles (held-out phantoms)</h2>", _kv_table(rows)]
    if "oracle_calibration" in summary:
        rows = {
            edit: f"{r['kind']}: ratio {fmt(r['ratio'])}, MNAC {fmt(r['mnac_mean'])}"
            for edit, r in summary["oracle_calibration"].items()
        }
        parts += [
            "<h2>Calibration: true one-factor edits of the phantom</h2>",
            "<p>The same ratio and MNAC on pairs of phantoms that differ in one factor only: "
            "what the metrics read when the truth is known.</p>",
            _kv_table(rows),
        ]
    if "concepts" in summary:
        parts += concepts_html(summary["concepts"])
    if "marker_reliance" in summary:
        parts += [
            "<h2>Does the classifier use the marker?</h2>",
            _kv_table(summary["marker_reliance"]),
        ]
    title = f"cfexplain evaluation · {fmt(summary.get('run', ''))}"
    return page(title, _CSS, "cfexplain evaluation", _kv_table(header), "\n".join(parts) + "\n")


def concepts_html(c: dict[str, Any]) -> list[str]:
    """The capsule classifier's section: attribute MAE and AUC, diagnosis AUC (and the
    baseline's on the same images)."""
    parts = [
        "<h2>Concept capsules: the attributes against the ground truth</h2>",
        f"<p>Attributes binarised as {esc(c['binarised'])}.</p>",
    ]
    if "per_attribute" in c:
        rows = "".join(
            f"<tr><td>{esc(n)}</td><td>{_cell(m['mae'])}</td><td>{_cell(m['auc'])}</td>"
            f"<td>{_cell(m['present'])}</td></tr>"
            for n, m in c["per_attribute"].items()
        )
        parts.append(
            '<table class="concepts"><tr><th>attribute</th><th>MAE ↓</th><th>AUC ↑</th>'
            f"<th>share present</th></tr>{rows}</table>"
        )
    else:
        parts.append('<p class="note">No ground-truth concepts for these images.</p>')
    diagnosis = {"diagnosis AUC (capsules)": c["diagnosis_auc"]}
    if "baseline_diagnosis_auc" in c:
        diagnosis[f"diagnosis AUC ({c['baseline']})"] = c["baseline_diagnosis_auc"]
    parts.append(_kv_table(diagnosis))
    return parts


def write_report(
    out: Path, summary: dict[str, Any], per: dict[str, Any], sanity: dict, gallery: str | None
) -> Path:
    """All files of the evaluation into ``out``; returns ``index.html``."""
    out = Path(out)
    write_text(out / "table.csv", table_csv(summary["table"]))
    write_text(out / "table.md", table_markdown(summary["table"]))
    write_text(out / "per_image.csv", per_image_csv(per))
    write_json(out / "summary.json", summary)
    plot_randomisation(summary["sanity"], out / "randomisation.png")
    return write_text(out / "index.html", page_html(summary, gallery))
