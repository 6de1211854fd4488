"""Micrograph image files: MRC/MRCS (mrcfile) and TIFF (tifffile).

``probe`` reads a file's header (and the microscope metadata an FEI/EPU extended header
carries); ``read_micrograph`` reads one section, or the sum of all sections of a movie.
Both are meant to run on Dask workers, one task per file or per micrograph. Every error
names the file and what is wrong with it. Files are opened read-only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mrcfile
import numpy as np
import tifffile

__all__ = [
    "ImageHeader",
    "MicrographFileError",
    "probe",
    "read_micrograph",
    "write_mrc",
]

_MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".st", ".ali", ".rec")
_TIFF_SUFFIXES = (".tif", ".tiff")
#: MRC dtypes that float32 holds exactly, so that a round trip through a store is bit-exact.
EXACT_IN_FLOAT32 = ("int8", "uint8", "int16", "uint16", "float16", "float32")


class MicrographFileError(ValueError):
    """A micrograph file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageHeader:
    """What a micrograph file's header says, in cryodask's units (``None`` when absent).

    ``n_sections`` is the number of 2D images in the file (frames of a movie or images of
    a stack); ``shape`` is ``(ny, nx)`` of one of them.
    """

    path: str
    kind: str
    n_sections: int
    shape: tuple[int, int]
    dtype: str
    pixel_size_A: float | None = None
    voltage_kV: float | None = None
    dose_e_per_A2: float | None = None
    applied_defocus_A: float | None = None
    is_stack_file: bool = False


def file_kind(path: str) -> str:
    """``"mrc"`` or ``"tiff"`` from the file name; anything else is an error."""
    lower = str(path).lower()
    if lower.endswith(_MRC_SUFFIXES):
        return "mrc"
    if lower.endswith(_TIFF_SUFFIXES):
        return "tiff"
    raise MicrographFileError(
        f"{path}: unknown micrograph format; expected one of "
        f"{', '.join(_MRC_SUFFIXES + _TIFF_SUFFIXES)}"
    )


