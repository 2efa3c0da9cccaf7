"""Streaming enhance: slices read on demand, exact windows without the whole volume, memory
that follows the batch and not the series, outputs identical to the in-memory path."""

from __future__ import annotations

import shutil
import threading
import tracemalloc

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from medsr import engine
from medsr.checkpoint import load_model
from medsr.dicom_writing import DicomSeriesWriter
from medsr.engine import (
    FLAT_WINDOW,
    _Prefetch,
    batch_size_for_memory,
    enhance_scan,
    enhance_volume,
    keep_flat_regions,
    survey_scan,
)
from medsr.enhance import enhance_file, load_enhancer
from medsr.errors import ScanReadError
from medsr.geometry import in_plane_factors, rescaled_affine
from medsr.reading import open_scan, read_scan
from medsr.transforms import IntensityCounts, robust_window

from conftest import CT_SERIES, MR_MULTIFRAME, MR_NIFTI, MR_SERIES, new_dciodvfy_errors, pydicom_test_file


@pytest.mark.parametrize("source", [CT_SERIES, MR_SERIES, MR_MULTIFRAME, MR_NIFTI])
def test_counted_percentiles_equal_numpy_on_real_scans(source):
    volume = read_scan(source).array
    counts = IntensityCounts()
    for k in range(volume.shape[2]):
        counts.add(volume[:, :, k])
    assert counts.total == volume.size
    for q in (0, 0.5, 1, 37.3, 50, 99.5, 100):
        assert counts.percentile(q) == pytest.approx(float(np.percentile(volume, q)), rel=1e-6, abs=1e-4)
    expected = robust_window(volume)
    window = counts.window()
    assert (window.low, window.high) == pytest.approx((expected.low, expected.high), rel=1e-6, abs=1e-4)


def test_counted_percentiles_on_non_integer_values_and_non_finite_voxels():
    rng = np.random.default_rng(7)
    volume = (rng.normal(size=(40, 30, 9)) * 123.4).astype(np.float32)
    volume[3, 4, 5], volume[0, 0, 0] = np.nan, np.inf
    counts = IntensityCounts()
    for k in range(volume.shape[2]):
        counts.add(volume[:, :, k])
    finite = volume[np.isfinite(volume)]
    assert counts.non_finite == 2 and counts.total == finite.size
    for q in (0.5, 12.5, 99.5):
        assert counts.percentile(q) == pytest.approx(float(np.percentile(finite, q)), rel=1e-5)


def test_float_volumes_with_a_value_per_voxel_stay_bounded(monkeypatch):
    """Past MAX_DISTINCT values the counts go to a 12-bit mantissa: bounded memory, and
    percentiles within 0.025% of NumPy's."""
    monkeypatch.setattr(IntensityCounts, "MAX_DISTINCT", 5000)
    rng = np.random.default_rng(3)
    volume = (rng.lognormal(3, 1, size=(64, 64, 40)) - 5.0).astype(np.float32)  # both signs
    counts = IntensityCounts()
    for k in range(volume.shape[2]):
        counts.add(volume[:, :, k])
    assert counts.coarse and counts.total == volume.size
    assert len(counts.values) <= 2 * 2**12 * 64  # sign x mantissa x exponents in play
    for q in (0.5, 25, 50, 99.5):
        expected = float(np.percentile(volume, q))
        assert abs(counts.percentile(q) - expected) <= 2.5e-4 * abs(expected)


def test_open_scan_reads_slices_lazily_and_load_matches(tmp_path):
    scan = open_scan(MR_SERIES)
    assert scan.shape == (256, 256, 20) and scan.n_slices == 20
    whole = read_scan(MR_SERIES).array
    np.testing.assert_array_equal(scan.read_plane(7), whole[:, :, 7])
    # decoding needs the file only when the slice is asked for
    copy = tmp_path / "series"
    shutil.copytree(MR_SERIES, copy)
    opened = open_scan(copy)
    victim = sorted(copy.glob("*.dcm"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:data.index(b"\xe0\x7f\x10\x00") + 1000])  # pixels cut short after opening
    failing = next(k for k, h in enumerate(opened.dicom_headers)
                   if h.SOPInstanceUID == pydicom.dcmread(MR_SERIES / victim.name).SOPInstanceUID)
    with pytest.raises(ScanReadError, match=victim.name):
        opened.read_plane(failing)


