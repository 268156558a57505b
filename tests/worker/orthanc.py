"""A real Orthanc PACS for end-to-end tests: ephemeral ports, its own storage in a tmp folder, our AE as its
only modality, DICOMweb and GDCM plugins; stopped by PID. Restarting keeps the ports and the storage."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ORTHANC = shutil.which("Orthanc")
PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
PLUGIN_NAMES = ("libOrthancDicomWeb.so", "libOrthancGdcm.so")
ORTHANC_AE = "ORTHANC"
OUR_MODALITY = "ccfnet"


def plugins() -> list[str]:
    found = []
    for name in PLUGIN_NAMES:
        found += [str(Path(folder) / name) for folder in PLUGIN_FOLDERS if (Path(folder) / name).is_file()][:1]
    return found


def has_dicomweb() -> bool:
    return any(p.endswith("libOrthancDicomWeb.so") for p in plugins())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    folder: Path
    dicom_port: int
    http_port: int
    our_ae: str
    our_port: int
    users: dict[str, str] = field(default_factory=dict)  # HTTP basic users; none: no authentication (localhost)
    # Further peers by name: (AE title, port) on 127.0.0.1, e.g. a second listener for Orthanc to send to.
    extra_modalities: dict[str, tuple[str, int]] = field(default_factory=dict)
    concurrent_jobs: int = 1
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ccfnet-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckCalledAet": True,
            "DicomModalities": {
                OUR_MODALITY: [self.our_ae, "127.0.0.1", self.our_port],
                **{name: [ae, "127.0.0.1", port] for name, (ae, port) in self.extra_modalities.items()},
            },
            "Plugins": plugins(),
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
            "ConcurrentJobs": self.concurrent_jobs,
            "HttpThreadsCount": 4,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def _client(self) -> httpx.Client:
        auth = next(iter(self.users.items()), None)
        return httpx.Client(base_url=self.url, auth=auth, timeout=60)

    def start(self, timeout: float = 30.0) -> Orthanc:
        if ORTHANC is None:
            raise RuntimeError("Orthanc is not installed")
        config = self.write_config()
        with (self.folder / "orthanc.log").open("ab") as log:
            self.process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self._client() as client:
                    if client.get("/system", timeout=1).status_code == 200:
                        return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.folder / 'orthanc.log'}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def stop(self) -> None:
        """Terminate our own Orthanc process (by its PID) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        with self._client() as client:
            response = client.get(path)
        response.raise_for_status()
        return response.json()

    def upload(self, data: bytes) -> str:
        with self._client() as client:
            response = client.post("/instances", content=data)
        response.raise_for_status()
        return str(response.json()["ID"])

    def send_to_us(self, resource_ids: list[str]) -> None:
        """Orthanc as the sending peer: C-STORE the resources to our AE (synchronously)."""
        with self._client() as client:
            response = client.post(f"/modalities/{OUR_MODALITY}/store", json={"Resources": resource_ids},
                                   timeout=180)
        response.raise_for_status()

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        with self._client() as client:
            found = client.post("/tools/find", json={
                "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True,
            })
        found.raise_for_status()
        return list(found.json())

    def sop_instance_uids(self, study_uid: str) -> list[str]:
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.instances_of_study(study_uid)]

    def metadata(self, instance_id: str) -> dict[str, str]:
        """Orthanc's own record of how an instance arrived (Origin, RemoteAET, ...)."""
        return dict(self.get(f"/instances/{instance_id}/metadata?expand"))
