"""Draws docs/through_plane/figure.png: a real thick-slice acquisition made thin.

    python docs/through_plane/make_figure.py SCAN.nii.gz [--factor 3]

The README's figure: the collection's open_ms_longitudinal/patient12/study1_T1W.nii.gz (a
validation patient, never trained on; 0.91 x 0.91 x 3 mm), coronal and sagittal planes of the
thick input (nearest neighbour), cubic B-spline along the slice axis, and medsr's shipped
through-plane model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medsr.enhance import load_enhancer
from medsr.geometry import rescaled_affine, voxel_sizes
from medsr.reading import read_scan
from medsr.reports import thick_slices_figure
from medsr.through_plane import default_factor, enhance_through_plane
from medsr.transforms import bspline_upsample, robust_window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", type=Path)
    parser.add_argument("--factor", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("figure.png"))
    arguments = parser.parse_args()
    scan = read_scan(arguments.scan)
    axis = scan.slice_axis
    factor = arguments.factor or default_factor(scan.affine, axis)
    enhancer = load_enhancer(None, 2, through_plane=True)
    window = robust_window(scan.array, enhancer.lower_percentile, enhancer.upper_percentile)
    enhanced = enhance_through_plane(scan.array, scan.affine, axis, enhancer.model, factor, window)
    volumes = {"thick input": np.repeat(scan.array, factor, axis=axis),
               "cubic B-spline": bspline_upsample(scan.array, axis, factor),
               "medsr": enhanced.array}
    spacing = voxel_sizes(rescaled_affine(scan.affine, [factor if a == axis else 1 for a in range(3)]))
    sizes = voxel_sizes(scan.affine)
    title = (f"{arguments.scan.name}: {sizes[0]:.2f} x {sizes[1]:.2f} x {sizes[2]:.1f} mm, "
             f"{factor} thin slices per thick slice")
    print(thick_slices_figure(volumes, axis, spacing, title, arguments.out))


if __name__ == "__main__":
    main()
