"""CTF results as RELION STAR and CTFFIND-style text tables."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import starfile

__all__ = ["write_ctf_star", "write_ctffind_table"]

_OPTICS_FIELDS = ("pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast")


def _atomic_write(path, write):
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _table(ds) -> pd.DataFrame:
    names = [str(n) for n in ds["micrograph_name"].values]
    columns = {"micrograph_name": names}
    for name in _OPTICS_FIELDS + ("defocus_u_A", "defocus_v_A", "defocus_angle_deg",
                                  "phase_shift_deg", "ctf_cc", "ctf_fit_resolution_A"):
        if name not in ds:
            raise KeyError(f"the dataset has no {name!r}; estimate the CTF first")
        columns[name] = np.asarray(ds[name].values, dtype=np.float64)
    return pd.DataFrame(columns)


def write_ctf_star(ds, path, *, phase_shift: bool | None = None, extra: dict | None = None) -> pd.DataFrame:
    """Write RELION 3.1+ ``data_optics`` and ``data_micrographs`` blocks.

    Optics groups are the distinct combinations of pixel size, voltage, Cs and amplitude
    contrast. ``rlnPhaseShift`` (degrees) is written when ``phase_shift`` is True, or by
    default when any micrograph has a non-zero fitted phase shift. ``extra`` adds columns
    (label -> one value per micrograph), e.g. ``rlnMicrographIceThickness``.

    Returns
    -------
    DataFrame
        The ``data_micrographs`` table written.
    """
    table = _table(ds)
    keys = table[list(_OPTICS_FIELDS)].round(6)
    groups = {key: i + 1 for i, key in enumerate(dict.fromkeys(map(tuple, keys.to_numpy())))}
    group = [groups[tuple(row)] for row in keys.to_numpy()]
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{i}" for i in groups.values()],
        "rlnOpticsGroup": list(groups.values()),
        "rlnMicrographPixelSize": [k[0] for k in groups],
        "rlnVoltage": [k[1] for k in groups],
        "rlnSphericalAberration": [k[2] for k in groups],
        "rlnAmplitudeContrast": [k[3] for k in groups],
    })
    micrographs = pd.DataFrame({
        "rlnMicrographName": table["micrograph_name"],
        "rlnOpticsGroup": group,
        "rlnDefocusU": table["defocus_u_A"],
        "rlnDefocusV": table["defocus_v_A"],
        "rlnDefocusAngle": table["defocus_angle_deg"],
        "rlnCtfAstigmatism": table["defocus_u_A"] - table["defocus_v_A"],
        "rlnCtfFigureOfMerit": table["ctf_cc"],
        # RELION reads no NaN: a fit with no significant rings gets 999 Å, as a failed fit.
        "rlnCtfMaxResolution": table["ctf_fit_resolution_A"].where(
            np.isfinite(table["ctf_fit_resolution_A"]), 999.0),
    })
    if phase_shift is None:
        phase_shift = bool(np.nanmax(np.abs(table["phase_shift_deg"].to_numpy()), initial=0.0) > 0)
    if phase_shift:
        micrographs["rlnPhaseShift"] = table["phase_shift_deg"]
    for label, values in (extra or {}).items():
        values = np.asarray(values)
        if values.shape != (len(micrographs),):
            raise ValueError(f"extra column {label!r} has {values.shape} values for {len(micrographs)} micrographs")
        micrographs[label] = values
    _atomic_write(path, lambda tmp: starfile.write({"optics": optics, "micrographs": micrographs},
                                                   tmp, overwrite=True))
    return micrographs


def write_ctffind_table(ds, path, *, search=None) -> None:
    """A CTFFIND-style text table: one row per micrograph, CTFFIND 4's seven columns.

    Columns: number; defocus 1 (Å); defocus 2 (Å); azimuth of astigmatism (degrees);
    additional phase shift (radians, as CTFFIND writes it); cross-correlation; spacing up
    to which the rings were fitted (Å). ``# Micrograph N: name`` lines map numbers to files.
    """
    table = _table(ds)
    lines = ["# Output from cryodask CTF estimation, in CTFFIND 4's columns"]
    first = table.iloc[0]
    lines.append(f"# Pixel size: {first.pixel_size_A:.4f} Angstroms ; acceleration voltage: "
                 f"{first.voltage_kV:.1f} keV ; spherical aberration: {first.cs_mm:.2f} mm ; "
                 f"amplitude contrast: {first.amplitude_contrast:.2f}")
    if search is not None:
        lines.append(f"# min. res.: {search.min_resolution_A:.1f} Angstroms ; max. res.: "
                     f"{search.max_resolution_A:.1f} Angstroms ; min. def.: {search.min_defocus_A:.1f} "
                     f"Angstroms ; max. def. {search.max_defocus_A:.1f} Angstroms")
    lines.append("# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; "
                 "#4 - azimuth of astigmatism; #5 - additional phase shift [radians]; "
                 "#6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings "
                 "were fit successfully")
    for i, row in enumerate(table.itertuples(), start=1):
        lines.append(f"# Micrograph {i}: {row.micrograph_name}")
    for i, row in enumerate(table.itertuples(), start=1):
        lines.append(f"{i:.6f} {row.defocus_u_A:.6f} {row.defocus_v_A:.6f} {row.defocus_angle_deg:.6f} "
                     f"{math.radians(row.phase_shift_deg):.6f} {row.ctf_cc:.6f} "
                     f"{row.ctf_fit_resolution_A:.6f}")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    _atomic_write(path, write)
