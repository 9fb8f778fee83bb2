"""Keep path-borne identifiers out of a prepared dataset.

Hospital archives name folders and files after patients (``Doe_Janet_MRN12345/Doe_Janet_000.dcm``). Unless
``--keep-identifiers``, prepare writes only salted hashes of case ids and source paths, and error messages
name the file by its hashed case id. The way back (hashed id -> source path) goes to a private file beside
the salt, outside the dataset, so the user can still find the file behind a result.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from medfm.data.deid import hash_id
from medfm.data.manifest import NPZ_REF


def salt_dir(salt_file: str | None) -> Path:
    """The folder holding the salt (and so the private case maps): --salt-file's folder or MEDFM_HOME."""
    if salt_file:
        return Path(salt_file).expanduser().absolute().parent
    return Path(os.environ.get("MEDFM_HOME", Path.home() / ".medfm"))


class CaseIds:
    """Pseudonymises case ids, source paths and error texts of one prepare run (salt None: keep all)."""

    def __init__(self, root: str | Path, salt: str | None) -> None:
        self.root = str(root).rstrip("/")
        self.salt = salt
        self.back: dict[str, dict[str, str]] = {}  # hashed case id -> original id and paths

    @property
    def keep(self) -> bool:
        return self.salt is None

    def case_id(self, cid: str, image: str, mask: str) -> str:
        """The public case id; records the way back in the private map."""
        if self.salt is None:
            return cid
        h = hash_id(cid, self.salt, "c_")
        self.back[h] = {"case_id": cid, "image": image, "mask": mask}
        return h

    def _rel(self, ref: str) -> str:
        file_part, sep, key = ref.partition(NPZ_REF)
        rel = os.path.relpath(file_part, self.root) if file_part.startswith(self.root + "/") else file_part
        return rel + (sep + key if sep else "")

    def source(self, image: str) -> str:
        """Provenance: a salted hash of the path relative to the source (stable across machines)."""
        return image if self.salt is None else hash_id(self._rel(image), self.salt, "src_")

    def text(self, text: str, image: str = "", mask: str = "") -> str:
        """`text` with the case's paths, and any other path under the source, replaced by placeholders."""
        if self.salt is None or not text:
            return text
        for ref, name in sorted(((image, "<image>"), (mask, "<mask>")), key=lambda t: -len(t[0])):
            if ref:
                text = text.replace(ref, name).replace(ref.partition(NPZ_REF)[0], name)
        # Other files of the source (a slice of a series, a sibling): everything up to the next ": ".
        text = re.sub(re.escape(self.root) + r"/.*?(?=: |$)", "<file in source>", text)
        return text.replace(self.root, "<source>")

    def skipped(self, cid: str, position: int, error: str, image: str, mask: str) -> dict[str, Any]:
        """One skipped-list entry: hashed id, position in the source order, the problem without paths."""
        entry: dict[str, Any] = {"case_id": cid, "error": self.text(error, image, mask)}
        if not self.keep:
            entry["position"] = int(position)
        return entry

    def bad_row(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A manifest row skipped while reading: its case id hashed (not recorded: it has no file)."""
        error = str(entry.get("error", ""))
        if self.salt is not None and not entry.get("case_id") and entry.get("row") == 0:
            # A file the folder scan skipped (pickled npz, link loop): give it an id of its own and a line
            # in the private map, so the user can still find it although the report names no path.
            path = error.partition(": ")[0]
            if path.startswith(self.root + "/"):
                cid = self.case_id(self._rel(path), path, "")
                return dict(entry, case_id=cid, error=self.text(error, path))
        out = dict(entry, error=self.text(error))
        if self.salt is not None and out.get("case_id"):
            out["case_id"] = hash_id(out["case_id"], self.salt, "c_")
        return out

    def write_map(self, directory: Path, fingerprint: str, out: Path) -> Path | None:
        """Write the private map (owner-only file) beside the salt; returns its path."""
        if self.salt is None:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"case_map_{fingerprint}.json"
        tmp = path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"dataset": str(out.absolute()), "source": self.root, "cases": self.back}, f, indent=1)
        os.replace(tmp, path)
        return path


def public_source(src: str | Path, keep: bool, salt: str | None) -> str:
    """The `source` recorded in summary.json: importer names as given, a path only as a salted hash."""
    s = str(src)
    name, sep, arg = s.partition(":")
    names_a_path = Path(s).expanduser().exists() or (sep and Path(arg).expanduser().exists())
    if keep or salt is None or not names_a_path:
        return s if not s.startswith("/") else os.path.basename(s.rstrip("/"))
    return (name + ":" if sep and not Path(s).exists() else "") + hash_id(s, salt, "src_")


def for_terminal(entry: dict[str, Any], map_file: str | None) -> str:
    """A skipped entry's error with the real paths put back, for the user's own terminal only."""
    err = str(entry.get("error", ""))
    if not map_file or not Path(map_file).is_file():
        return err
    case = json.loads(Path(map_file).read_text())["cases"].get(entry.get("case_id"), {})
    return err.replace("<image>", case.get("image") or "<image>").replace(
        "<mask>", case.get("mask") or "<mask>"
    )