def probe(path: str) -> ImageHeader:
    """Read a micrograph file's header without reading its pixels.

    Parameters
    ----------
    path : str
        An MRC/MRCS or TIFF file.

    Returns
    -------
    ImageHeader

    Raises
    ------
    MicrographFileError
        Missing, unreadable, truncated or not an image file; a 3D volume.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise MicrographFileError(f"{path}: no such file")
    kind = file_kind(path)
    if kind == "mrc":
        return _probe_mrc(path)
    return _probe_tiff(path)


def read_micrograph(path: str, section: int | None = None, *, sum_frames: bool = False,
                    ) -> np.ndarray:
    """Read one micrograph, in the file's own dtype.

    Parameters
    ----------
    path : str
    section : int or None
        Which 2D section of a stack file; ``None`` for a single-image file.
    sum_frames : bool
        Sum every section (the frames of a movie, without alignment) into one image,
        returned as float32.

    Returns
    -------
    ndarray of shape (ny, nx)

    Raises
    ------
    MicrographFileError
        Unreadable file, section out of range, or NaN/Inf pixels.
    """
    path = str(path)
    kind = file_kind(path)
    try:
        if kind == "mrc":
            with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
                data = mrc.data
                data = _select(data, path, section, sum_frames)
        else:
            with tifffile.TiffFile(path) as tif:
                data = _select(tif.asarray(), path, section, sum_frames)
    except MicrographFileError:
        raise
    except (ValueError, OSError, EOFError, tifffile.TiffFileError) as exc:
        raise MicrographFileError(f"{path}: cannot read the image data: {exc}") from exc
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            where = "" if section is None else f" section {section}"
            raise MicrographFileError(
                f"{path}{where}: {int(bad.sum())} pixel(s) are NaN or Inf; micrographs must be finite"
            )
    return data


def write_mrc(path: str, data: np.ndarray, *, pixel_size_A: float, overwrite: bool = False) -> None:
    """Write a 2D image or a stack as MRC with its voxel size in the header.

    The file is written to a temporary name beside ``path`` and renamed when complete, so
    an interrupted write never leaves a file that looks whole.
    """
    path = str(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True to replace it")
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data))
            if data.ndim == 3:
                mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_A)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _select(data, path, section, sum_frames):
    if data.ndim == 2:
        if section not in (None, 0):
            raise MicrographFileError(f"{path}: has one image, section {section} asked for")
        return np.array(data)
    if data.ndim != 3:
        raise MicrographFileError(f"{path}: expected a 2D image or a stack, got shape {data.shape}")
    if sum_frames:
        return data.sum(axis=0, dtype=np.float64).astype(np.float32)
    if section is None or not 0 <= section < data.shape[0]:
        raise MicrographFileError(
            f"{path}: section {section} is out of range [0, {data.shape[0] - 1}]"
        )
    return np.array(data[section])


def _probe_mrc(path: str) -> ImageHeader:
    try:
        with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
            if mrc.is_volume() and path.lower().endswith((".map", ".rec")):
                raise MicrographFileError(
                    f"{path}: is a 3D volume (space group {int(mrc.header.ispg)}), not a "
                    "micrograph or a stack of images"
                )
            shape = mrc.data.shape
            dtype = mrc.data.dtype
            voxel = float(mrc.voxel_size.x)
            meta = _fei_metadata(mrc)
    except MicrographFileError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise MicrographFileError(f"{path}: not a valid MRC file: {exc}") from exc
    n_sections = 1 if len(shape) == 2 else int(shape[0])
    fei_pixel = meta.pop("pixel_size_A", None)
    pixel = voxel if voxel > 0 else fei_pixel
    return ImageHeader(path=path, kind="mrc", n_sections=n_sections, shape=tuple(shape[-2:]),
                       dtype=str(np.dtype(dtype).newbyteorder("=")), pixel_size_A=pixel,
                       is_stack_file=path.lower().endswith(".mrcs"), **meta)


def _fei_metadata(mrc) -> dict:
    """Voltage, dose, applied defocus and pixel size from an FEI1/FEI2 extended header."""
    exttyp = bytes(mrc.header.exttyp).strip(b"\x00 ")
    if exttyp not in (b"FEI1", b"FEI2"):
        return {}
    try:
        ext = mrc.indexed_extended_header
        first = ext[0]
    except (ValueError, IndexError, TypeError):
        return {}
    out = {}

    def field(name):
        try:
            value = float(first[name])
        except (ValueError, KeyError):
            return None
        return value if math.isfinite(value) and value != 0.0 else None

    if (ht := field("HT")) is not None:
        out["voltage_kV"] = ht / 1e3  # volts
    if (dose := field("Dose")) is not None:
        out["dose_e_per_A2"] = dose * 1e-20  # electrons per m^2
    if (applied := field("Applied defocus")) is not None:
        out["applied_defocus_A"] = -applied * 1e10  # metres, negative for underfocus
    if (pixel := field("Pixel size X")) is not None:
        out["pixel_size_A"] = pixel * 1e10  # metres
    return out


def _probe_tiff(path: str) -> ImageHeader:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = series.shape
            dtype = series.dtype
    except (ValueError, OSError, EOFError, IndexError, tifffile.TiffFileError) as exc:
        raise MicrographFileError(f"{path}: not a valid TIFF file: {exc}") from exc
    if len(shape) not in (2, 3):
        raise MicrographFileError(f"{path}: expected a 2D image or a stack, got shape {shape}")
    n_sections = 1 if len(shape) == 2 else int(shape[0])
    return ImageHeader(path=path, kind="tiff", n_sections=n_sections, shape=tuple(shape[-2:]),
                       dtype=str(np.dtype(dtype).newbyteorder("=")))
