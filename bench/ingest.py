"""Ingest throughput: 600 MR instances (512x512, 16-bit) over loopback into our listener and into DCMTK's
storescp, side by side, sent by the same DCMTK storescu over one association each. Prints a table.

Our listener does per instance: full parse and UID checks, temp file + fsync + rename + folder fsync, and a
committed database row (SQLite by default, PostgreSQL with --database-url). storescp writes files without
fsync and keeps no database, so the ratio is the price of durability plus Python.

    .venv/bin/python bench/ingest.py [--count 600] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

ROOT = "1.2.826.0.1.3680043.10.1234."
MR = "1.2.840.10008.5.1.4.1.1.4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_study(folder: Path, count: int) -> list[Path]:
    """`count` synthetic 512x512 16-bit MR instances of one study and series."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(ROOT), generate_uid(ROOT)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(512, 512), dtype=np.uint16)
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UID(MR)
        ds.SOPClassUID = MR
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(ROOT)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, i + 1
        ds.PatientName, ds.PatientID = "Bench^Phantom", "BENCH"
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.roll(pixels, i, axis=0).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send_all(port: int, called_ae: str, files: list[Path]) -> float:
    """Wall time for storescu to send every file over one association."""
    started = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.perf_counter() - started


def wait_listening(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def bench_ours(work: Path, files: list[Path], database_url: str | None) -> float:
    from worker.service import Service
    from worker.settings import get_settings

    settings = get_settings(
        _env_file=None,
        data_dir=work / "ours",
        port=0,
        bind_address="127.0.0.1",
        ae_title="CCFNET",
        study_quiet_seconds=3600,
        min_free_disk_mb=100,
        database_url=database_url,
        log_level="WARNING",
    )
    with Service(settings, reconcile=False) as service:
        return send_all(service.port, "CCFNET", files)


def bench_storescp(work: Path, files: list[Path], max_pdu: int | None = None) -> float:
    out = work / f"storescp-{max_pdu}"
    out.mkdir()
    port = _free_port()
    pdu = ["--max-pdu", str(max_pdu)] if max_pdu else []
    proc = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", *pdu, "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        return send_all(port, "STORESCP", files)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--database-url", default=None, help="default: SQLite under the temporary folder")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} (DCMTK) is not installed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="ccfnet-bench-") as tmp:
        work = Path(tmp)
        files = make_study(work / "source", args.count)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        results = {
            "DCMTK storescp": bench_storescp(work, files),
            "storescp -pdu 128K": bench_storescp(work, files, 131_072),
            "ccfnet listener": bench_ours(work, files, args.database_url),
        }
    db = "PostgreSQL" if args.database_url else "SQLite"
    print(
        f"\n{args.count} MR instances, 512x512 16-bit, {megabytes:.0f} MB, loopback, storescu sender ({db})"
    )
    print(f"{'receiver':<20}{'seconds':>9}{'inst/s':>9}{'MB/s':>8}{'ccfnet ratio':>14}")
    ours = results["ccfnet listener"]
    for name, seconds in results.items():
        rate, mbps = args.count / seconds, megabytes / seconds
        print(f"{name:<20}{seconds:>9.2f}{rate:>9.1f}{mbps:>8.1f}{seconds / ours:>14.2f}")
    print(
        "ccfnet ratio = that receiver's time / ccfnet's time (above 1: ccfnet ingests faster). storescp uses"
    )
    print("its default max PDU of 16 KB unless stated; ccfnet offers 256 KB. storescp does not fsync.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
