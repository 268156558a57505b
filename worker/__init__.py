"""The ccfnet-worker service: DICOM intake, durable spool, database, queue, inference bridge, results, export."""

__version__ = "0.1.0"
