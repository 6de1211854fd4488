import numpy as np
import pandas as pd
import pytest
import starfile

from cryodask.io.metadata import (
    MetadataFileError,
    find_sidecar_metadata,
    read_coordinates,
    read_epu_xml,
    read_mdoc,
    read_star_micrographs,
)

EPU_XML = "FoilHole_9015883_Data_9017354_6_20250108_154918.xml"


def test_epu_xml_units(data_path):
    meta = read_epu_xml(data_path(EPU_XML))
    assert meta["voltage_kV"] == pytest.approx(300.0)
    assert meta["pixel_size_A"] == pytest.approx(1.05588, abs=1e-5)
    assert meta["dose_e_per_A2"] == pytest.approx(14.5578, abs=1e-4)
    assert meta["applied_defocus_A"] == pytest.approx(27000.0)  # EPU -2.7e-6 m


def test_mdoc_frame_set_and_tilt_series(data_path):
    (single,) = read_mdoc(data_path("frame_set_single.mdoc"))
    assert single == {"pixel_size_A": 1.2827, "voltage_kV": 300.0, "dose_e_per_A2": 7.65892,
                      "applied_defocus_A": pytest.approx(45000.0)}
    tilts = read_mdoc(data_path("TS_01.mrc.mdoc"))
    assert len(tilts) == 41
    assert tilts[0]["pixel_size_A"] == pytest.approx(5.4)
    assert tilts[0]["applied_defocus_A"] == pytest.approx(40000.0)  # TargetDefocus = -4 µm


def test_mdoc_rejects_other_text(tmp_path):
    path = tmp_path / "x.mdoc"
    path.write_text("hello = 1\n")
    with pytest.raises(MetadataFileError, match="x.mdoc"):
        read_mdoc(path)


def test_star_relion31_optics_and_relion30(tmp_path):
    path = tmp_path / "micrographs.star"
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographPixelSize": [0.83], "rlnVoltage": [200.0],
                           "rlnSphericalAberration": [1.4], "rlnAmplitudeContrast": [0.1]})
    mics = pd.DataFrame({"rlnMicrographName": ["MotionCorr/job002/a.mrc", "MotionCorr/job002/b.mrc"],
                         "rlnOpticsGroup": [1, 1]})
    starfile.write({"optics": optics, "micrographs": mics}, path)
    table = read_star_micrographs(path)
    assert list(table["micrograph_name"]) == ["MotionCorr/job002/a.mrc", "MotionCorr/job002/b.mrc"]
    assert table["pixel_size_A"].tolist() == [0.83, 0.83]
    assert table["voltage_kV"].iloc[0] == 200.0 and table["cs_mm"].iloc[0] == 1.4

    old = tmp_path / "old.star"
    starfile.write(pd.DataFrame({"rlnMicrographName": ["c.mrc"], "rlnDetectorPixelSize": [5.0],
                                 "rlnMagnification": [50000.0], "rlnDefocusU": [12000.0]}), old)
    table = read_star_micrographs(old)
    assert table["pixel_size_A"].iloc[0] == pytest.approx(1.0)
    assert table["defocus_u_A"].iloc[0] == 12000.0


def test_star_without_micrograph_names(tmp_path):
    path = tmp_path / "p.star"
    starfile.write(pd.DataFrame({"rlnCoordinateX": [1.0]}), path)
    with pytest.raises(MetadataFileError, match="p.star: no table with an rlnMicrographName"):
        read_star_micrographs(path)


def test_coordinates_relion_box_and_topaz(data_path, tmp_path):
    relion = read_coordinates(data_path("Ucsf_stack_1142_DW_autopick.star"),
                              micrograph_name="Ucsf_stack_1142_DW")
    assert len(relion) == 45
    assert relion["x_px"].iloc[0] == pytest.approx(839.125024)
    assert relion["y_px"].iloc[0] == pytest.approx(19.979167)
    assert relion["figure_of_merit"].iloc[0] == pytest.approx(0.624705)

    box = tmp_path / "mic1.box"
    box.write_text("10 20 100 100\n50 60 100 100\n")
    table = read_coordinates(box)
    assert table["micrograph_name"].tolist() == ["mic1", "mic1"]
    assert table["x_px"].tolist() == [60.0, 100.0] and table["y_px"].tolist() == [70.0, 110.0]

    topaz = tmp_path / "particles.txt"
    topaz.write_text("image_name\tx_coord\ty_coord\tscore\nm1\t5\t6\t0.5\nm2\t7\t8\t-1\n")
    table = read_coordinates(topaz)
    assert table["micrograph_name"].tolist() == ["m1", "m2"]
    assert table["figure_of_merit"].tolist() == [0.5, -1.0]

    bad = tmp_path / "bad.txt"
    bad.write_text("a b\n1 2\n")
    with pytest.raises(MetadataFileError, match="bad.txt.*image_name"):
        read_coordinates(bad)


def test_sidecar_discovery(data_path, tmp_path):
    import shutil

    mic = tmp_path / "FoilHole_9015883_Data_9017354_6_20250108_154918_fractions.mrc"
    mic.write_bytes(b"")
    shutil.copy(data_path(EPU_XML), tmp_path / EPU_XML)
    (meta,) = find_sidecar_metadata(str(mic), 1)
    assert meta["pixel_size_A"] == pytest.approx(1.05588, abs=1e-5)
    assert find_sidecar_metadata(str(tmp_path / "other.mrc"), 2) == [{}, {}]
    np.testing.assert_equal(len(find_sidecar_metadata(str(mic), 3)), 3)
