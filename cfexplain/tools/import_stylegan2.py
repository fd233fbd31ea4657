"""Import a published StyleGAN2-ADA network pickle as cfexplain safetensors, running none of its code.

A snapshot ``.pkl`` is a plain pickle of ``{training_set_kwargs, G, D, G_ema, augment_pipe}``;
each network is a call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose
``meta`` carries the class's source text (which the original loader executes) and the module's
``__dict__``. Here a restricted unpickler resolves only a fixed list of globals, records ``meta``
instead of rebuilding the class, and loads storages with ``torch.load(weights_only=True)``;
the weights are read off ``_parameters``/``_buffers``/``_modules`` under their
``state_dict()`` names.

    python -m cfexplain.tools.import_stylegan2 network.pkl out/

writes ``out/{G_ema,G,D}.safetensors`` (whichever the pickle holds; each loads with
:func:`cfexplain.utils.artifacts.load_model`) and ``out/import.json`` (provenance).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file

from cfexplain.utils.artifacts import import_target, write_json

GENERATOR_TARGET = "cfexplain.nn.stylegan2.Generator"
DISCRIMINATOR_TARGET = "cfexplain.nn.stylegan2.Discriminator"
NETWORKS = ("G_ema", "G", "D")  # what convert() writes, in this order
RECORD_VERSION = 6  # the published persistence record format


class NetworkPickleError(ValueError):
    """The file is not a StyleGAN2-ADA network pickle that cfexplain can import."""


class UnsafePickleError(NetworkPickleError):
    """The pickle asks for a callable or feature outside the allow-list; nothing was run."""


# ----------------------------------------------------------------------------- unpickling


class _Record:
    """What ``_reconstruct_persistent_obj(meta)`` stands for: the meta, never the class."""

    __slots__ = ("class_name", "state", "module_src_sha256")

    def __init__(self, class_name: str, state: dict, module_src_sha256: str) -> None:
        self.class_name = class_name
        self.state = state
        self.module_src_sha256 = module_src_sha256


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict that tolerates a pickled ``__dict__``."""

    def __setstate__(self, state: Any) -> None:  # EasyDict keeps no instance attributes
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a published snapshot needs; anything else is refused."""

    def __init__(self, file: BinaryIO, source: Path) -> None:
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals(self._record, self._load_storage)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused to load '{module}.{name}': the pickle asks for a "
                "callable outside the StyleGAN2-ADA allow-list (nothing was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self._source}: refused a persistent id ({type(pid).__name__}); "
            "published snapshots use none (nothing was executed)"
        )

    def _record(self, meta: Any) -> _Record:
        where = f"{self._source}: persistent object record"
        if not isinstance(meta, dict):
            raise NetworkPickleError(f"{where} is a {type(meta).__name__}, expected a dict")
        if meta.get("type") != "class":
            raise NetworkPickleError(f"{where} has type {meta.get('type')!r}, expected 'class'")
        if meta.get("version") != RECORD_VERSION:
            raise NetworkPickleError(
                f"{where} has version {meta.get('version')!r}, expected {RECORD_VERSION}"
            )
        class_name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src")
        if not isinstance(class_name, str) or not isinstance(state, dict):
            raise NetworkPickleError(f"{where} lacks a class_name string or a state dict")
        src_hash = hashlib.sha256(src.encode()).hexdigest() if isinstance(src, str) else ""
        return _Record(class_name, state, src_hash)  # module_src is text only: never executed

    def _load_storage(self, data: Any) -> Any:
        if not isinstance(data, bytes | bytearray):
            raise NetworkPickleError(f"{self._source}: storage payload is not bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TypedStorage deprecation and protocol notes
                storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UnsafePickleError(
                f"{self._source}: refused a tensor storage: torch.load(weights_only=True) "
                f"rejected it ({first})"
            ) from None
        except Exception as e:
            raise NetworkPickleError(
                f"{self._source}: unreadable tensor storage ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(storage, torch.storage.TypedStorage):
            raise NetworkPickleError(
                f"{self._source}: storage payload holds a {type(storage).__name__}, "
                "expected a tensor storage"
            )
        return storage


def _allowed_globals(record, load_storage) -> dict[tuple[str, str], Any]:
    """The whole allow-list: ``(module, name)`` as written in the pickle -> what to call."""
    import numpy as np

    try:  # NumPy 2 moved it; the pickle may name either, both mean the same constructor
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import scalar

    return {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): record,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): load_storage,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        # Protocol <= 3 (Python 3.7, which the snapshots were made with) spells a set, such as
        # a module's ``_non_persistent_buffers_set``, as a call of ``builtins.set``.
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
    }


def _rebuild_tensor(
    storage, offset, size, stride, requires_grad=False, hooks=None, *_
) -> torch.Tensor:
    """A view of ``storage``, bounds-checked (``Tensor.set_`` does not check them)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise NetworkPickleError(f"tensor record without a storage ({type(storage).__name__})")
    size, stride = tuple(size), tuple(stride)
    ints = (offset, *size, *stride)
    if len(size) != len(stride) or not all(type(i) is int and i >= 0 for i in ints):
        raise NetworkPickleError(
            f"malformed tensor record: offset {offset} size {size} stride {stride}"
        )
    empty = torch.empty(0, dtype=storage.dtype)
    numel = storage._untyped_storage.nbytes() // empty.element_size()
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if 0 not in size and end > numel:
        raise NetworkPickleError(
            f"tensor record reaches element {end} of a storage of {numel} elements"
        )
    return empty.set_(storage._untyped_storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *_) -> torch.Tensor:
    """Parameters come back as plain tensors: only their values matter here."""
    if not isinstance(data, torch.Tensor):
        raise NetworkPickleError(f"parameter record without a tensor ({type(data).__name__})")
    return data


