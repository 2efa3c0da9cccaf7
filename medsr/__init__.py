"""medsr: in-plane super-resolution for DICOM and NIfTI scans, built on MONAI.

The package follows the path a scan takes:
``reading`` -> ``transforms`` (normalise, degrade) -> ``model`` -> ``training`` / ``enhance``
-> ``writing``. ``evaluation`` scores a model against classical baselines.
"""

from __future__ import annotations

__version__ = "0.1.0"
