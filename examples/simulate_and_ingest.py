"""Simulate a few micrographs, ingest them into a store, and measure their spectra.

Run:  python examples/simulate_and_ingest.py OUT_DIR
"""

import sys

import cryodask
from cryodask import pipeline
from cryodask.simulate import Detector, draw_micrograph_params, write_simulated_dataset


def main(out_dir: str) -> None:
    params = draw_micrograph_params(4, shape=(512, 512), pixel_size_A=1.0, seed=1)
    truth = write_simulated_dataset(f"{out_dir}/micrographs", params,
                                    detector=Detector(gain_std=0.02), seed=1)
    with cryodask.cluster_client("threads"):
        ds = cryodask.ingest(f"{out_dir}/micrographs/*.mrc", f"{out_dir}/dataset.zarr",
                             overwrite=True)
        spectra = pipeline.power_spectra(ds, tile_size=256)
        cryodask.write_variables(spectra.to_dataset(), f"{out_dir}/dataset.zarr", overwrite=True)
    ds = cryodask.open_dataset(f"{out_dir}/dataset.zarr")
    for name, df in zip(ds["micrograph_name"].values, truth["defocus_u_A"]):
        print(f"{name}: true defocus U {df:.0f} Å")
    print(f"power spectra: {ds['power_spectrum'].shape}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "example-output")
