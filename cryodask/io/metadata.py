"""Acquisition metadata and particle coordinates, converted to cryodask's units.

Readers for RELION micrograph STAR tables, EPU per-exposure XML, SerialEM ``.mdoc`` and
particle coordinate files (RELION ``.star``, EMAN/crYOLO ``.box``, Topaz-style text).
Every value comes out in the unit its key names: ``pixel_size_A``, ``voltage_kV``,
``cs_mm``, ``amplitude_contrast``, ``dose_e_per_A2`` and ``applied_defocus_A`` (positive for
underfocus, whatever sign the source uses).
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import starfile

__all__ = [
    "MetadataFileError",
    "find_sidecar_metadata",
    "read_coordinates",
    "read_epu_xml",
    "read_mdoc",
    "read_metadata_table",
    "read_star_micrographs",
]

METADATA_FIELDS = (
    "pixel_size_A",
    "voltage_kV",
    "cs_mm",
    "amplitude_contrast",
    "dose_e_per_A2",
    "applied_defocus_A",
)


class MetadataFileError(ValueError):
    """A metadata or coordinate file that cannot be used; the message names it."""


# --------------------------------------------------------------------------- RELION STAR
_STAR_MICROGRAPH_COLUMNS = {
    "rlnMicrographPixelSize": "pixel_size_A",
    "rlnImagePixelSize": "pixel_size_A",
    "rlnVoltage": "voltage_kV",
    "rlnSphericalAberration": "cs_mm",
    "rlnAmplitudeContrast": "amplitude_contrast",
    "rlnDefocusU": "defocus_u_A",
    "rlnDefocusV": "defocus_v_A",
    "rlnDefocusAngle": "defocus_angle_deg",
    "rlnPhaseShift": "phase_shift_deg",
}


def read_star_micrographs(path) -> pd.DataFrame:
    """A RELION micrograph table (3.0 single block, or 3.1+ with ``data_optics``).

    Returns
    -------
    DataFrame
        One row per micrograph: ``micrograph_name`` and the fields among
        ``pixel_size_A, voltage_kV, cs_mm, amplitude_contrast, defocus_u_A, defocus_v_A,
        defocus_angle_deg, phase_shift_deg`` that the file gives (optics-group values joined per row; RELION
        3.0's ``rlnDetectorPixelSize`` (µm) / ``rlnMagnification`` gives the pixel size).
    """
    path = str(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises several kinds on malformed input
        raise MetadataFileError(f"{path}: not a readable STAR file: {exc}") from exc
    tables = {name: df for name, df in blocks.items() if isinstance(df, pd.DataFrame)}
    table = next((df for df in tables.values() if "rlnMicrographName" in df.columns), None)
    if table is None:
        raise MetadataFileError(f"{path}: no table with an rlnMicrographName column")
    table = table.copy()
    optics = tables.get("optics")
    if optics is not None and "rlnOpticsGroup" in table.columns:
        table = table.merge(optics, on="rlnOpticsGroup", how="left", suffixes=("", "_optics"))
    out = pd.DataFrame({"micrograph_name": table["rlnMicrographName"].astype(str)})
    for column, name in _STAR_MICROGRAPH_COLUMNS.items():
        if column in table.columns and name not in out.columns:
            out[name] = pd.to_numeric(table[column], errors="coerce")
    if "pixel_size_A" not in out.columns and {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table):
        out["pixel_size_A"] = 1e4 * table["rlnDetectorPixelSize"] / table["rlnMagnification"]
    return out


# --------------------------------------------------------------------------- EPU XML
def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_epu_xml(path) -> dict:
    """An EPU per-exposure XML (``FoilHole_*_Data_*.xml``).

    Returns
    -------
    dict
        ``voltage_kV`` (from ``AccelerationVoltage``, volts), ``pixel_size_A`` (from
        ``SpatialScale/pixelSize/x``, metres), ``dose_e_per_A2`` (``Dose``, e/m^2) and
        ``applied_defocus_A`` (``AppliedDefocus``, metres, negative for underfocus in EPU),
        where present.
    """
    path = str(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise MetadataFileError(f"{path}: not a readable EPU XML file: {exc}") from exc
    out: dict = {}
    custom = {}
    for kv in root.iter():
        if _local(kv.tag) != "KeyValueOfstringanyType":
            continue
        children = {_local(c.tag): c for c in kv}
        if "Key" in children and "Value" in children:
            custom[(children["Key"].text or "").strip()] = (children["Value"].text or "").strip()
    for element in root.iter():
        tag = _local(element.tag)
        if tag == "AccelerationVoltage" and element.text:
            out["voltage_kV"] = float(element.text) / 1e3
        elif tag == "pixelSize" and "pixel_size_A" not in out:
            for axis in element:
                if _local(axis.tag) == "x":
                    value = next((c.text for c in axis if _local(c.tag) == "numericValue"), None)
                    if value:
                        out["pixel_size_A"] = float(value) * 1e10
    if custom.get("Dose"):
        out["dose_e_per_A2"] = float(custom["Dose"]) * 1e-20
    if custom.get("AppliedDefocus"):
        out["applied_defocus_A"] = -float(custom["AppliedDefocus"]) * 1e10
    return out


# --------------------------------------------------------------------------- SerialEM mdoc
_MDOC_SECTION = re.compile(r"^\[(ZValue|FrameSet)\s*=\s*(\d+)\s*\]")


def read_mdoc(path) -> list[dict]:
    """A SerialEM ``.mdoc``: one dict per ``[ZValue]`` or ``[FrameSet]`` section.

    Each dict holds ``pixel_size_A`` (``PixelSpacing``), ``voltage_kV`` (the global
    ``Voltage``), ``dose_e_per_A2`` (``ExposureDose``, when > 0) and ``applied_defocus_A``
    (``TargetDefocus``, else ``Defocus``, in µm and negative for underfocus in SerialEM).
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise MetadataFileError(f"{path}: cannot read: {exc}") from exc
    header: dict[str, str] = {}
    sections: list[dict[str, str]] = []
    current = header
    for line in lines:
        line = line.strip()
        if _MDOC_SECTION.match(line):
            current = {}
            sections.append(current)
        elif "=" in line and not line.startswith("["):
            key, value = (part.strip() for part in line.split("=", 1))
            current.setdefault(key, value)
    if not sections:
        raise MetadataFileError(f"{path}: no [ZValue] or [FrameSet] section; not a SerialEM mdoc")
    out = []
    for section in sections:
        merged = {**header, **section}
        entry: dict = {}
        if (v := _number(merged.get("PixelSpacing"))) is not None:
            entry["pixel_size_A"] = v
        if (v := _number(merged.get("Voltage"))) is not None:
            entry["voltage_kV"] = v
        if (v := _number(merged.get("ExposureDose"))) is not None and v > 0:
            entry["dose_e_per_A2"] = v
        defocus = _number(merged.get("TargetDefocus"))
        if defocus is None:
            defocus = _number(merged.get("Defocus"))
        if defocus is not None:
            entry["applied_defocus_A"] = -defocus * 1e4
        out.append(entry)
    return out


def _number(text):
    if text is None:
        return None
    try:
        value = float(str(text).split()[0])
    except (ValueError, IndexError):
        return None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- sidecars
def find_sidecar_metadata(path: str, n_sections: int) -> list[dict]:
    """Metadata files lying beside a micrograph, read into one dict per section.

    Looks for ``<file>.mdoc``, ``<stem>.mdoc`` and ``<stem>.xml`` (EPU names its XML after
    the exposure, and a motion-corrected micrograph often adds a suffix such as
    ``_fractions``; those suffixes are stripped to find it).
    """
    directory, name = os.path.split(str(path))
    stem = os.path.splitext(name)[0]
    stems = [stem] + [re.sub(r"(_fractions|_Fractions|_EER|_DW|_doseweighted)$", "", stem)]
    for candidate in (name + ".mdoc", *(s + ".mdoc" for s in stems)):
        full = os.path.join(directory, candidate)
        if os.path.isfile(full):
            entries = read_mdoc(full)
            if len(entries) == n_sections:
                return entries
            return [entries[0]] * n_sections
    for s in stems:
        full = os.path.join(directory, s + ".xml")
        if os.path.isfile(full):
            return [read_epu_xml(full)] * n_sections
    return [{} for _ in range(n_sections)]


def read_metadata_table(path) -> pd.DataFrame:
    """Any per-micrograph metadata file as a table keyed by ``micrograph_name``.

    STAR files give one row per micrograph; an EPU XML or an mdoc gives rows named after
    the micrograph it describes (its file stem).
    """
    path = str(path)
    lower = path.lower()
    if lower.endswith(".star"):
        return read_star_micrographs(path)
    stem = os.path.basename(path)
    if lower.endswith(".xml"):
        return pd.DataFrame([{"micrograph_name": os.path.splitext(stem)[0], **read_epu_xml(path)}])
    if lower.endswith(".mdoc"):
        name = stem[: -len(".mdoc")]
        rows = read_mdoc(path)
        return pd.DataFrame([{"micrograph_name": name, **row} for row in rows[:1]])
    raise MetadataFileError(f"{path}: unknown metadata format; expected .star, .xml or .mdoc")


# --------------------------------------------------------------------------- coordinates
def read_coordinates(path, *, micrograph_name: str | None = None) -> pd.DataFrame:
    """Particle coordinates as a table: ``micrograph_name, x_px, y_px, figure_of_merit``.

    ``x_px`` is the column and ``y_px`` the row of the particle's centre in the
    micrograph's array (RELION's ``rlnCoordinateX/Y``). Supported: RELION ``.star``
    (``rlnMicrographName`` read when present), ``.box`` (EMAN/crYOLO: x, y of the box's
    corner, width, height; converted to the centre) and whitespace-separated text with a
    header naming ``image_name x_coord y_coord`` (Topaz).

    Parameters
    ----------
    micrograph_name : str, optional
        The micrograph these coordinates belong to, when the file does not say (``.box``
        files and single-micrograph STAR files); default the file's stem.
    """
    path = str(path)
    lower = path.lower()
    default_name = micrograph_name or os.path.splitext(os.path.basename(path))[0]
    try:
        if lower.endswith(".star"):
            blocks = starfile.read(path, always_dict=True)
            table = next((df for df in blocks.values() if isinstance(df, pd.DataFrame)
                          and "rlnCoordinateX" in df.columns), None)
            if table is None:
                raise MetadataFileError(f"{path}: no table with rlnCoordinateX/rlnCoordinateY")
            names = (table["rlnMicrographName"].astype(str) if "rlnMicrographName" in table
                     else default_name)
            out = pd.DataFrame({
                "micrograph_name": names,
                "x_px": table["rlnCoordinateX"].astype(float),
                "y_px": table["rlnCoordinateY"].astype(float),
                "figure_of_merit": (table["rlnAutopickFigureOfMerit"].astype(float)
                                    if "rlnAutopickFigureOfMerit" in table else np.nan),
            })
        elif lower.endswith(".box"):
            values = np.loadtxt(path, ndmin=2)
            if values.size and values.shape[1] < 4:
                raise MetadataFileError(f"{path}: a .box row needs x y width height, got "
                                        f"{values.shape[1]} columns")
            out = pd.DataFrame({
                "micrograph_name": default_name,
                "x_px": values[:, 0] + values[:, 2] / 2.0,
                "y_px": values[:, 1] + values[:, 3] / 2.0,
                "figure_of_merit": values[:, 4] if values.shape[1] > 4 else np.nan,
            })
        else:
            table = pd.read_csv(path, sep=r"\s+")
            missing = {"image_name", "x_coord", "y_coord"} - set(table.columns)
            if missing:
                raise MetadataFileError(f"{path}: coordinate text needs columns image_name, "
                                        f"x_coord, y_coord; missing {sorted(missing)}")
            out = pd.DataFrame({
                "micrograph_name": table["image_name"].astype(str),
                "x_px": table["x_coord"].astype(float),
                "y_px": table["y_coord"].astype(float),
                "figure_of_merit": table["score"].astype(float) if "score" in table else np.nan,
            })
    except MetadataFileError:
        raise
    except Exception as exc:
        raise MetadataFileError(f"{path}: cannot read particle coordinates: {exc}") from exc
    return out.reset_index(drop=True)
