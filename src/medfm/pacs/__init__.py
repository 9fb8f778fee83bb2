"""PACS integration over DICOMweb: search/retrieve/store (:class:`Pacs`), model results as DICOM SR/SEG/SC
(:mod:`medfm.pacs.results`), pulling and watching a PACS (:mod:`medfm.pacs.watch`), and a private Orthanc
for tests and sandboxes (:class:`Orthanc`). Heavy libraries (requests, dicomweb-client, highdicom) are
imported on use."""

from medfm.errors import PacsError
from medfm.pacs.client import Pacs
from medfm.pacs.orthanc import Orthanc, OrthancNotFound, find_orthanc
from medfm.pacs.results import build_results, findings_sr, mask_seg, overlay_sc
from medfm.pacs.types import InstanceResult, uid_key
from medfm.pacs.watch import Watcher, pull

__all__ = [
    "InstanceResult", "Orthanc", "OrthancNotFound", "Pacs", "PacsError", "Watcher", "build_results",
    "find_orthanc", "findings_sr", "mask_seg", "overlay_sc", "pull", "uid_key",
]
