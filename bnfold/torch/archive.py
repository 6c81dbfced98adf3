"""What a ``.pt2`` archive would make ``torch.export.load`` execute, found before it runs.

``torch.export.load`` runs arbitrary code for some members of the archive (torch 2.13,
``torch/export/pt2_archive/_package.py``):

- weights and constants marked ``use_pickle`` in ``data/{weights,constants}/*_config.json``
  (``torch.load(weights_only=False)``), custom objects (``torch._C._pickle_load_obj``) and opaque
  objects (``pickle.loads``) among the constants;
- the example inputs ``data/sample_inputs/*.pt`` and the legacy (torch 2.7) ``serialized_*.pt``
  members: ``torch.load(weights_only=True)`` first, then, if that fails, ``weights_only=False``;
- AOTInductor packages under ``data/aotinductor/`` (compiled shared libraries, loaded natively).

:func:`unsafe_members` lists every member that is one of those, or that this module does not
know: an archive is accepted only when each member is a known plain one (JSON, raw tensor bytes
listed as not pickled, the format's small text records, extra files) or a torch.save blob that
loads with ``weights_only=True`` (so torch's own first attempt succeeds and the fallback never runs).
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

_PLAIN = {
    "archive_format",
    "archive_version",
    "byteorder",
    "version",
    ".data/version",
    ".data/serialization_id",
}
_CONFIGS = {"data/weights/": "model_weights_config.json", "data/constants/": "model_constants_config.json"}
_TENSOR_CONSTANT = "tensor_"  # torch's TENSOR_CONSTANT_FILENAME_PREFIX; custom_obj_/opaque_obj_ are pickles
_TORCH_SAVE = ("data/sample_inputs/", "data/weights/", "data/constants/", "serialized_")
"""Where torch.save blobs go through ``deserialize_torch_artifact`` (weights_only, then the fallback)."""


def unsafe_members(z: zipfile.ZipFile) -> list[str]:
    """The members of a ``.pt2`` archive that loading would unpickle or execute (see module doc)."""
    names = [i.filename for i in z.infolist() if not i.is_dir()]
    roots = {n.split("/", 1)[0] for n in names}
    prefix = next(iter(roots)) + "/" if len(roots) == 1 and all("/" in n for n in names) else ""
    rel = {n: n[len(prefix) :] for n in names}
    raw = _raw_payloads(z, prefix)
    unsafe = []
    for name, r in rel.items():
        if r.startswith("data/aotinductor/"):
            unsafe.append(name)
        elif r in _PLAIN or r in raw or r.endswith(".json") or r.startswith(("extra/", "extra_files/")):
            continue
        elif not (r.startswith(_TORCH_SAVE) and r.endswith(".pt") and _loads_weights_only(z.read(name))):
            unsafe.append(name)
    return unsafe


def _raw_payloads(z: zipfile.ZipFile, prefix: str) -> set[str]:
    """Members the configs list as raw tensor bytes (read with ``as_strided``, never unpickled)."""
    raw: set[str] = set()
    pickled: set[str] = set()
    for folder, config in _CONFIGS.items():
        try:
            entries = json.loads(z.read(prefix + folder + config)).get("config", {})
        except (KeyError, ValueError, AttributeError):
            continue
        if not isinstance(entries, dict):
            continue
        for meta in entries.values():
            path = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(path, str):
                continue
            tensor = folder == "data/weights/" or path.startswith(_TENSOR_CONSTANT)
            (pickled if meta.get("use_pickle") or not tensor else raw).add(folder + path)
    return raw - pickled


def _loads_weights_only(data: bytes) -> bool:
    """Whether torch's restricted unpickler accepts ``data`` (it never runs arbitrary code)."""
    import torch

    try:
        obj: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal means torch would fall back to full unpickling
        return False
    return isinstance(obj, (tuple, dict))
