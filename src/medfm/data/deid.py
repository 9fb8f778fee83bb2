"""De-identification: what counts as an identifier, salted pseudonyms, and cleaning metadata dicts.

Readers never put identifiers in ``Sample.meta`` unless asked (``keep_identifiers=True``, then they sit under
``meta["identifiers"]``). Anything written to disk should pass through :func:`deidentify_meta`.
Pseudonyms from :func:`hash_id` are stable for one salt, so cases of one patient stay linked
(patient-level splits) without the real ID being stored; the salt lives next to the prepared data,
never inside shared outputs.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

from medfm.errors import InputError

# DICOM keywords removed by medfm's profile (a practical subset of PS3.15 Annex E, basic profile):
# names, IDs, addresses, institutions, people, device serials, free-text comments, and (below) every
# date/time/UID attribute by suffix.
DICOM_IDENTIFIER_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientComments",
        "MedicalRecordLocator",
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansOfRecord",
        "OperatorsName",
        "RequestingPhysician",
        "ScheduledPerformingPhysicianName",
        "StationName",
        "DeviceSerialNumber",
        "ImageComments",
        "AdditionalPatientHistory",
        "RequestAttributesSequence",
        "PerformedProcedureStepID",
        "ScheduledProcedureStepID",
        "RequestedProcedureID",
        "MilitaryRank",
        "BranchOfService",
        "EthnicGroup",
        "Occupation",
        "CountryOfResidence",
        "RegionOfResidence",
        "PatientInsurancePlanCodeSequence",
        "ResponsiblePerson",
        "ResponsibleOrganization",
        "PersonName",
        "ContentCreatorName",
    }
)

# Plain (non-DICOM) meta keys that are identifiers in any table or dict.
PLAIN_IDENTIFIER_KEYS = frozenset(
    {
        "patientname",
        "patientid",
        "name",
        "mrn",
        "birthdate",
        "dob",
        "dateofbirth",
        "accession",
        "accessionnumber",
        "institution",
        "institutionname",
        "physician",
        "referringphysician",
        "address",
        "phone",
        "email",
        "ssn",
        "studyid",
        "identifiers",
    }
)

_SUFFIXES = ("date", "time", "datetime", "uid", "uids")
# IDs that keep their linking role as salted pseudonyms when a salt is given (others are dropped).
PSEUDONYMISED = {
    "patientid": "p_",
    "studyinstanceuid": "st_",
    "seriesinstanceuid": "se_",
    "accessionnumber": "a_",
    "sopinstanceuid": "i_",
}

SALT_FILE = ".medfm_salt"


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


_DICOM_NORM = frozenset(_norm(k) for k in DICOM_IDENTIFIER_KEYWORDS)


def is_identifier_key(key: str) -> bool:
    """True for keys naming identifiers: names, IDs, institutions, physicians, and any date, time or UID."""
    k = _norm(str(key))
    if k in _DICOM_NORM or k in PLAIN_IDENTIFIER_KEYS:
        return True
    if k.endswith(("classuid", "transfersyntaxuid")):  # standard UIDs naming a kind of object, not a person
        return False
    return k.endswith(_SUFFIXES) and k not in {
        "frametime",
        "repetitiontime",
        "echotime",
        "inversiontime",
        "exposuretime",
        "acquisitionduration",
    }


def hash_id(value: Any, salt: str, prefix: str = "p_") -> str:
    """Stable salted pseudonym: prefix + first 16 hex chars of sha256(salt + value)."""
    if not salt:
        raise ValueError("hash_id needs a non-empty salt (see load_or_create_salt)")
    digest = hashlib.sha256((str(salt) + str(value)).encode("utf-8")).hexdigest()
    return f"{prefix}{digest[:16]}"


def load_or_create_salt(directory: str | Path) -> str:
    """The project's secret salt from directory/.medfm_salt, created (random, owner-only) if absent."""
    return load_or_create_salt_file(Path(directory) / SALT_FILE)


def load_or_create_salt_file(p: Path) -> str:
    """The salt stored in file `p`, created (random, owner-only) if absent."""
    if p.is_file():
        salt = p.read_text().strip()
        if not re.fullmatch(r"[0-9a-f]{32,}", salt):
            raise InputError(p, "salt file is corrupt (expected at least 32 hex characters)")
        return salt
    p.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(16)
    # O_EXCL: two processes creating it at once must not end up with different salts silently
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_salt_file(p)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
    return salt


def deidentify_meta(
    meta: dict[str, Any], keep_identifiers: bool = False, salt: str | None = None
) -> dict[str, Any]:
    """A copy of meta without identifiers (recursively, through nested dicts and lists).

    keep_identifiers=True: identifiers are moved under ``"identifiers"`` instead of dropped (for a local,
    access-controlled store). salt: patient/study/series/accession IDs are replaced by salted pseudonyms
    (``hash_id``) under the same key, so linkage survives de-identification.
    """
    found: dict[str, Any] = {}
    if keep_identifiers and isinstance(meta.get("identifiers"), dict):
        found.update(meta["identifiers"])
    clean = _clean(meta, found, salt)
    if keep_identifiers and found:
        clean["identifiers"] = found
    return clean


def _clean(obj: Any, found: dict[str, Any], salt: str | None) -> Any:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            nk = _norm(str(k))
            if nk == "identifiers":
                continue
            if is_identifier_key(str(k)):
                found.setdefault(str(k), v)
                if salt and nk in PSEUDONYMISED and v not in (None, ""):
                    out[k] = hash_id(v, salt, PSEUDONYMISED[nk])
                continue
            out[k] = _clean(v, found, salt)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_clean(v, found, salt) for v in obj)
    return obj


def dicom_identifiers(ds: Any) -> dict[str, str]:
    """Every identifying value of a pydicom Dataset (top level and file meta) as keyword -> string.

    Used to fill ``meta["identifiers"]`` when asked, and by tests to prove none of them leaks into outputs.
    """
    out: dict[str, str] = {}
    for source in (getattr(ds, "file_meta", None), ds):
        if source is None:
            continue
        for elem in source:
            kw = elem.keyword
            if not kw or elem.VR == "SQ" or not is_identifier_key(kw):
                continue
            val = elem.value
            if val is None or val == "" or isinstance(val, bytes):
                continue
            out[kw] = str(val)
    return out
