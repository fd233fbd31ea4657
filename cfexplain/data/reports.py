"""Radiology and pathology reports written from the phantoms' factors, and read back.

A report states every finding of a sample in one short sentence each, drawn from several
phrasings so that a model must read the image and cannot memorise one string::

    "Moderate medial joint-space narrowing. Lateral joint space preserved. Small marginal
     osteophytes. No subchondral sclerosis. No varus deformity. No lead marker. KL grade 2."

The findings are graded levels computed from the factors with the thresholds behind the
Kellgren-Lawrence grade (:func:`knee_findings`, :func:`histology_findings`); the phrasing is
drawn from a seed of the sample, so a sample's report is the same on every read. The parser
(:func:`parse_report`) maps each sentence back to its finding and level: evaluation compares
the findings of generated reports with the factors this way. ``FINDING_MASKS`` names the
ground-truth mask that each clinically meaningful word points at.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

KINDS = ("knee", "histology")
# Separates the phrasing draws from every other stream of a sample's seed.
REPORT_KEY = 19

# (finding, level) -> phrasings; a finding's levels are 0 (absent) upwards.
_KNEE: dict[tuple[str, int], tuple[str, ...]] = {}
for _side in ("medial", "lateral"):
    _KNEE |= {
        (f"narrowing_{_side}", 0): (
            f"no {_side} joint-space narrowing",
            f"{_side} joint space preserved",
            f"normal {_side} joint-space width",
        ),
        (f"narrowing_{_side}", 1): (
            f"moderate {_side} joint-space narrowing",
            f"definite narrowing of the {_side} joint space",
            f"{_side} compartment narrowing",
        ),
        (f"narrowing_{_side}", 2): (
            f"severe {_side} joint-space narrowing",
            f"marked narrowing of the {_side} joint space",
            f"{_side} joint space nearly obliterated with narrowing",
        ),
    }
_KNEE |= {
    ("osteophyte", 0): ("no osteophytes", "no marginal osteophyte formation"),
    ("osteophyte", 1): (
        "small marginal osteophytes",
        "small osteophyte at the joint margin",
        "early osteophyte formation",
    ),
    ("osteophyte", 2): (
        "large marginal osteophytes",
        "prominent osteophytes at the joint margins",
        "large osteophyte formation",
    ),
    ("sclerosis", 0): ("no subchondral sclerosis", "no sclerosis"),
    ("sclerosis", 1): ("mild subchondral sclerosis", "some subchondral sclerosis"),
    ("sclerosis", 2): ("marked subchondral sclerosis", "dense sclerosis of the tibial plateau"),
    ("deformity", 0): ("no varus deformity", "alignment maintained"),
    ("deformity", 1): ("varus deformity", "bony deformity of the joint"),
    ("marker", 0): ("no lead marker", "no side marker in the field"),
    ("marker", 1): ("lead side marker in the corner", "side marker present"),
}
_HISTOLOGY: dict[tuple[str, int], tuple[str, ...]] = {
    ("tumour", 0): ("no tumour seen", "benign tissue without carcinoma"),
    ("tumour", 1): ("small focus of carcinoma", "small tumour focus"),
    ("tumour", 2): ("extensive carcinoma", "large tumour region"),
    ("nuclei", 0): ("nuclei of normal size", "bland small nuclei"),
    ("nuclei", 1): ("enlarged pleomorphic nuclei", "enlarged hyperchromatic nuclei"),
    ("lymphocytes", 0): ("no lymphocytic infiltrate", "no inflammation"),
    ("lymphocytes", 1): ("lymphocytic infiltrate", "scattered lymphocytes"),
}
TEMPLATES: dict[str, dict[tuple[str, int], tuple[str, ...]]] = {
    "knee": _KNEE,
    "histology": _HISTOLOGY,
}
FINDINGS: dict[str, tuple[str, ...]] = {
    kind: tuple(dict.fromkeys(name for name, _ in table)) for kind, table in TEMPLATES.items()
}
_KL_PHRASES = ("KL grade {}", "Kellgren-Lawrence grade {}")

# Clinically meaningful words (as tokens) -> the ground-truth mask they point at.
FINDING_MASKS: dict[str, str] = {
    "osteophyte": "osteophyte",
    "osteophytes": "osteophyte",
    "narrowing": "joint_space",
    "sclerosis": "sclerosis",
    "marker": "marker",
    "carcinoma": "tumour",
    "tumour": "tumour",
}
# The finding whose presence a word's mask stands for (pointing is scored where it is present).
WORD_FINDINGS: dict[str, tuple[str, ...]] = {
    "osteophyte": ("osteophyte",),
    "joint_space": ("narrowing_medial", "narrowing_lateral"),
    "sclerosis": ("sclerosis",),
    "marker": ("marker",),
    "tumour": ("tumour",),
}
REPORT_WORDS = tuple(FINDING_MASKS)


def knee_findings(factors: Mapping[str, float]) -> dict[str, int]:
    """Graded knee findings from ``meta["factors"]``: narrowing per compartment 0-2 (none,
    definite, marked: the KL widths), osteophyte 0-2 (none, definite, moderate or larger),
    sclerosis 0-2, deformity 0/1, marker 0/1."""
    from cfexplain.data.phantoms import knee as k

    def narrowing(width: float) -> int:
        return 2 if width <= k.JSW_MARKED else 1 if width <= k.JSW_DEFINITE else 0

    ost, scl = float(factors["osteophyte"]), float(factors["sclerosis"])
    return {
        "narrowing_medial": narrowing(float(factors["jsw_medial"])),
        "narrowing_lateral": narrowing(float(factors["jsw_lateral"])),
        "osteophyte": 2 if ost >= k.OST_MODERATE else 1 if ost >= k.OST_DEFINITE else 0,
        "sclerosis": 2 if scl >= k.SCL_SEVERE else 1 if scl >= k.SCL_SOME else 0,
        "deformity": int(float(factors["deformity"]) >= k.DEF_PRESENT),
        "marker": int(float(factors["marker"]) >= 0.5),
    }


def histology_findings(factors: Mapping[str, float]) -> dict[str, int]:
    """Graded histology findings: tumour 0-2 (none, a small focus, extensive: its radius),
    nuclei 0/1 (enlarged in tumour), lymphocytes 0/1."""
    tumour = float(factors["tumour"]) >= 0.5
    size = 2 if float(factors["region_radius"]) >= 0.3 else 1
    return {
        "tumour": size if tumour else 0,
        "nuclei": int(tumour),
        "lymphocytes": int(float(factors["lymphocytes"]) >= 0.5),
    }


def findings_of(kind: str, factors: Mapping[str, float]) -> dict[str, int]:
    """The findings of a ``kind`` ("knee" or "histology") sample from its factors."""
    if kind == "knee":
        return knee_findings(factors)
    if kind == "histology":
        return histology_findings(factors)
    raise ValueError(f"report kind must be one of {KINDS}, got {kind!r}")


def sample_kind(meta: Mapping[str, Any]) -> str | None:
    """Which phantom a sample's ``meta`` comes from ("knee", "histology"), or None."""
    factors = meta.get("factors") or {}
    if "jsw_medial" in factors:
        return "knee"
    if "tumour" in factors:
        return "histology"
    return None


