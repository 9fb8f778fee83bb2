"""Pull studies from a PACS, and watch one: analyse each new instance and store the results back.

:func:`pull` downloads into ``OUT/st_<hash>/se_<hash>/i_<hash>.dcm`` (hashed UIDs, no names in paths) and
skips files already there, so a rerun resumes.

:class:`Watcher` polls QIDO-RS, analyses every new image instance (never medfm's own SR/SEG/SC), builds
SR + SEG (+ SC) and stores them with STOW-RS. Results first go to a persistent outbox in ``state_dir``
(written atomically) and leave it, in order, only once the PACS has stored them; an instance is marked
done only then, so a PACS outage or a restart of the process loses nothing. Outbox files carry no patient
attributes: those are stripped when queued and restored from the PACS's copy of the source at delivery,
so ``state_dir`` holds UIDs (and their hashes) but no names, IDs, dates of birth or accession numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom

from medfm.data.deid import is_identifier_key
from medfm.errors import PacsError
from medfm.pacs.client import Pacs
from medfm.pacs.results import build_results
from medfm.pacs.types import NON_IMAGE_MODALITIES, InstanceResult, is_medfm_result, uid_key
from medfm.rundir import _atomic_write, read_json, write_json

Analyse = Callable[[pydicom.Dataset], InstanceResult | None]
Log = Callable[[str], None]

STATE, OUTBOX, REJECTED, ENTRY = "state.json", "outbox", "rejected", "entry.json"
MAX_ATTEMPTS = 3  # deliveries the PACS refuses while it answers otherwise: then the entry is set aside


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _one_line(e: BaseException, limit: int = 200) -> str:
    s = " ".join(f"{type(e).__name__}: {e}".split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _quiet(_: str) -> None:
    pass


def pull(
    pacs: Pacs, out_dir: str | Path, study: str | None = None, since: str | None = None, log: Log = _quiet
) -> list[Path]:
    """Download one study (or every study, or those with StudyDate >= since, YYYYMMDD) as .dcm files.

    Returns the paths of all instances of those studies, downloaded now or found from an earlier run.
    """
    out = Path(out_dir)
    if study:
        studies = [study]
    else:
        filters = {"StudyDate": since.replace("-", "") + "-"} if since else {}
        studies = [str(r["StudyInstanceUID"]) for r in pacs.studies(**filters)]
    paths: list[Path] = []
    for st in studies:
        new = 0
        rows = pacs.instances(st)
        for row in rows:
            se, sop = str(row["SeriesInstanceUID"]), str(row["SOPInstanceUID"])
            path = out / uid_key(st, "st_") / uid_key(se, "se_") / f"{uid_key(sop, 'i_')}.dcm"
            if not path.is_file():
                _atomic_write(path, _dicom_bytes(pacs.retrieve_instance(st, se, sop)))
                new += 1
            paths.append(path)
        log(f"study {uid_key(st, 'st_')}: {len(rows)} instances ({new} downloaded)")
    return paths


def _strip_identifiers(ds: pydicom.Dataset, source: pydicom.Dataset) -> list[str]:
    """Delete (in place) the top-level attributes ds copied from source that identify the patient or
    study (names, IDs, dates...; UIDs stay) and return their keywords, to be restored at delivery."""
    gone = []
    for elem in list(ds):
        kw = elem.keyword
        if (kw and not kw.endswith(("UID", "UIDs")) and is_identifier_key(kw)
                and kw in source and str(source[kw].value) == str(elem.value)):  # DA vs str alike
            del ds[kw]
            gone.append(kw)
    return gone


class Watcher:
    """Analyse every new instance on a PACS and store medfm's results back into the same study.

    ``analyse(ds)`` returns an InstanceResult (or None: nothing to report). ``log`` gets one line per event
    worth a person's attention: an outage (once), the recovery, an analysis failure (hashed UID).
    """

    def __init__(
        self,
        pacs: Pacs,
        analyse: Analyse,
        state_dir: str | Path,
        poll_s: float = 2.0,
        overlay: bool = True,
        log: Log = print,
        max_backoff_s: float = 60.0,
    ) -> None:
        self.pacs, self.analyse, self.poll_s, self.overlay, self.log = pacs, analyse, poll_s, overlay, log
        self.max_backoff_s = max_backoff_s
        self.state_dir = Path(state_dir)
        (self.state_dir / OUTBOX).mkdir(parents=True, exist_ok=True)
        self.failed_passes = 0  # consecutive passes that hit a PACS error (the outage, for backoff)
        # Patient attributes of sources queued by this process: spares a metadata request at delivery.
        self._restore_cache: dict[str, pydicom.Dataset] = {}
        self.state = self._load()

    # ---- persistent state -------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        path = self.state_dir / STATE
        state = read_json(path) if path.is_file() else {}
        for k in ("done", "failed", "studies"):
            state.setdefault(k, {})
        state.setdefault("next_entry", 0)
        return state

    def _save(self) -> None:
        write_json(self.state_dir / STATE, self.state)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One pass at a time per state_dir, also across processes."""
        with open(self.state_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                self.state = self._load()  # another process may have moved on since
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def entries(self) -> list[Path]:
        """Outbox entries (one per analysed instance), oldest first."""
        return sorted(p for p in (self.state_dir / OUTBOX).iterdir() if p.is_dir() and p.name.isdigit())

    def _pending_keys(self) -> set[str]:
        return {read_json(p / ENTRY)["key"] for p in self.entries()}

    # ---- outbox -----------------------------------------------------------------------------------------

    def _queue(self, row: dict[str, Any], source: pydicom.Dataset, datasets: list[pydicom.Dataset]) -> None:
        # entries on disk count too: a crash may have come between the rename below and saving the state
        n = max([int(self.state["next_entry"]), *(int(p.name) + 1 for p in self.entries())])
        final = self.state_dir / OUTBOX / f"{n:08d}"
        tmp = self.state_dir / OUTBOX / f".tmp-{n:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        restore: set[str] = set()
        for i, ds in enumerate(datasets):
            restore.update(_strip_identifiers(ds, source))
            _atomic_write(tmp / f"{i}.dcm", _dicom_bytes(ds))
        entry = {"key": uid_key(row["SOPInstanceUID"], "i_"), "study": row["StudyInstanceUID"],
                 "series": row["SeriesInstanceUID"], "sop": row["SOPInstanceUID"],
                 "restore": sorted(restore), "n": len(datasets), "attempts": 0}
        write_json(tmp / ENTRY, entry)
        tmp.rename(final)  # the entry appears whole or not at all
        self.state["next_entry"] = n + 1
        self._save()
        self._restore_cache[entry["key"]] = source

    def _restored(self, entry: dict[str, Any], path: Path) -> list[pydicom.Dataset]:
        source = self._restore_cache.get(entry["key"])
        if source is None and entry["restore"]:
            source = self.pacs.instance_metadata(entry["study"], entry["series"], entry["sop"])
        out = []
        for i in range(int(entry["n"])):
            ds = pydicom.dcmread(path / f"{i}.dcm")
            for kw in entry["restore"]:
                if source is not None and kw in source:
                    ds[kw] = source[kw]
            out.append(ds)
        return out

    def _deliver(self) -> int:
        """Store queued results in order; stops at the first PACS error (raised)."""
        delivered = 0
        for path in self.entries():
            entry = read_json(path / ENTRY)
            key = entry["key"]
            if key not in self.state["done"]:
                try:
                    self.pacs.store(self._restored(entry, path))
                except PacsError as e:
                    self._refused(path, entry, e)
                    continue
                self.state["done"][key] = int(entry["n"])
                self._save()
                delivered += 1
            shutil.rmtree(path)  # done already: a crash hit between marking it and removing it
            self._restore_cache.pop(key, None)
        return delivered

    def _refused(self, path: Path, entry: dict[str, Any], e: PacsError) -> None:
        """A failed delivery: an outage (raise) unless the PACS answers otherwise, then count the refusal."""
        try:
            self.pacs.ping()
        except PacsError:
            raise e from None
        entry["attempts"] = int(entry.get("attempts", 0)) + 1
        if entry["attempts"] < MAX_ATTEMPTS:
            write_json(path / ENTRY, entry)
            raise e  # keep the order: retry this entry before the later ones
        (self.state_dir / REJECTED).mkdir(exist_ok=True)
        path.rename(self.state_dir / REJECTED / path.name)
        self.state["failed"][entry["key"]] = f"results refused by the PACS: {e.problem}"
        self._save()
        self.log(f"results for instance {entry['key']} set aside in {self.state_dir / REJECTED} after "
                 f"{entry['attempts']} refusals: {e.problem}")

    # ---- polling ----------------------------------------------------------------------------------------

    def _wanted(self, row: dict[str, Any]) -> bool:
        modality = str(row.get("Modality") or "").upper()
        return modality not in NON_IMAGE_MODALITIES and not is_medfm_result(row)

    def _process(self, row: dict[str, Any], summary: dict[str, Any]) -> None:
        key = uid_key(row["SOPInstanceUID"], "i_")
        reason, datasets = "", []
        try:
            ds = self.pacs.retrieve_instance(row["StudyInstanceUID"], row["SeriesInstanceUID"],
                                             row["SOPInstanceUID"])
        except PacsError as e:
            self.pacs.ping()  # unreachable: the outage propagates; reachable: this instance is the problem
            ds, reason = None, f"retrieve failed: {e.problem}"
        if ds is not None:
            try:
                result = self.analyse(ds)
                datasets = build_results(result, overlay=self.overlay) if result is not None else []
            except Exception as e:  # one bad instance must not stop the watcher
                reason = _one_line(e)
        if reason:
            summary["errors"] += 1
            self.state["failed"][key] = reason
            self._save()
            self.log(f"analysis failed for instance {key}: {reason}")
            return
        summary["processed"] += 1
        if ds is not None and datasets:
            self._queue(row, ds, datasets)
            summary["delivered"] += self._deliver()
        else:
            self.state["done"][key] = 0
            self._save()

    def _poll(self, summary: dict[str, Any]) -> None:
        pending = self._pending_keys()
        for study in self.pacs.studies():
            uid, count = str(study["StudyInstanceUID"]), study.get("NumberOfStudyRelatedInstances")
            st_key = uid_key(uid, "st_")
            if count is not None and self.state["studies"].get(st_key) == count:
                continue  # nothing added since this study was last handled
            for row in self.pacs.instances(uid):
                key = uid_key(row["SOPInstanceUID"], "i_")
                if (key in self.state["done"] or key in self.state["failed"] or key in pending
                        or not self._wanted(row)):
                    continue
                summary["new"] += 1
                self._process(row, summary)
                pending = self._pending_keys()
            if count is not None:
                self.state["studies"][st_key] = count
                self._save()

    def run_once(self) -> dict[str, Any]:
        """One delivery + poll pass. Returns {new, processed, delivered, queued, errors, pacs_error}."""
        summary: dict[str, Any] = {"new": 0, "processed": 0, "delivered": 0, "queued": 0, "errors": 0,
                                   "pacs_error": None}
        with self._locked():
            try:
                summary["delivered"] += self._deliver()
                self._poll(summary)
            except PacsError as e:
                summary["pacs_error"] = str(e)
                if self.failed_passes == 0:
                    self.log(f"PACS unavailable, results are kept in the outbox and retried: {e}")
                self.failed_passes += 1
            else:
                if self.failed_passes:
                    self.log(f"PACS reachable again at {self.pacs.url} after {self.failed_passes} failed "
                             f"passes; {summary['delivered']} queued results delivered")
                self.failed_passes = 0
            summary["queued"] = len(self.entries())
        return summary

    def delay(self) -> float:
        """Seconds to the next pass: poll_s, doubled per consecutive failed pass up to max_backoff_s."""
        if not self.failed_passes:
            return self.poll_s
        return min(self.poll_s * 2 ** min(self.failed_passes, 16), self.max_backoff_s)

    def run(self, stop_event: threading.Event | None = None, max_polls: int | None = None) -> dict[str, int]:
        """Pass after pass until stop_event is set (or max_polls passes). Returns the totals."""
        stop = stop_event or threading.Event()
        totals = {"passes": 0, "new": 0, "processed": 0, "delivered": 0, "errors": 0}
        while not stop.is_set():
            summary = self.run_once()
            totals["passes"] += 1
            for k in ("new", "processed", "delivered", "errors"):
                totals[k] += summary[k]
            if max_polls is not None and totals["passes"] >= max_polls:
                break
            stop.wait(self.delay())
        return totals

