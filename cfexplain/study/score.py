"""Score a reader study: the readers' downloaded answers against the study's key.

Turing part: per reader accuracy (Clopper-Pearson 95% CI), sensitivity for generated images and
specificity; pooled accuracy with a one-sided binomial test of "no better than chance";
Fleiss' kappa over the items every reader answered; accuracy by class and by realism score;
and the comparison with Schutte et al. 2021's 58%. Counterfactual part: the distribution of
each Likert question. Written as ``index.html``, CSV tables and ``summary.json``, and as W&B
tables.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cfexplain.study.build import KEY_FILE, KEY_FORMAT
from cfexplain.study.page import ANSWERS_FORMAT
from cfexplain.utils.artifacts import write_json, write_text
from cfexplain.utils.cli import ConfigError
from cfexplain.utils.markup import esc, fmt

LIKERT = (1, 2, 3, 4, 5)


# ----------------------------------------------------------------------------- statistics


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of ``k`` successes in ``n`` trials (NaN for n = 0)."""
    from scipy.stats import beta

    if n == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return lo, hi


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of ``counts [items, categories]``: how many raters put each item in each
    category (the same number of raters, at least 2, for every item). NaN when undefined."""
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2 or len(counts) == 0:
        return math.nan
    raters = counts.sum(axis=1)
    if not np.allclose(raters, raters[0]) or raters[0] < 2:
        raise ValueError(f"every item needs the same number (>= 2) of raters, got {raters}")
    n = raters[0]
    p_cat = counts.sum(axis=0) / counts.sum()
    agree = ((counts * (counts - 1)).sum(axis=1) / (n * (n - 1))).mean()
    chance = float((p_cat**2).sum())
    return math.nan if chance == 1 else float((agree - chance) / (1 - chance))


def proportion(k: int, n: int) -> dict[str, Any]:
    """``{n, correct, accuracy, ci_low, ci_high}`` of ``k`` of ``n``."""
    lo, hi = clopper_pearson(k, n)
    return {"n": n, "correct": k, "accuracy": k / n if n else math.nan, "ci_low": lo, "ci_high": hi}


# ----------------------------------------------------------------------------- inputs


def load_key(study: Path) -> dict[str, Any]:
    """The key of the study folder ``study``."""
    path = Path(study) / KEY_FILE
    if not path.is_file():
        raise ConfigError(f"study={study}: no {KEY_FILE} (a folder that study make wrote)")
    key = json.loads(path.read_text(encoding="utf-8"))
    if key.get("format") != KEY_FORMAT:
        raise ConfigError(f"{path}: not a study key (format {key.get('format')!r})")
    return key


def answer_files(answers: Any) -> list[Path]:
    """The files of ``answers=``: a glob or path, or a list of them."""
    patterns = [answers] if isinstance(answers, str) else [str(a) for a in answers]
    files: list[Path] = []
    for pattern in patterns:
        found = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not found:
            raise ConfigError(f"answers={pattern}: no file matches")
        files += [Path(f).resolve() for f in found if Path(f).resolve() not in files]
    return files


def load_answers(paths: Sequence[Path], key: dict[str, Any]) -> list[dict[str, Any]]:
    """Every answer of every file, joined with the key: one row per (reader, item).

    A file of another study (or of a rebuilt key) is refused, naming the file.
    """
    readers = {r["reader"]: r for r in key["readers"]}
    seen: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable answers file ({e})") from e
        if not isinstance(data, dict) or data.get("format") != ANSWERS_FORMAT:
            raise ConfigError(f"{path}: not an answers file of a study page")
        if data.get("study") != key["study_id"]:
            raise ConfigError(
                f"{path}: answers of study {data.get('study')}, but the key is of study "
                f"{key['study_id']}: they belong to another study or key"
            )
        reader = data.get("reader")
        if reader not in readers:
            raise ConfigError(f"{path}: reader {reader!r} is not in the key ({sorted(readers)})")
        if reader in seen:
            raise ConfigError(f"{path}: a second file for {reader} (the first: {seen[reader]})")
        seen[reader] = Path(path)
        rows += _join(Path(path), data, readers[reader], key)
    return rows


def _join(path: Path, data: dict, plan: dict, key: dict) -> list[dict[str, Any]]:
    """One file's answers, each with its item's key entry."""
    tokens = {e["token"]: ("turing", e["item"]) for e in plan["turing"]}
    tokens |= {e["token"]: ("counterfactual", e["item"]) for e in plan["counterfactual"]}
    rows = []
    for part in ("turing", "counterfactual"):
        for a in data.get(part) or []:
            found = tokens.get(a.get("item"))
            if found is None or found[0] != part:
                raise ConfigError(f"{path}: {part} item {a.get('item')!r} is not in the key")
            entry = key["items" if part == "turing" else "counterfactuals"][found[1]]
            if part == "turing" and a.get("answer") not in ("real", "generated"):
                raise ConfigError(f"{path}: item {a['item']}: answer {a.get('answer')!r}")
            rows.append(
                {
                    **a,
                    "token": a["item"],
                    "reader": plan["reader"],
                    "part": part,
                    "item": found[1],
                    "key": entry,
                }
            )
    return rows


# ----------------------------------------------------------------------------- analysis


def analyse(
    key: dict[str, Any], answers: list[dict[str, Any]], published: float, bins: int
) -> dict[str, Any]:
    """Every number of the report, from the key and the joined answers of :func:`load_answers`."""
    from scipy.stats import binomtest

    turing = [a for a in answers if a["part"] == "turing"]
    for a in turing:
        a["correct"] = a["answer"] == a["key"]["truth"]
    present = [
        r["reader"] for r in key["readers"] if any(a["reader"] == r["reader"] for a in answers)
    ]
    totals = {r["reader"]: len(r["turing"]) for r in key["readers"]}
    readers = [
        _reader_row(name, [a for a in turing if a["reader"] == name], totals[name])
        for name in present
    ]
    k, n = sum(a["correct"] for a in turing), len(turing)
    pooled = _reader_row("pooled", turing, sum(totals[name] for name in present))
    pooled["p_chance"] = (
        float(binomtest(k, n, 0.5, alternative="greater").pvalue) if n else math.nan
    )
    pooled["p_published"] = float(binomtest(k, n, published).pvalue) if n else math.nan
    pooled["published"] = published
    pooled["published_in_ci"] = (
        bool(pooled["ci_low"] <= published <= pooled["ci_high"]) if n else False
    )
    return {
        "study_id": key["study_id"],
        "study": {f: key[f] for f in ("run", "seed", "counts", "target", "classes")},
        "readers": readers,
        "pooled": pooled,
        "agreement": _agreement(turing, present),
        "by_class": [
            {"class": c, **proportion(sum(a["correct"] for a in g), len(g))}
            for c in key["classes"]
            if (g := [a for a in turing if a["key"]["class"] == c])
        ],
        "by_realism": _by_realism(turing, bins),
        "likert": _likert(key, [a for a in answers if a["part"] == "counterfactual"]),
        "answers": [_flat(a) for a in answers],
    }


def _reader_row(name: str, rows: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """Accuracy (with CI), sensitivity for generated images, specificity of one reader's
    answers ``rows`` (or of all readers' together) out of ``total`` items shown."""
    gen = [a for a in rows if a["key"]["truth"] == "generated"]
    real = [a for a in rows if a["key"]["truth"] == "real"]
    conf = [float(a["confidence"]) for a in rows if a.get("confidence")]
    return {
        "reader": name,
        **proportion(sum(a["correct"] for a in rows), len(rows)),
        "sensitivity": sum(a["correct"] for a in gen) / len(gen) if gen else math.nan,
        "specificity": sum(a["correct"] for a in real) / len(real) if real else math.nan,
        "mean_confidence": sum(conf) / len(conf) if conf else math.nan,
        "answered": f"{len(rows)} of {total}",
    }


def _agreement(turing: list[dict[str, Any]], readers: list[str]) -> dict[str, Any]:
    """Fleiss' kappa of the real/generated calls on the items every reader answered."""
    calls: dict[int, dict[str, str]] = {}
    for a in turing:
        calls.setdefault(a["item"], {})[a["reader"]] = a["answer"]
    full = [c for c in calls.values() if len(c) == len(readers)]
    if len(readers) < 2 or not full:
        return {"fleiss_kappa": math.nan, "items": len(full), "readers": len(readers)}
    counts = np.array(
        [[sum(v == cat for v in c.values()) for cat in ("real", "generated")] for c in full]
    )
    return {"fleiss_kappa": fleiss_kappa(counts), "items": len(full), "readers": len(readers)}


def _by_realism(turing: list[dict[str, Any]], bins: int) -> list[dict[str, Any]]:
    """Accuracy in ``bins`` equal-count bins of the items' realism scores (none without scores)."""
    scored = [a for a in turing if a["key"].get("realism") is not None]
    if not scored or bins < 1:
        return []
    values = sorted({a["item"]: a["key"]["realism"] for a in scored}.values())
    edges = np.quantile(values, np.linspace(0, 1, bins + 1))
    out = []
    for b in range(bins):
        lo, hi = float(edges[b]), float(edges[b + 1])
        g = [
            a
            for a in scored
            if int(np.searchsorted(edges[1:-1], a["key"]["realism"], "right")) == b
        ]
        gen = sum(a["key"]["truth"] == "generated" for a in g)
        out.append(
            {
                "bin": b + 1,
                "realism_low": lo,
                "realism_high": hi,
                "generated": gen,
                "real": len(g) - gen,
                **proportion(sum(a["correct"] for a in g), len(g)),
            }
        )
    return out


def _likert(key: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per question: how many answers of each level, their number, mean and median."""
    out = []
    for q in key["questions"]:
        values = [int(a[q["id"]]) for a in rows if a.get(q["id"]) in LIKERT]
        out.append(
            {
                "question": q["text"],
                **{str(v): values.count(v) for v in LIKERT},
                "n": len(values),
                "mean": float(np.mean(values)) if values else math.nan,
                "median": float(np.median(values)) if values else math.nan,
            }
        )
    return out


def _flat(a: dict[str, Any]) -> dict[str, Any]:
    """One answer row for answers.csv: the reader's answer beside the key's truth."""
    key = a["key"]
    source = key["source"]
    return {
        "reader": a["reader"],
        "part": a["part"],
        "order": a.get("order"),
        "token": a["token"],
        "item": a["item"],
        "truth": key.get("truth", "real"),
        "class": key["class"],
        "source": ";".join(f"{k}={v}" for k, v in source.items()),
        "realism": key.get("realism"),
        "answer": a.get("answer"),
        "confidence": a.get("confidence"),
        "correct": a.get("correct"),
        "plausible": a.get("plausible"),
        "explains": a.get("explains"),
        "identity": a.get("identity"),
        "comment": a.get("comment"),
        "ms": a.get("ms"),
    }


# ----------------------------------------------------------------------------- report

_TABLES = ("readers", "by_class", "by_realism", "likert", "answers")


def _csv(rows: list[dict[str, Any]]) -> str:
    """``rows`` (dicts with the same keys) as CSV text."""
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_report(out: Path, results: dict[str, Any], run: Any) -> Path:
    """``out/index.html``, one CSV per table, ``summary.json``; W&B tables through ``run``
    (a :class:`cfexplain.utils.tracking.Run`). Returns the HTML's path."""
    out = Path(out)
    pooled = {k: results["pooled"][k] for k in results["readers"][0]} if results["readers"] else {}
    tables = {name: results[name] for name in _TABLES}
    tables["readers"] = results["readers"] + [pooled] * bool(pooled)
    for name, rows in tables.items():
        write_text(out / f"{name}.csv", _csv(rows))
    summary = {k: v for k, v in results.items() if k != "answers"}
    write_json(out / "summary.json", summary)
    for name in ("readers", "by_class", "by_realism", "likert"):
        if tables[name]:
            run.log_table(
                f"study/{name}", list(tables[name][0]), [list(r.values()) for r in tables[name]]
            )
    p = results["pooled"]
    run.summary(
        {
            "study/accuracy": p["accuracy"],
            "study/p_chance": p["p_chance"],
            "study/fleiss_kappa": results["agreement"]["fleiss_kappa"],
        }
    )
    return write_text(out / "index.html", _html(results, tables))


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in r.values()) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(results: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> str:
    """The report page."""
    p, agree, s = results["pooled"], results["agreement"], results["study"]
    c = s["counts"]
    counts = (
        f"{c['readers']} readers, each {c['n_real']} real + {c['n_fake']} generated images "
        f"and {c['n_cf']} counterfactuals"
    )
    pct = lambda v: "–" if math.isnan(v) else f"{100 * v:.1f}%"  # noqa: E731
    verdict = (
        f"Pooled accuracy {pct(p['accuracy'])} (95% CI {pct(p['ci_low'])}–{pct(p['ci_high'])}, "
        f"{p['correct']} of {p['n']} answers). No better than chance (50%)? one-sided binomial "
        f"test p = {fmt(p['p_chance'], '.3g')}. Schutte et al. 2021 report {pct(p['published'])} "
        f"for radiologists on StyleGAN knee radiographs: {pct(p['published'])} lies "
        f"{'inside' if p['published_in_ci'] else 'outside'} this interval "
        f"(two-sided binomial test against it p = {fmt(p['p_published'], '.3g')})."
    )
    kappa = (
        f"Fleiss' κ = {fmt(agree['fleiss_kappa'])} over {agree['items']} items that all "
        f"{agree['readers']} readers answered (0: chance agreement, 1: perfect)."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Reader study {esc(results["study_id"])}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 24px; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f2f2f2; }}
</style></head><body>
<h1>Reader study {esc(results["study_id"])}</h1>
<p>Run {esc(s["run"])} · seed {esc(s["seed"])} · {esc(counts)}</p>
<h2>Real or generated?</h2>
<p>{esc(verdict)}</p>
<p>{esc(kappa)}</p>
<h3>Per reader</h3>
<p>Sensitivity: share of generated images called generated; specificity: of real ones called real.</p>
{_table(tables["readers"])}
<h3>By class</h3>
<p>Real images by their label, generated ones by the classifier's decision.</p>
{_table(tables["by_class"])}
<h3>By realism score</h3>
<p>Realism score (Kynkäänniemi et al. 2019) of each image against real test images that are in
no part of the study; above 1: inside the real images' manifold. Equal-count bins.</p>
{_table(tables["by_realism"])}
<h2>Counterfactuals</h2>
<p>Answers per level, 1 (disagree) to 5 (agree).</p>
{_table(tables["likert"])}
<p>Tables: readers.csv, by_class.csv, by_realism.csv, likert.csv, answers.csv (every answer
beside the key's truth); summary.json.</p>
</body></html>
"""
