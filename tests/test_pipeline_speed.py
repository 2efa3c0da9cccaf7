"""Issue #12: what makes the pipeline around the model cheap keeps every guarantee it had.

Files are synced on a few threads instead of one after the other, but still every one before
its folder is renamed into place; stored pixels are computed in float32 but equal the float64
result; a derived header copies only what it keeps but equals a pruned deep copy; uncompressed
pixels are read straight from the file, where the header read ended, and equal pydicom's. No
timings here: ``benchmarks/pipeline_overhead.py`` measures them.
"""

from __future__ import annotations

import copy
import gc
import os
import threading

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from medsr import dicom_reading as reading
from medsr.dicom_pixels import stored_pixels
from medsr.dicom_reading import _FrameDecoder, _read_header
from medsr.dicom_writing import DicomSeriesWriter, _kept_copy
from medsr.errors import OutputError, ScanReadError
from medsr.geometry import in_plane_factors, rescaled_affine
from medsr.reading import open_scan, read_scan
from medsr.transforms import IntensityCounts

from conftest import CT_SERIES, MR_MULTIFRAME, MR_SERIES, pydicom_test_file


def write_upsampled(source, folder, **writer_options):
    """``source`` x2 in-plane by pixel repetition, written as a DICOM series (two slices a call)."""
    scan = open_scan(source)
    volume = scan.load().array
    enhanced = np.repeat(np.repeat(volume, 2, axis=0), 2, axis=1)
    counts = IntensityCounts()
    counts.add(volume)
    affine = rescaled_affine(scan.affine, in_plane_factors(2, 2))
    with DicomSeriesWriter(folder, scan, affine, 2, "test", counts.window(), **writer_options) as writer:
        for start in range(0, enhanced.shape[2], 2):
            writer.write(np.moveaxis(enhanced[:, :, start:start + 2], 2, 0))


# ------------------------------------------------------------------ syncing on threads


@pytest.mark.parametrize("source, n_files", [(MR_SERIES, 20), (MR_MULTIFRAME, 1)])
def test_every_file_is_synced_before_its_folder_and_the_rename(tmp_path, sync_events, source, n_files):
    events = sync_events
    write_upsampled(source, tmp_path / "out")
    synced_files = [path for kind, path in events if kind == "fsync" and path.endswith(".dcm")]
    assert len(synced_files) == len(set(synced_files)) == n_files
    assert all("/.out." in path for path in synced_files)  # in the staging folder
    staging = os.path.dirname(synced_files[0])
    folder_synced = events.index(("fsync", staging))
    renamed = events.index(("replace", str(tmp_path / "out")))
    last_file = max(events.index(("fsync", path)) for path in synced_files)
    assert last_file < folder_synced < renamed
    assert events[renamed + 1] == ("fsync", str(tmp_path))  # the rename itself
    assert len(list((tmp_path / "out").glob("*.dcm"))) == n_files


