"""Per-document label sidecars next to a `.bin/.idx` prefix.

`<prefix>.labels.npy`: int32 [num_documents], the index of each document's label in `names`,
-1 where a document has none. `<prefix>.labels.json`: {"label_key", "names", "num_documents"}.
Label ids are local to a prefix; `global_domain_ids` maps them onto the sorted union of names
across a blend, so that "en" is the same domain id whichever prefix it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from moe_dist.common.config import ConfigError

NO_LABEL = -1


def label_sidecar_paths(prefix: str) -> tuple[str, str]:
    return prefix + ".labels.npy", prefix + ".labels.json"


def encode_labels(values: Iterable[object]) -> tuple[list[str], np.ndarray]:
    """Label values (None = unlabelled) -> (sorted names, int32 ids with NO_LABEL for None)."""
    as_text = [None if v is None else str(v) for v in values]
    names = sorted({v for v in as_text if v is not None})
    index = {name: i for i, name in enumerate(names)}
    ids = np.array([NO_LABEL if v is None else index[v] for v in as_text], dtype=np.int32)
    return names, ids


def write_label_sidecars(npy_path: str, json_path: str, label_key: str,
                         names: Sequence[str], ids: np.ndarray) -> None:
    with open(npy_path, "wb") as f:
        np.save(f, ids.astype(np.int32))
    meta = {"label_key": label_key, "names": list(names), "num_documents": int(ids.shape[0])}
    with open(json_path, "w") as f:
        json.dump(meta, f, indent=1)


def read_label_names(prefix: str) -> list[str] | None:
    """The label names of a prefix, or None when it has no sidecar."""
    _, json_path = label_sidecar_paths(prefix)
    if not os.path.exists(json_path):
        return None
    with open(json_path) as f:
        return list(json.load(f)["names"])


def global_domain_ids(prefix: str, domain_names: Sequence[str], num_documents: int) -> np.ndarray:
    """int64 [num_documents]: each document's index in `domain_names`, NO_LABEL where unknown."""
    npy_path, json_path = label_sidecar_paths(prefix)
    if not os.path.exists(json_path):
        return np.full(num_documents, NO_LABEL, dtype=np.int64)
    with open(json_path) as f:
        meta = json.load(f)
    local_ids = np.load(npy_path)
    if local_ids.shape != (num_documents,) or meta["num_documents"] != num_documents:
        raise ConfigError(
            f"label sidecar {npy_path!r} holds {local_ids.shape[0]} labels "
            f"(json says {meta['num_documents']}) but {prefix!r} holds {num_documents} documents; "
            f"rerun tools/preprocess_data.py for this prefix")
    missing = [n for n in meta["names"] if n not in domain_names]
    if missing:
        raise ConfigError(f"labels {missing} of {json_path!r} are not in domain names "
                          f"{list(domain_names)}")
    # Position len(names) of the lookup table holds NO_LABEL, so -1 maps onto itself.
    lookup = np.array([list(domain_names).index(n) for n in meta["names"]] + [NO_LABEL],
                      dtype=np.int64)
    return lookup[local_ids]
