"""Where an agent's studies come from: a folder of DICOM files or a PACS, behind one small protocol.

Nothing a source returns names the patient or the study: a study is a salted hash of its StudyInstanceUID
(``st_…``), a patient a salted hash of its PatientID (``pt_…``); the mapping back stays inside the source.
Fetched instances land in a temporary folder the source owns and removes on :meth:`close`.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from medfm.data.deid import hash_id

# Objects that are results or documents, not images a model can read.
NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "OT", "PR", "KO", "DOC", "REG"})


class StudyNotFound(LookupError):
    """A study or patient reference this source does not know."""


@runtime_checkable
class StudySource(Protocol):
    """Studies by public reference: list them, find a patient's earlier ones, fetch one image file."""

    def list_studies(self) -> list[dict[str, Any]]: ...

    def study(self, study_ref: str) -> dict[str, Any]: ...

    def priors(self, patient_ref: str, before_study: str | None = None) -> list[dict[str, Any]]: ...

    def fetch(self, study_ref: str) -> Path: ...

    def identifiers(self) -> set[str]: ...

    def close(self) -> None: ...


@dataclass
class _Study:
    """One study as the source knows it; only :meth:`row` ever leaves the source."""

    uid: str
    patient_id: str
    date: str | None
    modality: str | None
    description: str | None
    n_instances: int
    locator: Any = None  # how to fetch the first image: a file path (folder) or (series, sop) (PACS)
    private: set[str] = field(default_factory=set)  # identifying strings results must never contain


def _date(v: Any) -> str | None:
    s = str(v or "").strip()
    return f"{s[:4]}-{s[4:6]}-{s[6:8]}" if len(s) == 8 and s.isdigit() else (s or None)


def _identifying(ds: Any) -> set[str]:
    """The identifying values of a DICOM header (name, id, birth date, accession), as strings."""
    out = set()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs"):
        v = str(ds.get(kw, "") or "").strip()
        if v:
            out.add(v)
    return out


def _clean(text: Any, secrets_: set[str]) -> str | None:
    """Free text (a description) unless it contains an identifier or a name part."""
    s = " ".join(str(text or "").split())
    parts = {p for v in secrets_ for p in v.replace("^", " ").split() if len(p) >= 3} | secrets_
    return None if not s or any(p.lower() in s.lower() for p in parts) else s


