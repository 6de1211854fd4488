"""Files in and out: micrograph images, metadata, the Zarr store, exports."""

from cryodask.io.ctf_results import compare_ctf, read_ctf_results
from cryodask.io.export import export_mrc, output_stem
from cryodask.io.images import ImageHeader, MicrographFileError, probe, read_micrograph, write_mrc
from cryodask.io.metadata import (
    MetadataFileError,
    read_coordinates,
    read_epu_xml,
    read_mdoc,
    read_metadata_table,
    read_star_micrographs,
)
from cryodask.io.store import IncompleteStoreError, StoreError, open_dataset, write_store, write_variables

__all__ = [
    "ImageHeader",
    "IncompleteStoreError",
    "MetadataFileError",
    "MicrographFileError",
    "StoreError",
    "compare_ctf",
    "export_mrc",
    "open_dataset",
    "output_stem",
    "probe",
    "read_coordinates",
    "read_ctf_results",
    "read_epu_xml",
    "read_mdoc",
    "read_metadata_table",
    "read_micrograph",
    "read_star_micrographs",
    "write_mrc",
    "write_store",
    "write_variables",
]
