"""CSV manifests with concept annotations: manifest columns or a separate file, and their errors."""

from __future__ import annotations

import pytest

from cfexplain.data import build_dataset
from cfexplain.data.readers import DataError
from tests.conftest import compose_config
from tests.data.test_readers import gray, open_, save_png


def _manifest(tmp_path, extra_header="", rows=("", "")):
    save_png(tmp_path / "img/a.png", gray(0))
    save_png(tmp_path / "img/b.png", gray(255))
    lines = [f"path,label,split{extra_header}"]
    lines += [f"img/{n}.png,{i},train{r}" for i, (n, r) in enumerate(zip("ab", rows))]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")


def test_manifest_columns_become_each_samples_concepts(tmp_path):
    _manifest(tmp_path, ",Spur,narrowing", (",0.25,0", ",1,0.5"))
    ds = open_(tmp_path, attributes=["Spur", "narrowing"])
    assert ds[0]["meta"]["concepts"] == {"Spur": 0.25, "narrowing": 0.0}
    assert ds[1]["meta"]["concepts"] == {"Spur": 1.0, "narrowing": 0.5}
    assert "attributes ['Spur', 'narrowing']" in ds.source
    assert "concepts" not in open_(tmp_path)[0]["meta"]  # opt-in


def test_a_separate_attributes_file_is_joined_on_the_path(tmp_path):
    _manifest(tmp_path)
    (tmp_path / "attrs").mkdir()
    # paths relative to the attributes file's own folder; rows in another order
    (tmp_path / "attrs/a.csv").write_text("spur,path\n0.9,../img/b.png\n0.1,../img/a.png\n")
    cfg = compose_config(
        "+dataset=csv",
        f"data.root={tmp_path}",
        "data.attributes=[spur]",
        f"data.attributes_file={tmp_path / 'attrs/a.csv'}",
        "data.resolution=16",
    )
    ds = build_dataset(cfg.data, "train")
    assert [ds[i]["meta"]["concepts"]["spur"] for i in range(2)] == [0.1, 0.9]


@pytest.mark.parametrize(
    "header, rows, attrs, match",
    [
        (",spur", (",0.1", ",0.2"), ["osteophyte"], r"manifest.csv: no column 'osteophyte'"),
        (",spur", (",0.1", ",high"), ["spur"], r"manifest.csv line 3: attribute spur='high'"),
        (
            ",spur",
            (",0.1", ",1.5"),
            ["spur"],
            r"line 3: attribute spur='1.5'; expected a number in \[0, 1\]",
        ),
    ],
)
def test_bad_attribute_columns_are_one_line_errors_naming_file_and_field(
    tmp_path, header, rows, attrs, match
):
    _manifest(tmp_path, header, rows)
    with pytest.raises(DataError, match=match):
        open_(tmp_path, attributes=attrs)


def test_missing_attributes_file_or_row_is_named(tmp_path):
    _manifest(tmp_path)
    with pytest.raises(DataError, match=r"nope.csv: no such attributes file"):
        open_(tmp_path, attributes=["spur"], attributes_file=tmp_path / "nope.csv")
    (tmp_path / "a.csv").write_text("path,spur\nimg/a.png,0.3\n")
    with pytest.raises(DataError, match=r"a.csv: no attributes row for the image .*b.png"):
        open_(tmp_path, attributes=["spur"], attributes_file=tmp_path / "a.csv")
