"""A real, private Orthanc PACS for tests, benchmarks and the `medfm pacs sandbox` command.

It listens on 127.0.0.1 only (remote access off), requires a generated user/password, serves DICOMweb at
``/dicom-web/`` and keeps its database in a temporary folder (or one given), so a restart on the same
port and storage finds the same studies. Orthanc and its DICOMweb plugin come from the Debian packages
``orthanc`` and ``orthanc-dicomweb``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from medfm.errors import PacsError

_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
_PLUGIN = "libOrthancDicomWeb.so"


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when medfm dies, so a killed test run or
    benchmark leaves no Orthanc behind holding its port."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: the process is stopped by stop() only
        pass


class OrthancNotFound(PacsError):
    """The Orthanc binary or its DICOMweb plugin is not installed."""


@dataclass(frozen=True)
class OrthancInstall:
    binary: Path
    dicomweb_plugin: Path


def find_orthanc() -> OrthancInstall:
    """Where Orthanc and its DICOMweb plugin are ($MEDFM_ORTHANC, $MEDFM_ORTHANC_DICOMWEB override)."""
    env_bin, env_plugin = os.environ.get("MEDFM_ORTHANC"), os.environ.get("MEDFM_ORTHANC_DICOMWEB")
    candidates = [env_bin] if env_bin else [shutil.which("Orthanc"), *_BINARIES]
    binary = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    plugins = [env_plugin] if env_plugin else [str(Path(d) / _PLUGIN) for d in _PLUGIN_DIRS]
    plugin = next((Path(p) for p in plugins if Path(p).is_file()), None)
    hint = ("install the Debian packages orthanc and orthanc-dicomweb "
            "(apt-get install orthanc orthanc-dicomweb)")
    if binary is None:
        where = env_bin or ", ".join(_BINARIES)
        raise OrthancNotFound(None, f"Orthanc not found (looked for {where}): {hint}, or set MEDFM_ORTHANC")
    if plugin is None:
        where = env_plugin or ", ".join(_PLUGIN_DIRS)
        raise OrthancNotFound(
            None, f"Orthanc DICOMweb plugin {_PLUGIN} not found (looked in {where}): {hint}, "
            "or set MEDFM_ORTHANC_DICOMWEB"
        )
    return OrthancInstall(binary, plugin)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc process on 127.0.0.1 with DICOMweb, authentication on and a generated password.

    ``with Orthanc() as pacs: Pacs(pacs.url, *pacs.auth)``. ``stop()`` keeps the storage, ``restart()``
    brings the same server back on the same port; leaving the ``with`` block (or ``close()``) also removes
    a temporary storage folder.
    """

    def __init__(
        self,
        storage_dir: str | Path | None = None,
        port: int | None = None,
        dicom: bool = False,
        start_timeout: float = 20.0,
    ) -> None:
        self.install = find_orthanc()
        self._own_dir = storage_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="medfm-orthanc-") if storage_dir is None else storage_dir)
        self.port = port or free_port()
        self.dicom_port = free_port() if dicom else None
        self._config_dicom_port = self.dicom_port or free_port()  # Orthanc wants a valid port even if off
        self.start_timeout = start_timeout
        self.user = "medfm"
        self.password = secrets.token_urlsafe(18)
        self.log_path = self.root / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The DICOMweb base URL (no credentials in it)."""
        return f"http://127.0.0.1:{self.port}/dicom-web"

    @property
    def rest_url(self) -> str:
        """Orthanc's own REST API root."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str]:
        """(user, password) for HTTP basic authentication."""
        return self.user, self.password

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _config(self) -> dict[str, object]:
        db = self.root / "db"
        return {
            "Name": "medfm-orthanc",
            "StorageDirectory": str(db),
            "IndexDirectory": str(db),
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            # The DICOM port stays closed unless asked: DICOMweb is all medfm speaks.
            "DicomServerEnabled": self.dicom_port is not None,
            "DicomPort": self._config_dicom_port,
            "DicomAet": "MEDFM",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(self.install.dicomweb_plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "SaveJobs": False,
        }

    def start(self) -> Orthanc:
        """Start Orthanc and wait (start_timeout seconds at most) until its REST API answers."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        # The config holds the password: owner-only before anything is written into it.
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._config(), f, indent=2)
        log = open(self.log_path, "ab")  # appended to, so a restart keeps the earlier log
        try:
            self._proc = subprocess.Popen(
                [str(self.install.binary), str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        request = urllib.request.Request(f"{self.rest_url}/system", headers=headers)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                self._fail(f"Orthanc exited with code {self._proc.returncode} while starting")
            try:
                with urllib.request.urlopen(request, timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.1)
        self.stop()
        self._fail(f"Orthanc did not answer on port {self.port} within {self.start_timeout:g} s")

    def _fail(self, problem: str) -> None:
        raise PacsError(self.url, f"{problem}; last lines of {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of Orthanc's log (empty if there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after timeout); the storage stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> Orthanc:
        """Stop and start again with the same storage, port and credentials."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and delete the storage folder if it was a temporary one."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
