"""Built-in phantom data: synthetic, fully labelled chest radiographs and chest CTs with masks, reports,
patients, repeat studies and scanner sites — the embedded default data of medfm (no downloads).

    from medfm.data.phantom import generate_cxr_case, write_phantom, montage
    image, mask, record = generate_cxr_case(0, seed=0, size=256)
    write_phantom("cxr", n=200, out="phantom_cxr", seed=0)
"""

from medfm.data.phantom.cohort import FINDINGS
from medfm.data.phantom.generate import (
    Case,
    dataset_info,
    generate_ct_case,
    generate_cxr_case,
    make_case,
    write_phantom,
)
from medfm.data.phantom.montage import montage
from medfm.data.phantom.reports import extract_labels
from medfm.data.phantom.sites import Site, make_sites

__all__ = [
    "FINDINGS",
    "Case",
    "Site",
    "dataset_info",
    "extract_labels",
    "generate_ct_case",
    "generate_cxr_case",
    "make_case",
    "make_sites",
    "montage",
    "write_phantom",
]