# ----------------------------------------------------------------------------- reading


def _read_snapshot(path: Path) -> dict[str, Any]:
    """The pickle's top-level dict, with networks as :class:`_Record`."""
    try:
        with open(path, "rb") as f:
            top = _RestrictedUnpickler(f, path).load()
    except (NetworkPickleError, OSError):
        raise
    except Exception as e:  # a corrupt stream can raise nearly anything; say which file
        raise NetworkPickleError(
            f"{path}: not a readable pickle ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(top, dict):
        raise NetworkPickleError(
            f"{path}: top level is a {type(top).__name__}, expected the snapshot dict "
            "{training_set_kwargs, G, D, G_ema, augment_pipe}"
        )
    return top


def _state_dict(record: _Record, where: str) -> collections.OrderedDict[str, torch.Tensor]:
    """``state_dict()`` of a recorded module: own params, own persistent buffers, children.

    ``None`` entries (a layer built without bias) are skipped, and so are buffers named in
    ``_non_persistent_buffers_set``, exactly as ``nn.Module.state_dict`` does.
    """
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def walk(rec: _Record, prefix: str) -> None:
        state = rec.state
        parts = {k: state.get(k) for k in ("_parameters", "_buffers", "_modules")}
        for key, value in parts.items():
            if not isinstance(value, Mapping):
                raise NetworkPickleError(
                    f"{where}: module '{prefix.rstrip('.') or '<root>'}' ({rec.class_name}) "
                    f"has no {key} dict; not a torch module record"
                )
        transient = set(state.get("_non_persistent_buffers_set") or ())
        tensors = [*parts["_parameters"].items()]
        tensors += [(k, v) for k, v in parts["_buffers"].items() if k not in transient]
        for name, tensor in tensors:
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise NetworkPickleError(
                    f"{where}: '{prefix}{name}' is a {type(tensor).__name__}, expected a tensor"
                )
            out[prefix + name] = tensor
        for name, child in parts["_modules"].items():
            if child is None:
                continue
            if not isinstance(child, _Record):
                raise NetworkPickleError(
                    f"{where}: child module '{prefix}{name}' is a {type(child).__name__}, "
                    "expected a persistent module record"
                )
            walk(child, f"{prefix}{name}.")

    walk(record, "")
    return out


def _dicts(value: Any) -> Any:
    """``value`` with mappings as plain dicts, tuples as lists and NumPy scalars as Python's."""
    if isinstance(value, Mapping):
        return {k: _dicts(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dicts(v) for v in value]
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _plain(value: Any) -> Any:
    """JSON-able copy of ``value``: dicts, lists and scalars; anything else becomes ``_DROP``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()  # a NumPy or 0-d torch scalar
    if isinstance(value, Mapping):
        items = {str(k): _plain(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _DROP}
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    return _DROP


_DROP = object()


def load_network_pickle(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read every network of a published snapshot without executing its code.

    Returns ``{name: {"class_name", "init_kwargs", "state_dict"}}`` for each top-level entry
    that is a module (``G``, ``D``, ``G_ema``, ``augment_pipe``), where ``state_dict`` is an
    ``OrderedDict[str, Tensor]`` with the names and order of the published ``state_dict()``
    and ``init_kwargs`` the constructor kwargs as plain dicts.
    Raises :class:`UnsafePickleError` for anything outside the allow-list.
    """
    path = Path(path)
    return _networks(path, _read_snapshot(path))


def _networks(path: Path, top: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nets = {}
    for name, rec in top.items():
        if not isinstance(rec, _Record):
            continue
        where = f"{path}: {name}"
        args = rec.state.get("_init_args") or ()
        if len(args):
            raise NetworkPickleError(
                f"{where}: built with {len(args)} positional constructor arguments; only "
                "keyword arguments (as the published training script uses) can be mapped"
            )
        init_kwargs = _dicts(rec.state.get("_init_kwargs") or {})
        if not isinstance(init_kwargs, dict):
            raise NetworkPickleError(f"{where}: _init_kwargs is not a dict")
        nets[str(name)] = {
            "class_name": rec.class_name,
            "init_kwargs": init_kwargs,
            "state_dict": _state_dict(rec, where),
            "module_src_sha256": rec.module_src_sha256,
        }
    return nets


# ----------------------------------------------------------------------------- kwargs mapping

# Published constructor defaults for settings our networks do not take as arguments. A value
# equal to the default is accepted; any other value changes the forward pass: refused.
_FIXED = {
    "mapping_kwargs.embed_features": None,
    "mapping_kwargs.layer_features": None,
    "mapping_kwargs.activation": "lrelu",
    "synthesis_kwargs.resample_filter": [1, 3, 3, 1],
    "synthesis_kwargs.use_noise": True,
    "synthesis_kwargs.activation": "lrelu",
    "block_kwargs.activation": "lrelu",
    "block_kwargs.resample_filter": [1, 3, 3, 1],
    "epilogue_kwargs.activation": "lrelu",
}
# Settings of precision, memory layout or training only: they leave the float32 forward alone.
_IGNORED = {
    "class_name",
    "synthesis_kwargs.num_fp16_res",
    "synthesis_kwargs.fp16_channels_last",
    "synthesis_kwargs.fused_modconv_default",
    "num_fp16_res",
    "block_kwargs.fp16_channels_last",
    "block_kwargs.freeze_layers",
    "cmap_dim",  # conditional D only
}


def _flatten(kwargs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in kwargs.items():
        if isinstance(value, Mapping) and key.endswith("_kwargs"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


class _Kwargs:
    """Takes published settings one by one; what is left at the end was not understood."""

    def __init__(self, init_kwargs: Mapping[str, Any], where: str) -> None:
        self.left = _flatten(init_kwargs)
        self.where = where

    def take(self, *keys: str, default: Any = _DROP) -> Any:
        found = [k for k in keys if k in self.left]
        values = {k: self.left.pop(k) for k in found}
        if any(v != values[found[0]] for v in values.values()):
            raise NetworkPickleError(f"{self.where}: conflicting values {values}")
        if values:
            return next(iter(values.values()))
        if default is _DROP:
            raise NetworkPickleError(
                f"{self.where}: missing '{keys[0]}' in the published constructor kwargs "
                f"(has {sorted(self.left)})"
            )
        return default

    def integer(self, *keys: str, default: Any = _DROP, minimum: int = 0) -> int:
        value = self.take(*keys, default=default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise NetworkPickleError(
                f"{self.where}: '{keys[0]}'={value!r}, expected an integer >= {minimum}"
            )
        return value

    def finish(self, ignored: dict[str, Any]) -> None:
        for key in list(self.left):
            if key in _IGNORED:
                ignored[key] = self.left.pop(key)
            elif key in _FIXED:
                value = self.left.pop(key)
                if value != _FIXED[key]:
                    raise NetworkPickleError(
                        f"{self.where}: '{key}'={value!r} is not supported (cfexplain's "
                        f"networks are fixed to the published default {_FIXED[key]!r})"
                    )
        if self.left:
            raise NetworkPickleError(
                f"{self.where}: unsupported settings {self.left}; cfexplain cannot represent them"
            )


def _unconditional(kw: _Kwargs) -> None:
    c_dim = kw.integer("c_dim")
    if c_dim != 0:
        raise NetworkPickleError(
            f"{kw.where}: conditional network (c_dim={c_dim}); cfexplain's StyleGAN2 is "
            "unconditional (c_dim=0), retrain or pick an unconditional snapshot"
        )


def _architecture(kw: _Kwargs, key: str, default: str, supported: str) -> None:
    arch = kw.take(key, default=default)
    if arch != supported:
        raise NetworkPickleError(
            f"{kw.where}: '{key}'={arch!r} is not supported (cfexplain implements the "
            f"'{supported}' architecture only)"
        )


def generator_kwargs(
    init_kwargs: Mapping[str, Any], where: str = "G", ignored: dict | None = None
) -> dict[str, Any]:
    """Our ``Generator`` kwargs from the published ``Generator``'s ``_init_kwargs``.

    Absent optional settings take the published defaults (mapping 8 layers with learning-rate
    multiplier 0.01 and w_avg beta 0.995, channel_base 32768, channel_max 512, no conv clamp,
    'skip'). ``ignored`` collects training-only
    settings that were dropped.
    """
    kw, ignored = _Kwargs(init_kwargs, where), ({} if ignored is None else ignored)
    _unconditional(kw)
    out = {
        "z_dim": kw.integer("z_dim", minimum=1),
        "w_dim": kw.integer("w_dim", minimum=1),
        "img_resolution": kw.integer("img_resolution", minimum=4),
        "img_channels": kw.integer("img_channels", minimum=1),
        "mapping_layers": kw.integer("mapping_kwargs.num_layers", default=8, minimum=1),
        "channel_base": kw.integer("synthesis_kwargs.channel_base", default=32768, minimum=1),
        "channel_max": kw.integer("synthesis_kwargs.channel_max", default=512, minimum=1),
        "mapping_lr_multiplier": _number(kw, "mapping_kwargs.lr_multiplier", 0.01),
        "w_avg_beta": _number(kw, "mapping_kwargs.w_avg_beta", 0.995),
        "conv_clamp": _number(kw, "synthesis_kwargs.conv_clamp", None),
    }
    _architecture(kw, "synthesis_kwargs.architecture", "skip", "skip")
    kw.finish(ignored)
    return out


def discriminator_kwargs(
    init_kwargs: Mapping[str, Any], where: str = "D", ignored: dict | None = None
) -> dict[str, Any]:
    """Our ``Discriminator`` kwargs from the published ``Discriminator``'s ``_init_kwargs``.

    Absent optional settings take the published defaults (channel_base 32768, channel_max
    512, minibatch-std group 4 with 1 channel, no conv clamp, 'resnet').
    """
    kw, ignored = _Kwargs(init_kwargs, where), ({} if ignored is None else ignored)
    _unconditional(kw)
    out = {
        "img_resolution": kw.integer("img_resolution", minimum=4),
        "img_channels": kw.integer("img_channels", minimum=1),
        "channel_base": kw.integer("channel_base", default=32768, minimum=1),
        "channel_max": kw.integer("channel_max", default=512, minimum=1),
        "mbstd_group_size": kw.integer(
            "epilogue_kwargs.mbstd_group_size", "mbstd_group_size", default=4, minimum=1
        ),
        "mbstd_channels": kw.integer(
            "epilogue_kwargs.mbstd_num_channels", "mbstd_num_channels", default=1
        ),
        "conv_clamp": _number(kw, "conv_clamp", None),
    }
    _architecture(kw, "architecture", "resnet", "resnet")
    # The mapping of a conditional D; with c_dim = 0 it is never built.
    for key in [k for k in kw.left if k.startswith("mapping_kwargs.")]:
        ignored[key] = kw.left.pop(key)
    kw.finish(ignored)
    return out


def _number(kw: _Kwargs, key: str, default: float | None) -> float | int | None:
    value = kw.take(key, default=default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NetworkPickleError(f"{kw.where}: '{key}'={value!r}, expected a number")
    return value


# ----------------------------------------------------------------------------- writing


def _check_against_model(target: str, kwargs: dict, state: Mapping[str, torch.Tensor], where: str):
    """Build our module from ``kwargs`` and demand the same tensor names and shapes."""
    try:
        cls = import_target(target)
    except ImportError as e:
        raise NetworkPickleError(f"{where}: cannot verify against {target}: {e}") from None
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = cls(**kwargs)
    except Exception:
        try:  # a constructor that computes on its tensors cannot run on meta
            model = cls(**kwargs)
        except Exception as e:
            raise NetworkPickleError(
                f"{where}: {target}(**{kwargs}) failed: {type(e).__name__}: {e}"
            ) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shapes = [
        f"{k} {got[k]} vs {expected[k]}" for k in expected if k in got and got[k] != expected[k]
    ]
    if missing or extra or shapes:
        raise NetworkPickleError(
            f"{where}: weights do not fit {target}({kwargs}): missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}, shape mismatches {shapes[:5]}"
        )


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], target: str, kwargs: dict):
    """safetensors with :func:`cfexplain.utils.artifacts.save_model` metadata, atomically."""
    meta = {"target": target, "kwargs": json.dumps(kwargs)}
    # Each tensor gets its own contiguous memory: safetensors refuses shared storages.
    data = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(data, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(pkl: str | Path, out_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Write ``out_dir/{G_ema,G,D}.safetensors`` and ``out_dir/import.json`` from a snapshot.

    Every network is checked (kwargs mapped, and with ``verify`` our module built on the meta
    device and compared name by name, shape by shape) before anything is written.
    Returns the ``import.json`` content.
    """
    pkl, out_dir = Path(pkl), Path(out_dir)
    top = _read_snapshot(pkl)
    nets = _networks(pkl, top)
    todo = [n for n in NETWORKS if n in nets]
    if not todo:
        raise NetworkPickleError(
            f"{pkl}: holds no network named {', '.join(NETWORKS)} (has {sorted(top)})"
        )
    plan, report = {}, {}
    for name in todo:
        net, where, ignored = nets[name], f"{pkl}: {name}", {}
        if name == "D":
            target, kwargs = (
                DISCRIMINATOR_TARGET,
                discriminator_kwargs(net["init_kwargs"], where, ignored),
            )
        else:
            target, kwargs = GENERATOR_TARGET, generator_kwargs(net["init_kwargs"], where, ignored)
        if verify:
            _check_against_model(target, kwargs, net["state_dict"], where)
        plan[name] = (target, kwargs)
        report[name] = {
            "file": f"{name}.safetensors",
            "target": target,
            "kwargs": kwargs,
            "published_class": net["class_name"],
            "published_init_kwargs": _plain(net["init_kwargs"]),
            "ignored_settings": ignored,
            "module_src_sha256": net["module_src_sha256"],
            "num_tensors": len(net["state_dict"]),
            "num_elements": sum(t.numel() for t in net["state_dict"].values()),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (target, kwargs) in plan.items():
        _save_tensors(out_dir / f"{name}.safetensors", nets[name]["state_dict"], target, kwargs)
    training_set = _plain(top.get("training_set_kwargs"))
    summary = {
        "source": str(pkl.resolve()),
        "sha256": _sha256(pkl),
        "networks": report,
        "not_imported": sorted(str(k) for k in nets if k not in plan),
        "training_set_kwargs": None if training_set is _DROP else training_set,
        "verified": verify,
    }
    write_json(out_dir / "import.json", summary)  # last: its presence means the import finished
    return summary


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m cfexplain.tools.import_stylegan2 network.pkl out/``; 2 on a user error."""
    parser = argparse.ArgumentParser(
        prog="python -m cfexplain.tools.import_stylegan2",
        description="Convert a published StyleGAN2-ADA network pickle into cfexplain "
        "safetensors without executing any code from the pickle.",
    )
    parser.add_argument("pkl", type=Path, help="snapshot .pkl (network-snapshot-*.pkl)")
    parser.add_argument(
        "out_dir", type=Path, help="folder for {G_ema,G,D}.safetensors, import.json"
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip building cfexplain's networks to check tensor names and shapes",
    )
    args = parser.parse_args(argv)
    try:
        summary = convert(args.pkl, args.out_dir, verify=not args.no_verify)
    except (NetworkPickleError, OSError) as e:
        if isinstance(e, OSError):
            message = f"{e.filename or args.pkl}: {e.strerror or e}"
        else:
            message = str(e)
        print(f"import_stylegan2: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    for name, net in summary["networks"].items():
        print(f"{name}: {net['num_elements']:,} values -> {args.out_dir / net['file']}")
    print(f"provenance: {args.out_dir / 'import.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
