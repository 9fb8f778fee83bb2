"""MedMNIST v2 archives (``medmnist:breastmnist``, ``medmnist:organmnist3d_64``, ``medmnist:/path/file.npz``).

Found under $MEDFM_DATA/medmnist, the shared data folder or ~/.medmnist (or downloaded with the `medmnist`
package). The images stay in the archive: manifest rows reference ``file.npz::train_images/12``.
``source_size`` gives the archive's image size, the default output size of `medfm data prepare`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.manifest import NPZ_REF, Manifest, from_dataframe
from medfm.errors import InputError

# Modality of each MedMNIST subset (decides intensity normalisation).
_MEDMNIST_MODALITY = {
    "pathmnist": "other",
    "chestmnist": "xray",
    "dermamnist": "other",
    "octmnist": "other",
    "pneumoniamnist": "xray",
    "retinamnist": "other",
    "breastmnist": "us",
    "bloodmnist": "other",
    "tissuemnist": "other",
    "organamnist": "ct",
    "organcmnist": "ct",
    "organsmnist": "ct",
    "organmnist3d": "ct",
    "nodulemnist3d": "ct",
    "adrenalmnist3d": "ct",
    "fracturemnist3d": "ct",
    "vesselmnist3d": "mr",
    "synapsemnist3d": "other",
}
_MEDMNIST_MULTILABEL = {"chestmnist"}


def medmnist_roots() -> list[Path]:
    """Where MedMNIST npz files are looked for: $MEDFM_DATA/medmnist, then ~/.medmnist (package default)."""
    roots = []
    if os.environ.get("MEDFM_DATA"):
        roots.append(Path(os.environ["MEDFM_DATA"]) / "medmnist")
    from medfm.paths import shared_data_dir

    roots += [shared_data_dir() / "medmnist", Path.home() / ".medmnist"]
    return roots


def find_medmnist(name: str, root: str | Path | None = None) -> Path:
    """Locate ``<name>.npz`` (or ``<name>_<size>.npz``) under a root; clear error listing where it looked."""
    roots = [Path(root)] if root else medmnist_roots()
    flag = name.lower()
    for r in roots:
        for cand in (r / f"{flag}.npz", r / f"{name}.npz"):
            if cand.is_file():
                return cand
        # Case-insensitive match (e.g. BreastMNIST.npz).
        if r.is_dir():
            for f in r.iterdir():
                if f.name.lower() == f"{flag}.npz":
                    return f
    raise InputError(
        name,
        f"MedMNIST file {flag}.npz not found in {', '.join(map(str, roots))} "
        "(place it there, pass root=..., or use download=True with network access)",
    )


def download_medmnist(name: str, root: str | Path) -> Path:
    """Fetch a subset with the `medmnist` package; offline or without the package this fails clearly."""
    flag, _, size = name.lower().partition("_")
    try:
        import medmnist  # type: ignore[import-not-found]
    except ImportError as e:
        raise InputError(
            name,
            "download needs the 'medmnist' package (pip install medmnist) and network "
            f"access; otherwise place {flag}.npz under {root}",
        ) from e
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        info = medmnist.INFO[flag]
        cls = getattr(medmnist, info["python_class"])
        kw = {"size": int(size)} if size else {}
        cls(split="train", download=True, root=str(root), **kw)
    except Exception as e:  # noqa: BLE001 - network and package errors become one line
        raise InputError(
            name,
            f"MedMNIST download failed (offline?): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}",
        ) from e
    return find_medmnist(name, root)


def medmnist_manifest(arg: str, root: str | Path | None = None, download: bool = False) -> Manifest:
    """MedMNIST v2 subset (2D or 3D); labels from *_labels; the official train/val/test split is kept."""
    local = Path(arg).expanduser()
    if arg.lower().endswith(".npz") and local.is_file():
        path = local.resolve()
    elif arg.lower().endswith(".npz") or os.sep in arg:  # a path, not a subset name
        raise InputError(local, "MedMNIST file not found (medmnist:PATH needs an existing .npz file)")
    else:
        try:
            path = find_medmnist(arg, root)
        except InputError:
            if not download:
                raise
            path = download_medmnist(arg, root or Path.home() / ".medmnist")
    try:
        npz = np.load(path)
        keys = set(npz.files)
    except Exception as e:  # noqa: BLE001
        raise InputError(path, f"not a readable npz file ({type(e).__name__})") from e
    from medfm.data.readers.npz import npz_headers

    # Case counts from the member headers: decompressing the image arrays here would be wasted (prepare
    # reads them per case).
    shapes = {k: shape for k, (shape, _) in npz_headers(path).items()}
    rows, label_width = [], 1
    for split in ("train", "val", "test"):
        if f"{split}_images" not in keys:
            continue
        n = int(shapes[f"{split}_images"][0])
        labels = npz[f"{split}_labels"] if f"{split}_labels" in keys else None
        if labels is not None:
            labels = labels.reshape(n, -1)
            label_width = labels.shape[1]
        for i in range(n):
            row = {
                "image": f"{path}{NPZ_REF}{split}_images/{i}",
                "case_id": f"{split}/{i:06d}",
                "split": split,
            }
            if labels is not None:
                for j in range(labels.shape[1]):
                    row[f"label_{j}" if labels.shape[1] > 1 else "label"] = int(labels[i, j])
            rows.append(row)
    if not rows:
        raise InputError(path, "no train_images/val_images/test_images arrays (not a MedMNIST file)")
    df = pd.DataFrame(rows)
    flag = path.stem.lower().split("_")[0]
    label_cols = [c for c in df.columns if c == "label" or c.startswith("label_")]
    task = "multilabel" if (flag in _MEDMNIST_MULTILABEL or label_width > 1) else None
    return from_dataframe(
        df,
        path.parent,
        label_columns=label_cols,
        task=task,
        modality=_MEDMNIST_MODALITY.get(flag, "other"),
        source=str(path),
    )




def source_size(m: Manifest) -> int | None:
    """The image side of a 2D MedMNIST-layout source (28, 64, 128 or 224 px), else None.

    prepare's default output size: 28 px data must not be silently upsampled to 224.
    """
    refs = [str(r) for r in m.df["image"]] if len(m.df) else []
    if not refs:
        return None
    file_part, sep, key = refs[0].partition(NPZ_REF)
    name = key.split("/")[0]
    if not sep or not name.endswith("_images") or not all(r.startswith(file_part + NPZ_REF) for r in refs):
        return None
    from medfm.data.readers.npz import npz_headers

    heads = npz_headers(file_part)
    shape = heads[name][0][1:] if name in heads else ()
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4)):
        return int(max(shape[:2]))
    return None  # volumes keep --spacing / --volume-shape
