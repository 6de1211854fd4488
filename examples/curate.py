"""Score a dataset from Python, read why the worst micrographs fail, keep the good ones.

Simulates micrographs whose ice thickness, dose and artifacts vary, scores them with the
whole dataset's statistics, prints the ranked table and the reasons of the worst, and
writes a RELION STAR file of the micrographs that pass a condition.

Run:  python examples/curate.py OUT_DIR [CLUSTER]   (CLUSTER: threads, local, a YAML file)
"""

import sys

import numpy as np

import cryodask
from cryodask import pipeline
from cryodask.score import scores_table, select, write_selection
from cryodask.simulate import DatasetRanges, Detector, draw_micrograph_params, write_simulated_dataset


def main(out_dir: str, cluster: str = "threads") -> None:
    ranges = DatasetRanges(dose_e_per_A2=(20.0, 60.0), ice_thickness_A=(150.0, 1400.0),
                           n_hot_pixels=(0, 300), n_xrays=(0, 20))
    params = draw_micrograph_params(8, shape=(384, 384), pixel_size_A=1.0, ranges=ranges, seed=5)
    write_simulated_dataset(f"{out_dir}/micrographs", params, detector=Detector(gain_std=0.02), seed=5)
    with cryodask.cluster_client(cluster):
        store = f"{out_dir}/dataset.zarr"
        # The stated dose is what the user believes; the rules check the counts against it.
        ds = cryodask.ingest(f"{out_dir}/micrographs/*.mrc", store, overwrite=True, dose_e_per_A2=40.0)
        scores, _ = pipeline.score_dataset(ds)  # computes: several passes over the dataset
        cryodask.write_variables(scores, store, overwrite=True)
    ds = cryodask.open_dataset(store)
    table = scores_table(ds)
    ranked = table.sort_values("quality_expected", ascending=False)
    print(ranked[["micrograph", "quality_expected", "hyperscore", "logic", "top_cause"]].to_string(index=False))
    for row in ranked.tail(2).itertuples():
        print(f"{row.micrograph}: failed {row.failed_rules or 'nothing'}; {row.failure_reasons or ''}")
    condition = f"quality_expected >= {np.median(table['quality_expected']):.4f} and logic >= 0.8"
    keep = select(table, condition)
    write_selection(ds, keep, f"{out_dir}/selected_micrographs_ctf.star")
    print(f"kept {int(keep.sum())} of {len(table)} ({condition}) -> {out_dir}/selected_micrographs_ctf.star")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "curate-output", *sys.argv[2:3])
