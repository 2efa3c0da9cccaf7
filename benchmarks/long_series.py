"""Build long DICOM series for benchmarks from a short real one.

The source series' files are repeated in slice order, each copy moved along the slice normal
so the positions continue evenly, with new series and instance UIDs: real headers and real
pixel encoding, any length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid


def repeat_series(source: Path, n_slices: int, folder: Path) -> Path:
    """Write ``n_slices`` slices into the new ``folder``, cycling through ``source``'s files."""
    datasets = [pydicom.dcmread(p) for p in sorted(source.iterdir()) if p.suffix == ".dcm"]
    for dataset in datasets:
        for tag in [t for t in dataset.keys() if t.group == 0]:
            del dataset[tag]  # stray command-set elements (some exports carry them) are not storable
    cosines = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    datasets.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    origin = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    if len(datasets) > 1:
        last = np.array([float(v) for v in datasets[-1].ImagePositionPatient])
        step = float(np.dot(last - origin, normal)) / (len(datasets) - 1)
    else:
        step = 1.0
    series = generate_uid()
    folder.mkdir()
    for k in range(n_slices):
        dataset = datasets[k % len(datasets)]
        dataset.SeriesInstanceUID, dataset.SOPInstanceUID = series, generate_uid()
        dataset.InstanceNumber = k + 1
        dataset.ImagePositionPatient = [f"{v:.3f}" for v in origin + k * step * normal]
        dataset.save_as(folder / f"{k:05d}.dcm", enforce_file_format=True)
    return folder
