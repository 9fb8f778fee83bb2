"""A thin DICOMweb client (QIDO-RS search, WADO-RS retrieve, STOW-RS store) over dicomweb-client.

Every network or HTTP failure becomes one :class:`~medfm.errors.PacsError` naming the URL (without
credentials) and the reason in one line. Search rows are plain dicts keyed by DICOM keyword and hold no
patient identifier unless asked (``identifiers=True``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom

from medfm.errors import PacsError

STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                 "Manufacturer", "NumberOfSeriesRelatedInstances")
INSTANCE_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
                   "InstanceNumber", "SeriesDescription", "Manufacturer")
# Modalities of the objects medfm writes back: findings SR, segmentation, secondary-capture overlay.
RESULT_MODALITIES = ("SR", "SEG", "OT")

_HTTP_REASONS = {
    401: "PACS refused the credentials (HTTP 401): check --user/--password or --token",
    403: "PACS denied access (HTTP 403): the account lacks permission",
    404: "PACS has no such resource (HTTP 404): check the URL (it should end at the DICOMweb root)",
}


def redact(url: str) -> str:
    """The URL without user:password@ (safe to print and log)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _reason(exc: Exception, timeout: float) -> str:
    """One line saying why a request failed, without the library's traceback or URLs with credentials."""
    import requests

    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in _HTTP_REASONS:
            return _HTTP_REASONS[code]
        detail = _one_line(exc.response.reason or exc.response.text or "")
        return f"PACS answered HTTP {code}" + (f" ({detail})" if detail else "")
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS/SSL failure talking to the PACS ({_one_line(type(exc).__name__)})"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"PACS did not answer within {timeout:g} s"
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc).lower()
        why = "connection refused" if "refused" in text else (
            "host name not found" if "name or service" in text or "resolve" in text else "connection failed")
        return f"PACS not reachable ({why})"
    if isinstance(exc, requests.exceptions.RequestException):
        return f"request failed ({type(exc).__name__})"
    return f"unexpected answer from the PACS ({type(exc).__name__}: {_one_line(exc)})"


def _value(item: dict[str, Any]) -> Any:
    vals = item.get("Value")
    if not vals:
        return None
    out = [v.get("Alphabetic", "") if isinstance(v, dict) else v for v in vals]
    return out[0] if len(out) == 1 else out


def _rows(payload: list[dict[str, Any]], keep: Sequence[str]) -> list[dict[str, Any]]:
    """DICOM JSON objects -> {keyword: value} dicts with only the `keep` keywords."""
    tags = {f"{pydicom.datadict.tag_for_keyword(k):08X}": k for k in keep}
    return [{kw: _value(obj[tag]) if tag in obj else None for tag, kw in tags.items()} for obj in payload]


