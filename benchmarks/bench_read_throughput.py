"""Images/s: a prepared dataset vs decoding the original PNGs every epoch (MONAI LoadImage + resize).

Both loaders use the same DataLoader settings (batch size, worker count) and produce the same tensors
(1 x SIZE x SIZE float in [0, 1]). Writes benchmarks/results/read_throughput.json.

    .venv/bin/python benchmarks/bench_read_throughput.py --size 224 --workers 2 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

RESULTS = Path(__file__).resolve().parent / "results" / "read_throughput.json"


class PngDataset(Dataset):
    """The baseline: decode each original PNG with MONAI and resize it, every time it is read."""

    def __init__(self, paths: list[str], size: int) -> None:
        from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

        self.paths = paths
        self.tf = Compose([LoadImage(image_only=True), EnsureChannelFirst(), ScaleIntensity(),
                           Resize((size, size))])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        img = self.tf(self.paths[i])
        return {"image": torch.as_tensor(img)[:1]}


def _time(ds: Dataset, batch: int, workers: int, epochs: int) -> list[float]:
    rates = []
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for b in loader:
            n += b["image"].shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return rates


def main() -> None:
    from medfm.data.prepare import PrepareConfig, prepare
    from medfm.data.store import PreparedDataset
    from medfm.paths import shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=shared_data_dir() / "cxr_lung_seg")
    ap.add_argument("--prepared", type=Path, default=None, help="existing prepared copy (else a tmp dir)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)

    prepared = args.prepared or Path(tempfile.mkdtemp(prefix="medfm_bench_read_")) / "prepared"
    prep_s = None
    if not (prepared / "summary.json").is_file():
        t0 = time.perf_counter()
        prepare(args.data, prepared, PrepareConfig(size=args.size, workers=args.workers,
                                                   salt_file=str(prepared.parent / "salt")), progress=False)
        prep_s = time.perf_counter() - t0
    pds = PreparedDataset(prepared)
    paths = [str(s) for s in pds.manifest["source"]]
    fast = _time(pds, args.batch, args.workers, args.epochs)
    slow = _time(PngDataset(paths, args.size), args.batch, args.workers, args.epochs)
    res = {
        "images": len(pds), "size": args.size, "workers": args.workers, "batch": args.batch,
        "epochs": args.epochs,
        "prepared_images_per_s": [round(r, 1) for r in fast],
        "png_monai_images_per_s": [round(r, 1) for r in slow],
        "prepared_best": round(max(fast), 1), "png_monai_best": round(max(slow), 1),
        "speedup": round(max(fast) / max(slow), 2),
        "prepare_seconds_once": round(prep_s, 1) if prep_s else None,
        "data": str(args.data.name),
        "note": "wall-clock throughput depends on load; load_avg = 1-minute load average when written",
        "load_avg": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
