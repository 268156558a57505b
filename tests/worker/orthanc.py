"""A real Orthanc PACS for end-to-end tests: ephemeral ports, its own storage, our AE as its only modality."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ORTHANC = shutil.which("Orthanc")
PLUGINS = [p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                       "/usr/share/orthanc/plugins/libOrthancGdcm.so") if Path(p).is_file()]
ORTHANC_AE = "ORTHANC"


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
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> Path:
        config = {
            "Name": "ccfnet-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckCalledAet": True,
            "DicomModalities": {"ccfnet": [self.our_ae, "127.0.0.1", self.our_port]},
            "Plugins": PLUGINS,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self) -> Orthanc:
        assert ORTHANC is not None
        config = self.write_config()
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.folder / 'orthanc.log'}")
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def upload(self, data: bytes) -> str:
        response = httpx.post(f"{self.url}/instances", content=data, timeout=30)
        response.raise_for_status()
        return str(response.json()["ID"])

    def send_to_us(self, resource_ids: list[str]) -> None:
        response = httpx.post(f"{self.url}/modalities/ccfnet/store", json={"Resources": resource_ids}, timeout=120)
        response.raise_for_status()

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        found = httpx.post(f"{self.url}/tools/find", json={
            "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True,
        }, timeout=30)
        found.raise_for_status()
        return list(found.json())

    def sop_instance_uids(self, study_uid: str) -> list[str]:
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.instances_of_study(study_uid)]
