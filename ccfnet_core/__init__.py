"""CCF-Net as a library: network, targets, loss, decoding, data, metrics, training, evaluation, phantoms.

Imports torch, numpy and pydicom (plus plotting/progress helpers lazily); never the worker service.
"""

__version__ = "0.1.0"