@pytest.mark.parametrize("keep_bytes", [0, 3 * 256 * 256 * 4])
def test_slices_beyond_the_read_cache_are_decoded_again_to_the_same_result(tmp_path, tiny_checkpoint,
                                                                           monkeypatch, keep_bytes):
    """A long series keeps only READ_CACHE_BYTES of the survey pass; the rest is read again.
    (The sample's PixelPaddingValue is 0, its masked background: the array path, which knows
    no padding, differs there, so the reference is the stream with every slice kept.)"""
    model, _ = load_model(tiny_checkpoint)
    expected = enhance_scan(open_scan(MR_SERIES), model, "kspace", batch_size=4).array
    monkeypatch.setattr(engine, "READ_CACHE_BYTES", keep_bytes)
    streamed = enhance_scan(open_scan(MR_SERIES), model, "kspace", batch_size=4).array
    np.testing.assert_array_equal(streamed, expected)


def test_channels_last_gives_the_same_slices(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    scan = open_scan(CT_SERIES)
    plain = enhance_scan(scan, model, batch_size=2, channels_last=False).array
    nhwc = enhance_scan(scan, model, batch_size=2, channels_last=True).array
    np.testing.assert_allclose(nhwc, plain, atol=1e-3 * np.ptp(plain))


def test_gpu_batch_size_follows_free_memory():
    assert batch_size_for_memory(free_bytes=80 * 2**30, per_slice_bytes=100 * 2**20) == 256  # capped
    assert batch_size_for_memory(free_bytes=8 * 2**30, per_slice_bytes=100 * 2**20) == 40
    assert batch_size_for_memory(free_bytes=2**20, per_slice_bytes=100 * 2**20) == 1


def test_reader_errors_reach_the_consumer_and_the_thread_ends():
    def items():
        yield 1
        yield 2
        raise ScanReadError("slice 3: damaged")

    seen = []
    with pytest.raises(ScanReadError, match="slice 3"), _Prefetch(items()) as prefetched:
        for item in prefetched:
            seen.append(item)
    assert seen == [1, 2]
    # a consumer that stops early does not leave the reader blocked
    with pytest.raises(RuntimeError), _Prefetch(iter(range(100))) as prefetched:
        next(prefetched)
        raise RuntimeError("model failed")
    assert not [t for t in threading.enumerate() if t.name == "medsr-reader"]


def _long_series(folder, n_slices: int):
    """``n_slices`` copies of pydicom's real 64x64 MR image, stacked 1 mm apart in one series."""
    folder.mkdir()
    source = pydicom.dcmread(pydicom_test_file("MR_small.dcm"))
    series = generate_uid()
    origin = np.array([float(v) for v in source.ImagePositionPatient])
    normal = np.cross(*np.array([float(v) for v in source.ImageOrientationPatient]).reshape(2, 3))
    for k in range(n_slices):
        source.SeriesInstanceUID, source.SOPInstanceUID = series, generate_uid()
        source.InstanceNumber = k + 1
        source.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * normal]
        source.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.mark.parametrize("suffix", [".nii.gz", ""])
def test_memory_follows_the_batch_not_the_series(tmp_path, tiny_checkpoint, monkeypatch, suffix):
    """Beyond the headers (kept per slice for the DICOM output, tens of KB each), peak host
    memory (NumPy and Python allocations, traced) is the same for a 40- and a 120-slice series,
    written as NIfTI or as a DICOM series, once the read cache is full."""
    monkeypatch.setattr(engine, "READ_CACHE_BYTES", 0)
    loaded = load_enhancer(tiny_checkpoint, 2)
    beyond_headers = {}
    for n in (40, 120):
        series = _long_series(tmp_path / f"in{n}", n)
        tracemalloc.start()
        opened = open_scan(series)
        headers = tracemalloc.get_traced_memory()[0]
        del opened
        tracemalloc.reset_peak()
        enhance_file(series, tmp_path / f"out{n}{suffix}", batch_size=4, model=loaded)
        beyond_headers[n] = tracemalloc.get_traced_memory()[1] - headers
        tracemalloc.stop()
    extra_output = (120 - 40) * 128 * 128 * 4  # what an in-memory result would add
    assert beyond_headers[120] - beyond_headers[40] < extra_output / 10, beyond_headers
    written = read_scan(tmp_path / f"out120{suffix}")
    assert written.array.shape == (128, 128, 120)


