"""CTF results written by other programs, read into one table: RELION STAR, CTFFIND text,
cryoSPARC ``.cs``.

Every reader returns ``micrograph_name``, ``defocus_u_A``, ``defocus_v_A`` (U >= V),
``defocus_angle_deg`` (from +x towards +y, in [0, 180)) and ``phase_shift_deg``, the
conventions of :mod:`cryodask.physics`, whatever units the file used (CTFFIND text and
cryoSPARC store phase shifts and cryoSPARC angles in radians).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pandas as pd

from cryodask.io.metadata import MetadataFileError, read_star_micrographs

__all__ = ["compare_ctf", "prior_defocus", "read_ctf_results"]

_COLUMNS = ["micrograph_name", "defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg"]


def _normalise(table: pd.DataFrame) -> pd.DataFrame:
    u = table["defocus_u_A"].to_numpy(np.float64)
    v = table["defocus_v_A"].to_numpy(np.float64)
    angle = table["defocus_angle_deg"].to_numpy(np.float64)
    swap = v > u
    table["defocus_u_A"] = np.where(swap, v, u)
    table["defocus_v_A"] = np.where(swap, u, v)
    table["defocus_angle_deg"] = np.mod(np.where(swap, angle + 90.0, angle), 180.0)
    return table[_COLUMNS].reset_index(drop=True)


def _read_ctffind(path) -> pd.DataFrame:
    names, rows, single = {}, [], None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            text = line.strip()
            m = re.match(r"#\s*Micrograph\s+(\d+):\s*(.+)$", text)
            if m:
                names[int(m.group(1))] = m.group(2).strip()
                continue
            m = re.match(r"#\s*Input file:\s*(.+?)\s*(;|$)", text)
            if m:
                single = m.group(1)
                continue
            if not text or text.startswith("#"):
                continue
            fields = text.split()
            try:
                values = [float(f) for f in fields[:7]]
            except ValueError:
                raise MetadataFileError(f"{path}: not a CTFFIND result table (line {text[:60]!r})") from None
            if len(values) < 5:
                raise MetadataFileError(f"{path}: a CTFFIND row has {len(values)} columns, expected 7")
            rows.append(values)
    if not rows:
        raise MetadataFileError(f"{path}: no CTFFIND result rows")
    table = pd.DataFrame({
        "micrograph_name": [names.get(int(r[0]), single if single and len(rows) == 1 else f"{int(r[0])}")
                            for r in rows],
        "defocus_u_A": [r[1] for r in rows], "defocus_v_A": [r[2] for r in rows],
        "defocus_angle_deg": [r[3] for r in rows],
        "phase_shift_deg": [math.degrees(r[4]) for r in rows],  # CTFFIND writes radians
    })
    return _normalise(table)


def _read_cs(path) -> pd.DataFrame:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise MetadataFileError(f"{path}: not a cryoSPARC .cs file (a NumPy record array): {exc}") from exc
    fields = data.dtype.names or ()
    needed = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad")
    missing = [f for f in needed if f not in fields]
    if missing:
        raise MetadataFileError(f"{path}: no field(s) {missing}; it has {list(fields)[:12]}")
    name_field = next((f for f in ("micrograph_blob/path", "location/micrograph_path", "ctf/path")
                       if f in fields), None)
    if name_field is None:
        raise MetadataFileError(f"{path}: no micrograph path field (micrograph_blob/path or "
                                "location/micrograph_path)")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in data[name_field]]
    phase = data["ctf/phase_shift_rad"] if "ctf/phase_shift_rad" in fields else np.zeros(len(data))
    table = pd.DataFrame({
        "micrograph_name": names, "defocus_u_A": data["ctf/df1_A"].astype(np.float64),
        "defocus_v_A": data["ctf/df2_A"].astype(np.float64),
        "defocus_angle_deg": np.degrees(data["ctf/df_angle_rad"].astype(np.float64)),
        "phase_shift_deg": np.degrees(np.asarray(phase, np.float64)),
    })
    # Particle files repeat each micrograph's CTF: one row per micrograph.
    return _normalise(table.drop_duplicates("micrograph_name"))


def read_ctf_results(path) -> pd.DataFrame:
    """CTF results of another program, by file type: ``.star`` (RELION), ``.cs``
    (cryoSPARC), otherwise CTFFIND text (``.txt``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetadataFileError(f"{path}: no such file")
    if path.endswith(".cs"):
        return _read_cs(path)
    if path.endswith(".star"):
        table = read_star_micrographs(path)
        missing = {"defocus_u_A", "defocus_v_A", "defocus_angle_deg"} - set(table.columns)
        if missing:
            raise MetadataFileError(f"{path}: no CTF columns ({sorted(missing)} missing)")
        if "phase_shift_deg" not in table.columns:
            table["phase_shift_deg"] = 0.0
        return _normalise(table)
    return _read_ctffind(path)


def _key(name) -> str:
    """Micrographs are matched by file stem: other programs name them by their own paths."""
    return os.path.splitext(os.path.basename(str(name).split("@")[-1]))[0]


def prior_defocus(names, table: pd.DataFrame) -> np.ndarray:
    """Each named micrograph's mean defocus (Å) in ``table`` (from :func:`read_ctf_results`),
    matched by file stem; NaN where the table does not have it."""
    means = dict(zip(table["micrograph_name"].map(_key),
                     0.5 * (table["defocus_u_A"].to_numpy(np.float64) + table["defocus_v_A"].to_numpy(np.float64))))
    return np.array([means.get(_key(name), np.nan) for name in names], dtype=np.float64)


def compare_ctf(ours: pd.DataFrame, theirs: pd.DataFrame) -> pd.DataFrame:
    """Matched micrographs (by file stem) side by side: mean defocus, astigmatism and angle
    of each, and the differences (ours - theirs; angles modulo 180°)."""
    a = ours.assign(key=ours["micrograph_name"].map(_key))
    b = theirs.assign(key=theirs["micrograph_name"].map(_key)).drop_duplicates("key")
    both = a.merge(b, on="key", suffixes=("", "_theirs"))
    out = pd.DataFrame({"micrograph": both["micrograph_name"]})
    for side, suffix in (("ours", ""), ("theirs", "_theirs")):
        out[f"mean_defocus_{side}_A"] = 0.5 * (both[f"defocus_u_A{suffix}"] + both[f"defocus_v_A{suffix}"])
        out[f"astigmatism_{side}_A"] = both[f"defocus_u_A{suffix}"] - both[f"defocus_v_A{suffix}"]
    out["mean_defocus_difference_pct"] = 100 * (out["mean_defocus_ours_A"] / out["mean_defocus_theirs_A"] - 1)
    difference = np.mod(both["defocus_angle_deg"] - both["defocus_angle_deg_theirs"] + 90.0, 180.0) - 90.0
    out["angle_difference_deg"] = difference.to_numpy()
    return out