def test_a_failed_sync_fails_the_series_and_leaves_nothing(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def failing(descriptor):
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith("IM0002.dcm"):
            raise OSError(5, "Input/output error")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OutputError, match=r"/out: cannot write it: Input/output error$"):
        write_upsampled(CT_SERIES, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder, no lock file


def test_a_failed_series_stops_its_sync_threads(tmp_path):
    class Broken(Exception):
        pass

    scan = open_scan(CT_SERIES)
    affine = rescaled_affine(scan.affine, in_plane_factors(2, 2))
    counts = IntensityCounts()
    counts.add(scan.load().array)
    writer = DicomSeriesWriter(tmp_path / "out", scan, affine, 2, "test", counts.window())
    with pytest.raises(Broken), writer:
        writer.write(np.zeros((1, 1024, 1024), dtype=np.float32))
        raise Broken
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("medsr-sync")]
    with pytest.raises(OutputError, match="only 1 of 3"):
        with DicomSeriesWriter(tmp_path / "short", scan, affine, 2, "test", counts.window()) as writer:
            writer.write(np.zeros((1, 1024, 1024), dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ stored pixels


def stored_in_float64(plane, dtype, slope, intercept):
    """The stored values as float64 arithmetic gives them (no reserved range)."""
    info = np.iinfo(dtype)
    return np.clip(np.rint((plane.astype(np.float64) - intercept) / slope), info.min, info.max).astype(dtype)


def near_half_steps(rng, dtype, slope, intercept, n=4096):
    """Values whose quotient is a half integer or a float32 step from one: where float32
    rounding could change the stored value."""
    info = np.iinfo(dtype)
    steps = rng.integers(info.min - 2, info.max + 2, n) + 0.5
    exact = (steps * slope + intercept).astype(np.float32)
    return np.concatenate([exact, np.nextafter(exact, np.float32(np.inf)), np.nextafter(exact, np.float32(-np.inf))])


@pytest.mark.parametrize("dtype", ["int16", "uint16", "int8", "uint8"])
@pytest.mark.parametrize("slope, intercept", [(1.0, 0.0), (1.0, -1024.0), (0.5, 3.25), (1 / 3, -32768.0),
                                              (0.012345679, 1024.0), (37.5, 4659.99)])
def test_stored_pixels_equal_float64_rounding_near_every_half_step(dtype, slope, intercept):
    rng = np.random.default_rng(12)
    dtype = np.dtype(dtype)
    plane = near_half_steps(rng, dtype, slope, intercept).reshape(-1, 64)
    for view in (plane, plane.T):  # the writer hands over transposed planes
        np.testing.assert_array_equal(stored_pixels(view, dtype, slope, intercept),
                                      stored_in_float64(view, dtype, slope, intercept))


def test_stored_pixels_keep_off_the_reserved_range():
    dtype = np.dtype("int16")
    plane = np.array([[-2001.5, -2000.0, -1999.6, -1999.4, -1998.5, -1997.0]], dtype=np.float32)
    stored = stored_pixels(plane, dtype, 1.0, 0.0, reserved=(-2000, -1999))
    np.testing.assert_array_equal(stored, [[-2002, -2001, -2001, -1998, -1998, -1997]])


def test_stored_pixels_reuse_one_scratch_buffer_without_carrying_values_over():
    rng = np.random.default_rng(3)
    dtype, scratch = np.dtype("int16"), np.empty((64, 48), dtype=np.float64)
    for _ in range(3):  # each call overwrites the whole buffer: no value of the previous plane leaks
        plane = (rng.normal(size=(48, 64)) * 3000).astype(np.float32)
        plane[:5] = -2000.0  # lands in the reserved range, moved beside it
        with_scratch = stored_pixels(plane.T, dtype, 0.7, -5.0, (-2850, -2845), scratch)
        np.testing.assert_array_equal(with_scratch, stored_pixels(plane.T, dtype, 0.7, -5.0, (-2850, -2845)))
        assert not ((with_scratch >= -2850) & (with_scratch <= -2845)).any()


def test_non_finite_values_store_as_float64_would():
    dtype = np.dtype("int16")
    plane = np.array([[np.inf, -np.inf, 1.5, 2.5]], dtype=np.float32)
    np.testing.assert_array_equal(stored_pixels(plane, dtype, 1.0, 0.0), stored_in_float64(plane, dtype, 1.0, 0.0))


# ------------------------------------------------------------------ derived headers


def header_with_private_data():
    """The real CT_small (private elements of its own) with a private element inside a
    sequence item and a stray command-set element."""
    header = pydicom.dcmread(pydicom_test_file("CT_small.dcm"), stop_before_pixels=True)
    item = pydicom.Dataset()
    item.add_new(0x00091000, "LO", "ACME")
    item.add_new(0x00091001, "LO", "vendor data")
    item.CodeValue = "1"
    header.add_new(0x00089215, "SQ", Sequence([item]))
    header.add_new(0x00000902, "LO", "command-set text")
    return header


def test_kept_copy_equals_a_pruned_deep_copy_and_leaves_the_header_alone():
    header = header_with_private_data()
    raw_before = sum(header.get_item(tag).is_raw for tag in header.keys())
    expected = copy.deepcopy(header)
    expected.remove_private_tags()
    del expected[0x00000902]
    kept = _kept_copy(header)
    assert kept == expected and kept.file_meta == expected.file_meta
    assert not any(element.tag.is_private or element.tag.group == 0 for element in kept.iterall())
    assert sum(header.get_item(tag).is_raw for tag in header.keys()) == raw_before  # not converted
    assert header[0x00089215].value[0][0x00091001].value == "vendor data"  # the source keeps its own
    kept.PatientName = "CHANGED^NAME"
    kept.ImageType = ["DERIVED", "SECONDARY"]
    assert header.PatientName != "CHANGED^NAME" and list(header.ImageType)[0] != "DERIVED"


def test_derived_files_carry_no_private_or_command_set_elements(tmp_path):
    source = tmp_path / "ct.dcm"
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    item = pydicom.Dataset()
    item.add_new(0x00091000, "LO", "ACME")
    item.add_new(0x00091001, "LO", "vendor data")
    dataset.add_new(0x00089215, "SQ", Sequence([item]))
    dataset.save_as(source, enforce_file_format=True)
    write_upsampled(source, tmp_path / "out")
    (written,) = [pydicom.dcmread(path) for path in (tmp_path / "out").glob("*.dcm")]
    assert not any(element.tag.is_private for element in written.iterall())
    assert len(written[0x00089215].value[0]) == 0


# ------------------------------------------------------------------ pixels read straight from the file


def no_pydicom_decoding(monkeypatch):
    """Make pydicom's pixel decoding fail, so a read that succeeds went straight to the file."""
    def refuse(*args, **kwargs):
        raise AssertionError("pixels decoded by pydicom")

    monkeypatch.setattr(reading, "decode_pixels", refuse)
    monkeypatch.setattr(reading, "_pixels", refuse)


def variant(path, syntax, bits_allocated=16, bits_stored=16, signed=1, frames=1):
    """The real CT_small with random stored values (bits above BitsStored set too, as some
    writers leave them), in ``syntax``."""
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    info = np.iinfo(f"u{bits_allocated // 8}")
    values = np.random.default_rng(bits_stored).integers(0, int(info.max) + 1, (frames, 128, 128))
    order = ">" if syntax == ExplicitVRBigEndian else "<"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits_allocated, bits_stored, bits_stored - 1
    dataset.PixelRepresentation = signed
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.PixelData = values.astype(f"{order}u{bits_allocated // 8}").tobytes()
    dataset.file_meta.TransferSyntaxUID = syntax
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("bits_allocated, bits_stored, signed", [(16, 16, 1), (16, 12, 1), (16, 12, 0), (16, 1, 1),
                                                                  (32, 20, 1), (8, 8, 0), (8, 6, 1)])
def test_uncompressed_pixels_read_straight_from_the_file_equal_pydicoms(tmp_path, monkeypatch, syntax,
                                                                         bits_allocated, bits_stored, signed):
    path = variant(tmp_path / "ct.dcm", syntax, bits_allocated, bits_stored, signed)
    expected = pixel_array(path)
    image = _read_header(path)
    decoder = _FrameDecoder(image)
    if bits_allocated == 8 and syntax == ExplicitVRBigEndian:
        assert decoder.layout is None  # pydicom swaps the byte pairs of 8-bit big-endian data
        return
    no_pydicom_decoding(monkeypatch)
    stored = decoder()
    assert stored.dtype == expected.dtype and stored.flags.writeable
    np.testing.assert_array_equal(stored, expected)


def test_frames_of_a_multiframe_file_read_straight_from_it_equal_pydicoms(tmp_path, monkeypatch):
    path = variant(tmp_path / "frames.dcm", ExplicitVRLittleEndian, 16, 12, 1, frames=3)
    decoder = _FrameDecoder(_read_header(path), n_frames=3)
    expected = [pixel_array(path, index=frame) for frame in range(3)]
    no_pydicom_decoding(monkeypatch)
    for frame in (2, 0, 1):
        np.testing.assert_array_equal(decoder(frame), expected[frame])


@pytest.mark.parametrize("source", [MR_SERIES, CT_SERIES, MR_MULTIFRAME])
def test_real_scans_read_without_pydicom_decoding_give_the_same_volume(source, monkeypatch):
    expected = read_scan(source).array
    no_pydicom_decoding(monkeypatch)
    np.testing.assert_array_equal(read_scan(source).array, expected)


def test_pixel_data_cut_short_is_left_to_pydicom(tmp_path):
    path = tmp_path / "short.dcm"
    path.write_bytes(pydicom_test_file("MR_small.dcm").read_bytes()[:-3000])

    def outcome(decoder):
        try:
            return "read", decoder().tobytes()
        except ScanReadError as error:
            return "refused", str(error)

    native, through_pydicom = _FrameDecoder(_read_header(path)), _FrameDecoder(_read_header(path))
    through_pydicom.layout = None
    assert native.layout is not None and native._read_native(0) is None
    assert outcome(native) == outcome(through_pydicom)


def test_compressed_and_colour_pixels_are_left_to_pydicom(tmp_path):
    for name in ("MR_small_RLE.dcm", "examples_rgb_color.dcm", "liver_1frame.dcm"):
        image = _read_header(pydicom_test_file(name))
        assert _FrameDecoder(image).layout is None
    dataset = pydicom.dcmread(pydicom_test_file("MR_small.dcm"))
    dataset.compress(RLELossless)
    dataset.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert _read_header(tmp_path / "rle.dcm").pixels_at is None


# ------------------------------------------------------------------ headers read with the collector paused


@pytest.mark.parametrize("enabled", [True, False])
def test_headers_are_read_with_the_collector_paused_and_left_as_found(tmp_path, monkeypatch, enabled):
    seen = []
    real_read_header = reading._read_header

    def read_header(path):
        seen.append(gc.isenabled())
        return real_read_header(path)

    monkeypatch.setattr(reading, "_read_header", read_header)
    was_enabled = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        open_scan(CT_SERIES)
        assert seen and not any(seen) and gc.isenabled() == enabled
        with pytest.raises(ScanReadError, match="no DICOM files"):
            open_scan(tmp_path)  # an empty folder
        assert gc.isenabled() == enabled
    finally:
        gc.enable() if was_enabled else gc.disable()