def test_multiframe_frames_that_need_a_wider_rescale_get_their_own(tmp_path, tiny_checkpoint):
    """A frame whose values do not fit the source's stored range gets a per-frame rescale; the
    others keep the source's; every value reads back within half a stored step."""
    scan = open_scan(MR_MULTIFRAME)
    volume = read_scan(MR_MULTIFRAME).array
    enhanced = np.repeat(np.repeat(volume, 2, axis=0), 2, axis=1)
    enhanced[:, :, 5] *= 100.0  # beyond int16 with slope 1
    window = IntensityCounts()
    window.add(volume)
    affine = rescaled_affine(scan.affine, in_plane_factors(2, 2))
    with DicomSeriesWriter(tmp_path / "out", scan, affine, 2, "test", window.window()) as writer:
        for start in range(0, enhanced.shape[2], 3):
            writer.write(np.moveaxis(enhanced[:, :, start:start + 3], 2, 0))
    written_file = tmp_path / "out" / "IM0001.dcm"
    dataset = pydicom.dcmread(written_file)
    groups = dataset.PerFrameFunctionalGroupsSequence
    slopes = [float(g.PixelValueTransformationSequence[0].RescaleSlope) for g in groups]
    assert slopes[5] > 1 and slopes.count(1.0) == len(slopes) - 1
    assert "PixelValueTransformationSequence" not in dataset.SharedFunctionalGroupsSequence[0]
    written = read_scan(written_file).array
    for k in range(enhanced.shape[2]):
        assert np.abs(written[:, :, k] - enhanced[:, :, k]).max() <= slopes[k] / 2 + 1e-3
    assert dataset.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len(dataset.PixelData) == enhanced.size * 2
    if shutil.which("dciodvfy"):  # per-frame rescale and appended pixel data stay conformant
        assert not new_dciodvfy_errors(MR_MULTIFRAME, written_file)


def test_an_unfinished_dicom_stream_leaves_nothing(tmp_path):
    scan = open_scan(MR_SERIES)
    affine = rescaled_affine(scan.affine, in_plane_factors(2, 2))
    window = survey_scan(scan).counts.window()
    with pytest.raises(Exception, match="only 1 of 20 slices"):
        with DicomSeriesWriter(tmp_path / "out", scan, affine, 2, "test", window) as writer:
            writer.write(np.zeros((1, 512, 512), np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # compiling takes 15-30 s on 2 cores
def test_compiled_model_gives_the_same_slices_and_pads_the_last_batch(tiny_checkpoint):
    """torch.compile (20 slices in batches of 6: the last, of 2, is padded to the compiled
    shape) matches the plain model."""
    model, _ = load_model(tiny_checkpoint)
    scan = open_scan(MR_SERIES)
    plain = enhance_scan(scan, model, "kspace", batch_size=6, compile_model="off").array
    compiled = enhance_scan(scan, model, "kspace", batch_size=6, compile_model="on").array
    assert compiled.shape == plain.shape
    np.testing.assert_allclose(compiled, plain, atol=1e-4 * np.ptp(plain))


def test_compile_choice_and_its_fallback(tiny_checkpoint, monkeypatch, caplog):
    from medsr.engine import COMPILE_MIN_SLICES, _Forward
    from medsr.errors import MedsrError

    model, _ = load_model(tiny_checkpoint)
    assert not _Forward(model, "auto", COMPILE_MIN_SLICES - 1).compiled
    assert not _Forward(model, "off", 10_000).compiled
    with pytest.raises(MedsrError, match="--compile must be one of auto, on, off"):
        _Forward(model, "yes", 10)

    def broken_compile(module, **options):
        def run(*inputs, **options):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    scan = open_scan(CT_SERIES)
    expected = enhance_scan(scan, model, batch_size=2, compile_model="off").array
    fallback = enhance_scan(scan, model, batch_size=2, compile_model="on").array
    np.testing.assert_array_equal(fallback, expected)
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in caplog.text


@pytest.mark.parametrize("option, message", [
    (["--precision", "fp16"], "error: --precision must be one of auto, fp32, bf16, not 'fp16'"),
    (["--compile", "yes"], "error: --compile must be one of auto, on, off, not 'yes'"),
])
def test_bad_speed_options_are_one_error_line_before_any_work(tmp_path, option, message):
    from typer.testing import CliRunner

    from medsr.cli import app

    result = CliRunner().invoke(app, ["enhance", str(CT_SERIES), "-o", str(tmp_path / "o.nii.gz"), *option])
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1] == message
    assert list(tmp_path.iterdir()) == []


def test_both_passes_report_progress(tmp_path, tiny_checkpoint):
    reads, enhanced = [], []
    enhance_file(MR_SERIES, tmp_path / "o.nii.gz", batch_size=8, model=load_enhancer(tiny_checkpoint, 2),
                 reading=lambda done, total: reads.append((done, total)),
                 progress=lambda done, total: enhanced.append((done, total)))
    assert reads == [(k, 20) for k in range(1, 21)]
    assert enhanced == [(8, 20), (16, 20), (20, 20)]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_slices_across_the_file_stream_through_a_mapped_scratch(tmp_path, tiny_checkpoint, suffix):
    """Enhanced along axis 0, NIfTI slices interleave in the file: they go to a memory-mapped
    scratch (compressed at the end for .nii.gz); the file equals the in-memory result, and
    nothing else is left in the folder."""
    import nibabel as nib

    model, _ = load_model(tiny_checkpoint)
    scan = read_scan(MR_NIFTI)
    volume = scan.array[:, 40:72, 40:72]  # a block of the real T1, kept small
    source = tmp_path / "block.nii.gz"
    nib.save(nib.Nifti1Image(volume, scan.affine), source)
    expected = enhance_volume(volume, scan.affine, 0, model, "kspace", batch_size=16)
    output = tmp_path / f"out{suffix}"
    enhance_file(source, output, slice_axis=0, degradation="kspace", batch_size=16,
                 model=load_enhancer(tiny_checkpoint, 2))
    image = nib.load(output)
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), expected.array)
    np.testing.assert_allclose(image.affine, expected.affine, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["block.nii.gz", output.name, "tiny.pt"])


