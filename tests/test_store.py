import os
import shutil

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from cryodask import ingest, open_dataset, write_variables
from cryodask.io.store import IncompleteStoreError, StoreError, write_store


@pytest.fixture
def store(sim_dir, tmp_path):
    ingest(str(sim_dir / "*.mrc"), tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


def test_open_is_lazy_and_reads_no_image_data(store):
    # Remove every image chunk: opening must still work, computing must not.
    chunk_dir = store / "image" / "c"
    assert chunk_dir.is_dir()
    shutil.rmtree(chunk_dir)
    ds = open_dataset(store)
    assert isinstance(ds["image"].data, da.Array)
    assert ds["image"].data.chunksize == (1, 256, 320)
    assert ds.sizes == {"micrograph": 4, "y": 256, "x": 320}
    values = ds["image"].isel(micrograph=0).values
    assert np.isnan(values).all()  # the fill value: the chunk really was gone, nothing cached


def test_coordinates_carry_units(store):
    ds = open_dataset(store)
    assert ds["x"].attrs["units"] == "Å"
    np.testing.assert_allclose(ds["x"].values[:3], [0.0, 1.2, 2.4], rtol=1e-6)
    assert ds["pixel_size_A"].attrs["units"] == "Å"


def test_results_are_added_without_rewriting_images(store):
    before = {p: os.stat(os.path.join(dp, p)).st_mtime_ns
              for dp, _, files in os.walk(store / "image") for p in files}
    ds = open_dataset(store)
    new = xr.Dataset({"score": ("micrograph", np.arange(4, dtype=np.float32))})
    write_variables(new, store)
    after = {p: os.stat(os.path.join(dp, p)).st_mtime_ns
             for dp, _, files in os.walk(store / "image") for p in files}
    assert before == after
    reopened = open_dataset(store)
    np.testing.assert_array_equal(reopened["score"].values, np.arange(4))
    xr.testing.assert_identical(reopened["image"], ds["image"])
    with pytest.raises(ValueError, match="already holds"):
        write_variables(new, store)


def test_interrupted_variable_write_is_detected(store):
    def explode(block):
        if block.ravel()[0] >= 2:
            raise RuntimeError("worker died")
        return block

    lazy = da.arange(4, chunks=1, dtype=np.float32).map_blocks(explode, dtype=np.float32)
    with pytest.raises(RuntimeError, match="worker died"):
        write_variables(xr.Dataset({"broken": ("micrograph", lazy)}), store)
    with pytest.raises(IncompleteStoreError, match=r"\['broken'\] did not finish"):
        open_dataset(store)
    ds = open_dataset(store, incomplete="drop")
    assert "broken" not in ds and "image" in ds
    # Rewriting it successfully clears the flag.
    write_variables(xr.Dataset({"broken": ("micrograph", np.zeros(4, np.float32))}), store,
                    overwrite=True)
    assert "broken" in open_dataset(store)


def test_interrupted_store_write_leaves_nothing_that_looks_complete(tmp_path):
    def explode(block):
        raise RuntimeError("disk full")

    image = da.zeros((3, 16, 16), chunks=(1, 16, 16), dtype=np.float32).map_blocks(explode, dtype=np.float32)
    ds = xr.Dataset({"image": (("micrograph", "y", "x"), image)})
    with pytest.raises(RuntimeError, match="disk full"):
        write_store(ds, tmp_path / "new.zarr")
    assert os.listdir(tmp_path) == []


def test_existing_store_is_not_overwritten_by_default(store):
    ds = open_dataset(store)
    with pytest.raises(FileExistsError, match="s.zarr"):
        write_store(ds, store)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_dataset(tmp_path / "nothing.zarr")
    xr.Dataset({"a": ("t", np.zeros(2))}).to_zarr(tmp_path / "plain.zarr", zarr_format=3,
                                                    consolidated=False)
    with pytest.raises(StoreError, match="not a cryodask store"):
        open_dataset(tmp_path / "plain.zarr")


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
def test_codecs_chosen_by_measurement_and_lossy_restored_images(tmp_path):
    """New arrays are Blosc LZ4 + bit shuffle (lossless); keep_bits rounds a float
    variable's mantissa, with an error below 2^-(bits+1) of each value."""
    import zarr

    from cryodask.io.store import open_dataset, write_store, write_variables

    rng = np.random.default_rng(0)
    image = rng.poisson(40.0, (2, 64, 64)).astype(np.float32)
    ds = xr.Dataset({"image": (("micrograph", "y", "x"), image)})
    write_store(ds, tmp_path / "s.zarr")
    codecs = zarr.open_array(tmp_path / "s.zarr" / "image").metadata.codecs
    assert any(type(c).__name__ == "BloscCodec" and c.cname.value == "lz4" for c in codecs)
    restored = rng.normal(0.0, 1.0, image.shape).astype(np.float32)
    write_variables(xr.Dataset({"exact": (("micrograph", "y", "x"), restored),
                                "rounded": (("micrograph", "y", "x"), restored)}),
                    tmp_path / "s.zarr", keep_bits={"rounded": 8})
    back = open_dataset(tmp_path / "s.zarr")
    np.testing.assert_array_equal(back["image"].values, image)
    np.testing.assert_array_equal(back["exact"].values, restored)
    error = np.abs(back["rounded"].values - restored)
    assert 0 < error.max() and np.all(error <= np.abs(restored) * 2.0**-9 * (1 + 1e-6))
    with pytest.raises(ValueError, match="keep their codecs"):
        write_variables(xr.Dataset({"rounded": (("micrograph", "y", "x"), restored)}), tmp_path / "s.zarr",
                        overwrite=True, keep_bits={"rounded": 8})
    with pytest.raises(ValueError, match="keep_bits"):
        write_variables(xr.Dataset({"other": (("micrograph", "y", "x"), restored)}), tmp_path / "s.zarr",
                        keep_bits={"other": 40})
    assert "rounded" in open_dataset(tmp_path / "s.zarr").data_vars  # nothing left pending