def _as_part10(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Give ds what a DICOM file needs (file meta, 128-byte preamble): STOW-RS carries Part 10 files, and
    pydicom writes datasets built in memory without the 'DICM' prefix, which WADO-RS readers then reject."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds.ensure_file_meta()
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if getattr(ds, "preamble", None) is None:
        ds.preamble = b"\0" * 128
    return ds


class Pacs:
    """A DICOMweb server at `url` (its root, e.g. ``http://host:8042/dicom-web``).

    Authentication: ``user``/``password`` (HTTP basic, also accepted as ``user:password@`` in the URL) or
    ``token`` (bearer). ``timeout`` (seconds) applies to every request.
    """

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(redact(url), "not an http(s) URL of a DICOMweb server")
        if parts.username and user is None:
            user, password = parts.username, parts.password or ""
        self.url = redact(url).rstrip("/")
        self.timeout = float(timeout)
        session = requests.Session()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        elif user is not None:
            session.auth = (user, password or "")
        self._client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
        # medfm retries on its own schedule (the watcher's backoff); the library's own retries would hide
        # outages for up to a minute per request.
        self._client.set_http_retry_params(retry=False)
        # `retrying` logs every failed attempt as a WARNING with a traceback (shown even without logging
        # set up); the failure reaches the user as one PacsError line instead.
        logging.getLogger("retrying").setLevel(logging.CRITICAL)

    def __repr__(self) -> str:
        return f"Pacs({self.url!r})"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except PacsError:
            raise
        except Exception as e:  # requests, dicomweb-client and pydicom raise many types
            raise PacsError(self.url, _reason(e, self.timeout)) from None

    def ping(self) -> None:
        """Raise PacsError unless the server answers a one-row study search."""
        with self._errors():
            self._client.search_for_studies(limit=1, fields=["StudyInstanceUID"])

    def studies(self, identifiers: bool = False, **filters: Any) -> list[dict[str, Any]]:
        """QIDO-RS study search; filters are DICOM keywords (``StudyDate="20240101-"``, ``Modality="DX"``).

        Rows: StudyInstanceUID, StudyDate, ModalitiesInStudy, NumberOfStudyRelatedInstances (+ PatientID
        with ``identifiers=True``).
        """
        keep = (*STUDY_FIELDS, "PatientID") if identifiers else STUDY_FIELDS
        with self._errors():
            found = self._client.search_for_studies(
                fields=list(keep), search_filters=filters or None, get_remaining=True
            )
        return _rows(found, keep)

    def series(self, study: str, **filters: Any) -> list[dict[str, Any]]:
        """QIDO-RS series of one study."""
        with self._errors():
            found = self._client.search_for_series(
                study, fields=list(SERIES_FIELDS), search_filters=filters or None, get_remaining=True
            )
        return _rows(found, SERIES_FIELDS)

    def instances(self, study: str, series: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """QIDO-RS instances of one study (or one series), with their series' modality and description."""
        with self._errors():
            found = self._client.search_for_instances(
                study, series, fields=list(INSTANCE_FIELDS), search_filters=filters or None,
                get_remaining=True,
            )
        return _rows(found, INSTANCE_FIELDS)

    def retrieve_instance(self, study: str, series: str, sop: str) -> pydicom.Dataset:
        """WADO-RS: one instance as a pydicom Dataset (pixel data included)."""
        with self._errors():
            return self._client.retrieve_instance(study, series, sop)

    def retrieve_study(self, study: str) -> list[pydicom.Dataset]:
        """WADO-RS: every instance of a study."""
        with self._errors():
            return list(self._client.retrieve_study(study))

    def instance_metadata(self, study: str, series: str, sop: str) -> pydicom.Dataset:
        """WADO-RS metadata of one instance (no bulk data: pixel data and large values left out)."""
        with self._errors():
            meta = self._client.retrieve_instance_metadata(study, series, sop)
            # bulk data stay on the server: their elements are dropped, not fetched
            meta = {tag: v for tag, v in meta.items() if "BulkDataURI" not in v and "InlineBinary" not in v}
            return pydicom.Dataset.from_json(meta)

    def store(self, datasets: Sequence[pydicom.Dataset]) -> list[str]:
        """STOW-RS; returns the stored SOP Instance UIDs. Any instance the server refused is a PacsError.

        Datasets without file meta or preamble get them (in place).
        """
        if not datasets:
            return []
        with self._errors():
            answer = self._client.store_instances([_as_part10(ds) for ds in datasets])
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError(
                self.url, f"PACS refused {len(failed)} of {len(datasets)} instances (failure reason "
                f"{', '.join(reasons)})"
            )
        return [str(ds.SOPInstanceUID) for ds in datasets]

    def find_results(self, study: str) -> list[dict[str, Any]]:
        """Instances of a study that are results: structured reports (SR), segmentations (SEG) and
        secondary captures (OT), one QIDO search per modality."""
        rows: list[dict[str, Any]] = []
        for modality in RESULT_MODALITIES:
            rows += self.instances(study, Modality=modality)
        return rows