def test_an_unfinished_mapped_nifti_leaves_nothing(tmp_path):
    from medsr.writing import NiftiSliceWriter

    with pytest.raises(ValueError, match="only 1 of 3 slices"):
        with NiftiSliceWriter(tmp_path / "o.nii.gz", (3, 4, 5), np.eye(4), slice_axis=0) as writer:
            writer.write(np.zeros((1, 4, 5), np.float32))
    with pytest.raises(RuntimeError):
        with NiftiSliceWriter(tmp_path / "o.nii", (3, 4, 5), np.eye(4), slice_axis=1) as writer:
            writer.write(np.zeros((3, 2, 5), np.float32))
            raise RuntimeError("model failed")
    assert list(tmp_path.iterdir()) == []


def test_padding_stays_out_of_the_window_and_stays_padding(tmp_path, session_tiny_checkpoint):
    """The real CT series pads outside its field of view (PixelPaddingValue -2000, -3024 HU):
    the intensity window ignores those pixels, the model sees air-like values there instead of
    a cliff, and every output pixel over a padded input pixel is padding again."""
    from medsr.engine import is_padding

    scan = open_scan(CT_SERIES)
    assert scan.padding == (-3024.0, -3024.0)
    survey = survey_scan(scan)
    volume = scan.load().array
    real = volume[~is_padding(volume, scan.padding)]
    window = survey.counts.window()
    assert (window.low, window.high) == pytest.approx(tuple(np.percentile(real, [0.5, 99.5])), rel=1e-6)
    model, _ = load_model(session_tiny_checkpoint)
    enhanced = enhance_scan(scan, model, "bicubic", batch_size=2, survey=survey).array
    padded = np.repeat(np.repeat(volume == -3024, 2, axis=0), 2, axis=1)
    assert padded.any() and (enhanced[padded] == np.float32(-3024)).all()
    assert (enhanced[~padded] > -1500).mean() > 0.999  # no cliff rings into the image


