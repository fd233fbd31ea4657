"""The StyleGAN2-ADA pickle importer: published format in, safetensors out, no code run.

Test snapshots are written here in the published record format without NVIDIA's code:
stand-ins named ``torch_utils.persistence._reconstruct_persistent_obj`` and
``dnnlib.util.EasyDict`` live in ``sys.modules`` only while pickling, and the tensors carry
the names and shapes of the published networks (fixture files beside the repository).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cfexplain.tools.import_stylegan2 import (
    NetworkPickleError,
    UnsafePickleError,
    convert,
    discriminator_kwargs,
    generator_kwargs,
    load_network_pickle,
    main,
)
from cfexplain.utils.artifacts import load_model, read_model_meta
from tests.conftest import run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PARAM_NAMES = FIXTURES / "stylegan2_ada_param_names"
G_FIXTURE = PARAM_NAMES / "G_res64_ch1_cbase4096_cmax128_map2_zw256.tsv"
D_FIXTURE = PARAM_NAMES / "D_res64_ch1_cbase4096_cmax128_map2_zw256.tsv"
# Text that must never run: the importer only hashes a record's module_src.
HOSTILE_SRC = "import os\nos.system('touch {pwned}')\n"


def needs_fixtures(test):
    """The published-name fixtures are the contract: a checkout without them fails, never skips."""
    assert G_FIXTURE.is_file() and D_FIXTURE.is_file(), (
        f"fixtures missing: {PARAM_NAMES} (tests/fixtures/ ships with the repository)"
    )
    return test


# ----------------------------------------------------------------------------- published format


@contextlib.contextmanager
def published_names():
    """Register stand-ins under the published module names while pickling, then remove them."""

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - the importer never calls it
        raise AssertionError("the importer must not call the pickled reconstruct function")

    class EasyDict(dict):
        pass

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    mods = {name: types.ModuleType(name) for name in ("torch_utils", "dnnlib")}
    mods["torch_utils.persistence"] = types.ModuleType("torch_utils.persistence")
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mods["dnnlib.util"] = types.ModuleType("dnnlib.util")
    mods["dnnlib.util"].EasyDict = EasyDict
    assert not set(mods) & set(sys.modules)
    sys.modules.update(mods)
    try:
        yield types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)
    finally:
        for name in mods:
            sys.modules.pop(name, None)


class Persistent:
    """Pickles as ``_reconstruct_persistent_obj(meta)``, like a published persistent module."""

    def __init__(self, ns, class_name: str, state: dict, src: str = "") -> None:
        self.ns = ns
        self.meta = dict(
            type="class", version=6, module_src=src, class_name=class_name, state=state
        )

    def __reduce__(self):
        return (self.ns.reconstruct, (self.meta,))


def module_state(params=(), buffers=(), modules=(), **attrs) -> dict:
    """A module ``__dict__`` as torch keeps it (the parts the importer reads, plus hooks)."""
    return {
        "training": False,
        "_parameters": collections.OrderedDict(params),
        "_buffers": collections.OrderedDict(buffers),
        "_non_persistent_buffers_set": set(attrs.pop("transient", ())),
        "_forward_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict(modules),
        **attrs,
    }


def read_fixture(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, kind = line.split("\t")
            rows.append((name, tuple(json.loads(shape)), kind))
    return rows


def build_network(ns, rows, class_name, init_kwargs, seed, src="", extras=None):
    """Nest ``rows`` into module records; returns ``(record, {name: tensor})``.

    ``extras(ns, path) -> dict`` may add entries to a module's state (None params, empty
    children, transient buffers) that must not show up in the state_dict.
    """
    gen = torch.Generator().manual_seed(seed)
    tree = lambda: {"params": {}, "buffers": {}, "children": {}}  # noqa: E731
    root, values = tree(), {}
    for name, shape, kind in rows:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            node = node["children"].setdefault(part, tree())
        values[name] = torch.randn(shape, generator=gen)
        if kind == "param":
            node["params"][leaf] = torch.nn.Parameter(values[name])
        else:
            node["buffers"][leaf] = values[name]

    def record(node, path, cls):
        state = module_state(
            node["params"].items(),
            node["buffers"].items(),
            [
                (k, record(v, f"{path}{k}.", "training.networks.Layer"))
                for k, v in node["children"].items()
            ],
        )
        for key, value in (extras(ns, path) if extras else {}).items():
            if isinstance(state.get(key), dict):
                state[key].update(value)
            else:
                state[key] = value
        return Persistent(ns, cls, state, src)

    top = record(root, "", class_name)
    top.meta["state"]["_init_args"] = ()
    top.meta["state"]["_init_kwargs"] = init_kwargs
    return top, values


def g_kwargs(ns, c_dim=0):
    E = ns.EasyDict
    return E(
        z_dim=256,
        c_dim=c_dim,
        w_dim=256,
        img_resolution=64,
        img_channels=1,
        mapping_kwargs=E(num_layers=2),
        synthesis_kwargs=E(channel_base=4096, channel_max=128, num_fp16_res=4, conv_clamp=256),
    )


def d_kwargs(ns):
    E = ns.EasyDict
    return E(
        c_dim=0,
        img_resolution=64,
        img_channels=1,
        channel_base=4096,
        channel_max=128,
        num_fp16_res=4,
        conv_clamp=256,
        block_kwargs=E(),
        mapping_kwargs=E(),
        epilogue_kwargs=E(mbstd_group_size=4),
    )


def g_extras(ns, path):
    if path == "synthesis.b8.torgb.":  # published layers keep e.g. a NumPy weight gain
        return {"weight_gain": np.float64(1 / np.sqrt(128)), "dtype": np.dtype("float32")}
    return {}


def d_extras(ns, path):
    if path == "b64.skip.":  # a layer built without bias, and a non-persistent buffer
        return {
            "_parameters": {"bias": None},
            "_buffers": {"tmp": torch.ones(3)},
            "_non_persistent_buffers_set": {"tmp"},
        }
    if path == "b4.":  # a child without tensors (the minibatch-std layer) and a None child
        empty = Persistent(ns, "training.networks.MinibatchStdLayer", module_state(group_size=4))
        return {"_modules": {"mbstd": empty, "unused": None}}
    return {}


def write_snapshot(path: Path, protocol: int = 3, c_dim: int = 0, src: str = "") -> dict:
    """A published-format snapshot at ``path``; returns ``{network: {name: tensor}}``."""
    g_rows, d_rows = read_fixture(G_FIXTURE), read_fixture(D_FIXTURE)
    with published_names() as ns:
        G, g_vals = build_network(
            ns, g_rows, "training.networks.Generator", g_kwargs(ns, c_dim), 1, src, g_extras
        )
        G_ema, ema_vals = build_network(
            ns, g_rows, "training.networks.Generator", g_kwargs(ns, c_dim), 2, src, g_extras
        )
        D, d_vals = build_network(
            ns, d_rows, "training.networks.Discriminator", d_kwargs(ns), 3, src, d_extras
        )
        augment = Persistent(
            ns,
            "training.augment.AugmentPipe",
            module_state(buffers=[("p", torch.zeros([]))], xflip=np.float64(1.0)),
            src,
        )
        augment.meta["state"]["_init_kwargs"] = ns.EasyDict(xflip=1, rotate90=1)
        snapshot = dict(
            training_set_kwargs=ns.EasyDict(
                class_name="training.dataset.ImageFolderDataset",
                path="~/datasets/knee64.zip",
                use_labels=False,
                max_size=np.int64(2000),
                resolution=64,
            ),
            G=G,
            D=D,
            G_ema=G_ema,
            augment_pipe=augment,
        )
        path.write_bytes(pickle.dumps(snapshot, protocol=protocol))
    return {"G": g_vals, "G_ema": ema_vals, "D": d_vals}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snapshot")
    pkl = tmp / "network-snapshot-000000.pkl"
    values = write_snapshot(pkl, src=HOSTILE_SRC.format(pwned=tmp / "pwned"))
    return pkl, values


# ----------------------------------------------------------------------------- round trip


@needs_fixtures
def test_load_yields_published_names_in_order_with_values(snapshot):
    pkl, values = snapshot
    nets = load_network_pickle(pkl)
    assert list(nets) == ["G", "D", "G_ema", "augment_pipe"]
    for name, fixture in (("G", G_FIXTURE), ("G_ema", G_FIXTURE), ("D", D_FIXTURE)):
        sd = nets[name]["state_dict"]
        assert [(k, tuple(v.shape)) for k, v in sd.items()] == [
            (n, s) for n, s, _ in read_fixture(fixture)
        ]
        assert all(torch.equal(sd[k], values[name][k]) for k in sd)
    assert nets["G"]["class_name"] == "training.networks.Generator"
    assert nets["G"]["init_kwargs"]["synthesis_kwargs"] == {
        "channel_base": 4096,
        "channel_max": 128,
        "num_fp16_res": 4,
        "conv_clamp": 256,
    }
    assert type(nets["G"]["init_kwargs"]["mapping_kwargs"]) is dict
    assert list(nets["augment_pipe"]["state_dict"]) == ["p"]
    assert not (pkl.parent / "pwned").exists()  # module_src is never executed


@needs_fixtures
def test_load_reads_protocol_5(tmp_path):
    pkl = tmp_path / "p5.pkl"
    values = write_snapshot(pkl, protocol=5)
    sd = load_network_pickle(pkl)["D"]["state_dict"]
    assert list(sd) == list(values["D"]) and all(torch.equal(sd[k], values["D"][k]) for k in sd)


@needs_fixtures
def test_convert_writes_the_same_tensors(snapshot, tmp_path):
    pkl, values = snapshot
    summary = convert(pkl, tmp_path / "out", verify=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "D.safetensors",
        "G.safetensors",
        "G_ema.safetensors",
        "import.json",
    ]
    for name in ("G", "G_ema", "D"):
        tensors = load_file(str(out / f"{name}.safetensors"))
        assert set(tensors) == set(values[name])
        assert all(torch.equal(tensors[k], values[name][k]) for k in values[name])
    target, kwargs = read_model_meta(out / "G_ema.safetensors")
    assert target == "cfexplain.nn.stylegan2.Generator"
    assert kwargs == dict(
        z_dim=256,
        w_dim=256,
        img_resolution=64,
        img_channels=1,
        mapping_layers=2,
        channel_base=4096,
        channel_max=128,
        mapping_lr_multiplier=0.01,
        w_avg_beta=0.995,
        conv_clamp=256,
    )
    target, kwargs = read_model_meta(out / "D.safetensors")
    assert target == "cfexplain.nn.stylegan2.Discriminator"
    assert kwargs == dict(
        img_resolution=64,
        img_channels=1,
        channel_base=4096,
        channel_max=128,
        mbstd_group_size=4,
        mbstd_channels=1,
        conv_clamp=256,
    )
    record = json.loads((out / "import.json").read_text())
    assert record == json.loads(json.dumps(summary))
    assert record["source"] == str(pkl.resolve()) and len(record["sha256"]) == 64
    assert record["training_set_kwargs"]["max_size"] == 2000
    assert record["not_imported"] == ["augment_pipe"]
    assert record["networks"]["G"]["ignored_settings"] == {"synthesis_kwargs.num_fp16_res": 4}
    assert not list(out.glob(".*tmp"))


@needs_fixtures
def test_imported_networks_load_into_ours_and_run(snapshot, tmp_path):
    pytest.importorskip("cfexplain.nn.stylegan2", reason="cfexplain.nn.stylegan2 not written yet")
    pkl, values = snapshot
    convert(pkl, tmp_path, verify=True)  # builds ours on the meta device, compares names/shapes
    G = load_model(tmp_path / "G_ema.safetensors")  # load_state_dict(strict=True)
    assert all(torch.equal(G.state_dict()[k], v) for k, v in values["G_ema"].items())
    with torch.no_grad():
        w = G.mapping(torch.randn(2, 256))
        img = G.synthesis(w)
    assert w.shape == (2, 10, 256) and img.shape == (2, 1, 64, 64)
    assert torch.isfinite(img).all()
    D = load_model(tmp_path / "D.safetensors")
    with torch.no_grad():
        assert D(img.clamp(-1, 1).repeat(2, 1, 1, 1)).shape == (4, 1)


def test_verify_refuses_weights_that_do_not_fit_ours(tmp_path):
    pytest.importorskip("cfexplain.nn.stylegan2", reason="cfexplain.nn.stylegan2 not written yet")
    with published_names() as ns:
        params = [("weight", torch.nn.Parameter(torch.ones(2)))]
        G = Persistent(ns, "training.networks.Generator", module_state(params))
        G.meta["state"]["_init_kwargs"] = g_kwargs(ns)
        (tmp_path / "odd.pkl").write_bytes(pickle.dumps({"G_ema": G}))
    with pytest.raises(NetworkPickleError, match="odd.pkl: G_ema: weights do not fit"):
        convert(tmp_path / "odd.pkl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- hostile pickles


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _hostile(kind: str, pwned: Path) -> tuple[object, str]:
    if kind == "os.system":
        return Evil(os.system, f"touch {pwned}"), r"'(os|posix)\.system'"
    if kind == "builtins.eval":
        return Evil(builtins.eval, f"open({str(pwned)!r}, 'w')"), r"'builtins\.eval'"
    return Evil(subprocess.Popen, ["touch", str(pwned)]), r"'subprocess\.Popen'"


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_hostile_callables_are_refused_before_running(kind, tmp_path):
    pwned = tmp_path / "pwned"
    evil, named = _hostile(kind, pwned)
    pkl = tmp_path / "evil.pkl"
    with published_names() as ns:  # hidden inside a network record, as an attacker would
        G = Persistent(ns, "training.networks.Generator", module_state(payload=evil))
        pkl.write_bytes(pickle.dumps({"training_set_kwargs": {}, "G": G}))
    with pytest.raises(UnsafePickleError, match=named) as err:
        load_network_pickle(pkl)
    assert "evil.pkl" in str(err.value)
    assert not pwned.exists()


def test_hostile_storage_payload_is_refused(tmp_path):
    """``_load_from_bytes`` itself unpickles: its payload goes through weights_only."""
    pwned = tmp_path / "pwned"
    payload = Evil(torch.storage._load_from_bytes, pickle.dumps(Evil(os.system, f"touch {pwned}")))
    pkl = tmp_path / "storage.pkl"
    pkl.write_bytes(pickle.dumps({"G": payload}))
    with pytest.raises(UnsafePickleError, match="storage.pkl.*weights_only"):
        load_network_pickle(pkl)
    assert not pwned.exists()


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_persistent_ids_and_bad_tensor_records_are_refused(tmp_path):
    class WithIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "secret" if obj == "x" else None

    pkl = tmp_path / "pid.pkl"
    with open(pkl, "wb") as f:
        WithIds(f).dump({"G": "x"})
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_network_pickle(pkl)
    # A tensor record pointing past its storage would read foreign memory.
    t = torch.arange(4.0)
    overrun = Evil(
        torch._utils._rebuild_tensor_v2,
        t.storage(),
        2,
        (4,),
        (1,),
        False,
        collections.OrderedDict(),
    )
    (tmp_path / "overrun.pkl").write_bytes(pickle.dumps({"G": overrun}))
    with pytest.raises(NetworkPickleError, match="reaches element 6 of a storage of 4"):
        load_network_pickle(tmp_path / "overrun.pkl")


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "change, message",
    [
        ({"c_dim": 2}, r"conditional network \(c_dim=2\)"),
        (
            {"synthesis_kwargs": {"architecture": "resnet"}},
            "'synthesis_kwargs.architecture'='resnet'",
        ),
        ({"z_dim": None}, "'z_dim'=None, expected an integer"),
        (
            {"mapping_kwargs": {"activation": "relu"}},
            "'mapping_kwargs.activation'='relu' is not supported",
        ),
        ({"synthesis_kwargs": {"channels_last": True}}, "unsupported settings"),
    ],
)
def test_generator_settings_we_cannot_represent_are_refused(change, message):
    published = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=1)
    published.update(change)
    with pytest.raises(NetworkPickleError, match=message):
        generator_kwargs(published, "G")


def test_settings_map_with_published_defaults():
    ours = generator_kwargs(dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3))
    assert (
        ours["mapping_layers"] == 8 and ours["channel_base"] == 32768 and ours["conv_clamp"] is None
    )
    d = discriminator_kwargs(dict(c_dim=0, img_resolution=16, img_channels=3, mbstd_group_size=8))
    assert d == dict(
        img_resolution=16,
        img_channels=3,
        channel_base=32768,
        channel_max=512,
        mbstd_group_size=8,
        mbstd_channels=1,
        conv_clamp=None,
    )
    with pytest.raises(NetworkPickleError, match="G: missing 'img_channels'"):
        generator_kwargs(dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=16))
    with pytest.raises(NetworkPickleError, match="'architecture'='skip'"):
        discriminator_kwargs(dict(c_dim=0, img_resolution=16, img_channels=3, architecture="skip"))


# ----------------------------------------------------------------------------- command line


def test_cli_refuses_a_hostile_pickle_with_exit_2(tmp_path):
    pwned = tmp_path / "pwned"
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"G": Evil(os.system, f"touch {pwned}")}))
    r = run_cli("cfexplain.tools.import_stylegan2", "bad.pkl", "out/", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.pkl" in lines[0] and "system" in lines[0], r.stderr
    assert not pwned.exists() and not (tmp_path / "out").exists()


def test_cli_refuses_a_conditional_network(tmp_path, capsys):
    with published_names() as ns:
        G = Persistent(
            ns,
            "training.networks.Generator",
            module_state([("w", torch.nn.Parameter(torch.ones(2)))]),
        )
        G.meta["state"]["_init_kwargs"] = g_kwargs(ns, c_dim=2)
        (tmp_path / "cond.pkl").write_bytes(pickle.dumps({"G_ema": G}))
    assert main([str(tmp_path / "cond.pkl"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cond.pkl" in err and "conditional network (c_dim=2)" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "missing.pkl"), str(tmp_path / "out")]) == 2
    assert "missing.pkl" in capsys.readouterr().err
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    assert main([str(tmp_path / "junk.pkl"), str(tmp_path / "out")]) == 2
    assert "junk.pkl: not a readable pickle" in capsys.readouterr().err