class _Source:
    """Shared bookkeeping: refs, rows, priors, the temporary folder."""

    def __init__(self, salt: str | None = None) -> None:
        self.salt = salt or secrets.token_hex(16)
        self._studies: dict[str, _Study] = {}
        self._lock = threading.Lock()
        self._tmp: Path | None = None
        self._fetched: dict[str, Path] = {}

    # subclasses: every study the source holds
    def _scan(self) -> list[_Study]:
        raise NotImplementedError

    def _download(self, st: _Study, dest: Path) -> None:
        raise NotImplementedError

    def _ref(self, uid: str) -> str:
        return hash_id(uid, self.salt, "st_")

    def _patient(self, patient_id: str) -> str:
        return hash_id(patient_id or "unknown", self.salt, "pt_")

    def _refresh(self) -> None:
        found = self._scan()
        with self._lock:
            old, self._studies = self._studies, {self._ref(s.uid): s for s in found}
            for ref, st in self._studies.items():  # identifiers seen in fetched instances stay known
                st.private |= old[ref].private if ref in old else set()

    def _get(self, study_ref: str) -> _Study:
        if study_ref not in self._studies:
            self._refresh()
        if study_ref not in self._studies:
            raise StudyNotFound(f"no study {study_ref!r} (list_studies gives the known refs)")
        return self._studies[study_ref]

    def _row(self, ref: str, st: _Study) -> dict[str, Any]:
        return {"study": ref, "date": st.date, "modality": st.modality, "description": st.description,
                "n_instances": st.n_instances, "patient": self._patient(st.patient_id)}

    def list_studies(self) -> list[dict[str, Any]]:
        """Every study, oldest first."""
        self._refresh()
        rows = [self._row(r, s) for r, s in self._studies.items()]
        return sorted(rows, key=lambda r: (r["date"] or "", r["study"]))

    def study(self, study_ref: str) -> dict[str, Any]:
        return self._row(study_ref, self._get(study_ref))

    def priors(self, patient_ref: str, before_study: str | None = None) -> list[dict[str, Any]]:
        """The patient's studies, newest first; with ``before_study`` only those dated before it."""
        rows = [r for r in self.list_studies() if r["patient"] == patient_ref]
        if not rows:
            raise StudyNotFound(f"no patient {patient_ref!r} (list_studies gives the known refs)")
        if before_study is not None:
            ref = self.study(before_study)
            if ref["patient"] != patient_ref:
                raise StudyNotFound(f"study {before_study!r} is not a study of patient {patient_ref!r}")
            rows = [r for r in rows if r["study"] != before_study and (r["date"] or "") < (ref["date"] or "")]
        return sorted(rows, key=lambda r: (r["date"] or "", r["study"]), reverse=True)

    def fetch(self, study_ref: str) -> Path:
        """A local copy of the study's first image instance (kept until :meth:`close`)."""
        st = self._get(study_ref)
        with self._lock:
            if study_ref not in self._fetched:
                if st.locator is None:
                    raise StudyNotFound(f"study {study_ref!r} holds no image instance")
                if self._tmp is None:
                    self._tmp = Path(tempfile.mkdtemp(prefix="medfm-studies-"))
                dest = self._tmp / f"{study_ref}.dcm"
                self._download(st, dest)
                self._fetched[study_ref] = dest
            return self._fetched[study_ref]

    def identifiers(self) -> set[str]:
        """Every identifying string the source has seen (names, ids, birth dates, accessions, paths)."""
        out = {str(self._tmp)} if self._tmp else set()
        for s in self._studies.values():
            out |= s.private
        return out

    def close(self) -> None:
        with self._lock:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp, self._fetched = None, {}

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderStudies(_Source):
    """DICOM files anywhere under ``folder``, grouped by StudyInstanceUID (headers only while listing)."""

    def __init__(self, folder: str | Path, salt: str | None = None) -> None:
        super().__init__(salt)
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder}: not a folder of DICOM studies")

    def _scan(self) -> list[_Study]:
        import pydicom
        from pydicom.errors import InvalidDicomError

        groups: dict[str, list[tuple[Any, Path]]] = {}
        for p in sorted(self.folder.rglob("*")):
            if not p.is_file():
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            if "StudyInstanceUID" in ds:
                groups.setdefault(str(ds.StudyInstanceUID), []).append((ds, p))
        out = []
        for uid, items in groups.items():
            secrets_ = set().union(*(_identifying(ds) for ds, _ in items)) | {str(self.folder)}
            secrets_ |= {str(p) for _, p in items} | {p.name for _, p in items}
            images = sorted(
                ((ds, p) for ds, p in items if "Rows" in ds and str(ds.get("Modality", "")) not in
                 NON_IMAGE_MODALITIES),
                key=lambda t: (int(t[0].get("SeriesNumber") or 0), int(t[0].get("InstanceNumber") or 0)))
            first = items[0][0]
            mods = sorted({str(ds.get("Modality", "")) for ds, _ in items} - {""})
            out.append(_Study(uid, str(first.get("PatientID", "") or ""), _date(first.get("StudyDate")),
                              "/".join(mods) or None, _clean(first.get("StudyDescription"), secrets_),
                              len(items), images[0][1] if images else None, secrets_))
        return out

    def _download(self, st: _Study, dest: Path) -> None:
        shutil.copyfile(st.locator, dest)


class PacsStudies(_Source):
    """Studies on a DICOMweb server, through :class:`medfm.pacs.client.Pacs` (or anything with its
    ``studies``/``instances``/``retrieve_instance``)."""

    def __init__(self, pacs: Any, salt: str | None = None) -> None:
        super().__init__(salt)
        self.pacs = pacs

    def _scan(self) -> list[_Study]:
        out = []
        for row in self.pacs.studies(identifiers=True):
            uid = str(row.get("StudyInstanceUID") or "")
            if not uid:
                continue
            mods = row.get("ModalitiesInStudy")
            mods = "/".join(mods) if isinstance(mods, list) else mods
            pid = str(row.get("PatientID") or "")
            out.append(_Study(uid, pid, _date(row.get("StudyDate")), mods or None, None,
                              int(row.get("NumberOfStudyRelatedInstances") or 0), "pacs", {pid} - {""}))
        return out

    def _download(self, st: _Study, dest: Path) -> None:
        rows = [r for r in self.pacs.instances(st.uid)
                if str(r.get("Modality") or "") not in NON_IMAGE_MODALITIES]
        if not rows:
            raise StudyNotFound(f"study {self._ref(st.uid)!r} holds no image instance")
        r = min(rows, key=lambda r: (int(r.get("InstanceNumber") or 0), str(r.get("SOPInstanceUID"))))
        ds = self.pacs.retrieve_instance(st.uid, str(r["SeriesInstanceUID"]), str(r["SOPInstanceUID"]))
        st.private |= _identifying(ds)
        ds.ensure_file_meta()
        if "TransferSyntaxUID" not in ds.file_meta:
            from pydicom.uid import ExplicitVRLittleEndian

            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(dest, enforce_file_format=True)
