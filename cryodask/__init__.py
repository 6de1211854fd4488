"""cryodask: restore cryo-EM micrographs at any scale.

The public API. Importing it starts nothing, reads nothing and imports no GPU library.
"""

from cryodask.clean import clean_dataset, estimate_ctf_cleaned
from cryodask.cluster import ClusterConfig, cluster_client, load_cluster_config
from cryodask.ctf import CTFFit, CTFSearch, estimate_ctf
from cryodask.ingest import IngestError, ingest, micrographs_dataset
from cryodask.io import export_mrc, open_dataset, write_variables
from cryodask.physics import CTFParams, ctf_2d, electron_wavelength_A, frequency_grid
from cryodask.run import run as run_pipeline

__version__ = "0.1.0"

__all__ = [
    "CTFFit",
    "CTFParams",
    "CTFSearch",
    "ClusterConfig",
    "IngestError",
    "__version__",
    "clean_dataset",
    "cluster_client",
    "ctf_2d",
    "electron_wavelength_A",
    "estimate_ctf",
    "estimate_ctf_cleaned",
    "export_mrc",
    "frequency_grid",
    "ingest",
    "load_cluster_config",
    "micrographs_dataset",
    "open_dataset",
    "run_pipeline",
    "write_variables",
]