def write_report(
    kind: str,
    factors: Mapping[str, float],
    seed: Sequence[int],
    grade: int | None = None,
) -> str:
    """A report stating every finding of ``factors``; the phrasing is drawn from ``seed`` (the
    sample's seed words, e.g. ``(seed, split, index)``): the same seed, the same report.
    ``grade`` (knee) adds the KL grade as the last sentence."""
    rng = np.random.default_rng([*(int(s) for s in seed), REPORT_KEY])
    table = TEMPLATES[kind] if kind in TEMPLATES else None
    if table is None:
        raise ValueError(f"report kind must be one of {KINDS}, got {kind!r}")
    sentences = []
    for name, level in findings_of(kind, factors).items():
        options = table[(name, level)]
        sentences.append(options[int(rng.integers(len(options)))])
    if grade is not None:
        sentences.append(_KL_PHRASES[int(rng.integers(len(_KL_PHRASES)))].format(int(grade)))
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens and full stops: ``"No sclerosis. KL grade 2."`` ->
    ``["no", "sclerosis", ".", "kl", "grade", "2", "."]``."""
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*|\.", text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """Tokens back to sentences (capitalised, full stops attached)."""
    text = " ".join(tokens).replace(" .", ".")
    text = re.sub(r"(^|\. )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    return re.sub(
        r"\bk(?:l|ellgren-lawrence)\b", lambda m: _CASED[m.group(0).lower()], text, flags=re.I
    )


_CASED = {"kl": "KL", "kellgren-lawrence": "Kellgren-Lawrence"}


def _sentence_table(kind: str) -> dict[str, tuple[str, int]]:
    table = TEMPLATES[kind]
    return {" ".join(tokenize(p)): key for key, phrases in table.items() for p in phrases}


_SENTENCES = {kind: _sentence_table(kind) for kind in KINDS}
_KL = re.compile(r"^(?:kl|kellgren-lawrence) grade ([0-4])$")


def parse_report(kind: str, text: str) -> dict[str, int]:
    """The findings a report states, ``{finding: level}`` (plus ``kl_grade``), read sentence by
    sentence; a sentence that is no known phrasing is ignored, and a finding stated twice
    keeps its first statement."""
    if kind not in _SENTENCES:
        raise ValueError(f"report kind must be one of {KINDS}, got {kind!r}")
    table, out = _SENTENCES[kind], dict[str, int]()
    for sentence in " ".join(tokenize(text)).split("."):
        sentence = sentence.strip()
        if sentence in table:
            name, level = table[sentence]
            out.setdefault(name, level)
        elif m := _KL.match(sentence):
            out.setdefault("kl_grade", int(m.group(1)))
    return out


def sample_report(meta: Mapping[str, Any]) -> str | None:
    """The report of a phantom sample's ``meta`` (``meta["report"]``, written by the phantom),
    or of a reader's sample with a reports column; None when it has none."""
    report = meta.get("report")
    return str(report) if report else None
