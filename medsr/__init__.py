"""medsr: super-resolution for DICOM and NIfTI scans, built on MONAI.

The package follows the path a scan takes:
``reading`` -> ``degradation`` (how it lost resolution) -> ``transforms`` (normalise, degrade)
-> ``model`` -> ``engine`` (streamed, in-plane) or ``through_plane`` -> ``writing`` /
``dicom_writing``; ``enhance`` is the application around them, ``training`` and ``evaluation``
train and score models.

The Python API, for notebooks and other tools::

    from medsr import enhance_file
    result = enhance_file("series_folder", "enhanced.nii.gz")          # shipped x2 model
    result = enhance_file("scan.nii.gz", "thin.nii.gz", through_plane=True)
    result = enhance_file("scan.nii.gz", "out.nii.gz", model=my_module)  # any module with .scale
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["Enhancer", "enhance_file", "load_enhancer"]


def __getattr__(name: str):
    # imported on first use, so ``import medsr`` stays light (no torch until it is needed)
    if name in __all__:
        from medsr import enhance

        return getattr(enhance, name)
    raise AttributeError(f"module 'medsr' has no attribute {name!r}")