def test_select_picks_one_echo_from_the_command_line(tmp_path, session_tiny_checkpoint):
    from typer.testing import CliRunner

    from medsr.cli import app

    folder = tmp_path / "echoes"
    folder.mkdir()
    for path in sorted(MR_SERIES.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        del dataset[0x00000000:0x00010000]  # command-set elements these files carry
        dataset.save_as(folder / f"e1_{path.name}")
        dataset.EchoTime, dataset.SOPInstanceUID = "80.0", generate_uid()
        dataset.save_as(folder / f"e2_{path.name}")
    runner = CliRunner()
    arguments = ["enhance", str(folder), "-o", str(tmp_path / "o.nii.gz"), "--weights", str(session_tiny_checkpoint)]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 1 and "--select EchoTime=" in refused.output
    picked = runner.invoke(app, [*arguments, "--select", "EchoTime=80"])
    assert picked.exit_code == 0, picked.output
    bad = runner.invoke(app, [*arguments, "--select", "EchoTime"])
    assert bad.exit_code == 2 and "KEYWORD=VALUE" in bad.output


# ------------------------------------------------------------------ flat regions stay flat


def test_flat_neighbourhoods_are_where_the_windows_largest_value_is_its_smallest():
    from scipy.ndimage import maximum_filter, minimum_filter

    rng = np.random.default_rng(4)
    for _ in range(10):
        values = rng.integers(0, 3, (3, 40, 37)).astype(np.float32)
        values[:, :12], values[:, :, -9:], values[1, 20:30, 5:20], values[2] = 0, 5, 7, 1
        size = (1, FLAT_WINDOW, FLAT_WINDOW)  # edges left out: "nearest" repeats values already in the window
        expected = maximum_filter(values, size, mode="nearest") == minimum_filter(values, size, mode="nearest")
        found = engine.flat_neighbourhoods(torch.from_numpy(values)[:, None])[:, 0].numpy()
        np.testing.assert_array_equal(found, expected)
        assert 0 < expected.mean() < 1


def test_flat_neighbourhoods_keep_their_value_and_nothing_else_changes():
    rng = np.random.default_rng(1)
    low_res = rng.random((2, 24, 20), dtype=np.float32) * 3000
    low_res[0, :, :10] = 1234.5  # a flat band, wider than the window (a value no window round-trips)
    low_res[1] = -1024.0  # an empty slice
    low_res[0, 0, 0] = np.nextafter(np.float32(1234.5), np.float32(2000))  # one ulp apart: not flat
    flat = engine.flat_neighbourhoods(torch.from_numpy(low_res)[:, None])[:, 0].numpy()
    high_res = rng.random((2, 48, 40), dtype=np.float32)
    kept = high_res.copy()
    keep_flat_regions(low_res, flat, kept, scale=2)
    reach = FLAT_WINDOW // 2
    band = kept[0, 2 * (reach + 1):, :2 * (10 - reach)]  # rows clear of the odd pixel's window
    assert (band == np.float32(1234.5)).all()
    assert (kept[1] == np.float32(-1024.0)).all()
    # within reach of the band's edge or of the odd pixel, and in the random part, the model's output
    np.testing.assert_array_equal(kept[0, :, 2 * (10 - reach):], high_res[0, :, 2 * (10 - reach):])
    near = 2 * (reach + 1)  # the output tiles of the low-res pixels whose window holds the odd pixel
    np.testing.assert_array_equal(kept[0, :near, :near], high_res[0, :near, :near])


def test_a_real_scans_exact_background_stays_exact(tiny_checkpoint, monkeypatch):
    """The sample MR (40% of its voxels exactly 0), 12 middle slices: every output pixel whose
    low-res pixel has a 7x7 neighbourhood of one value is exactly that value; every other
    pixel is the model's own output."""
    from scipy.ndimage import maximum_filter, minimum_filter

    scan = read_scan(MR_NIFTI)
    axis = scan.slice_axis
    volume = np.take(scan.array, range(60, 72), axis=axis)
    model, _ = load_model(tiny_checkpoint)
    kept = enhance_volume(volume, scan.affine, axis, model, "bicubic", precision="fp32").array
    monkeypatch.setattr(engine, "keep_flat_regions", lambda *arguments: None)
    raw = enhance_volume(volume, scan.affine, axis, model, "bicubic", precision="fp32").array
    window = [FLAT_WINDOW] * 3
    window[axis] = 1
    flat = maximum_filter(volume, window, mode="nearest") == minimum_filter(volume, window, mode="nearest")
    value = volume
    for a in range(3):
        if a != axis:  # each low-res pixel's footprint on the output grid
            flat, value = flat.repeat(2, axis=a), value.repeat(2, axis=a)
    assert 0.05 < flat.mean() < 0.95  # background (14% of these slices) and anatomy
    assert not np.array_equal(raw[flat], value[flat])  # the network alone paints the background
    np.testing.assert_array_equal(kept[flat], value[flat])
    np.testing.assert_array_equal(kept[~flat], raw[~flat])
