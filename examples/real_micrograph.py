"""The whole pipeline on a real micrograph: CTF, causes of noise, scores, restoration, report.

The micrograph is a 1024² crop of a real EPU 2.9 micrograph (Titan Krios, Falcon; mrcfile's
test data, BSD-3, see data/SOURCES.md). Its pixel size, voltage and dose come from its own
FEI extended header.

Run:  python examples/real_micrograph.py OUT_DIR
"""

import os
import sys

import pandas as pd
import starfile

import cryodask

HERE = os.path.dirname(os.path.abspath(__file__))


def main(out_dir: str) -> None:
    written = cryodask.run_pipeline({
        "inputs": [os.path.join(HERE, "data", "epu2.9_crop1024.mrc")],
        "out_dir": out_dir,
        "cluster": "threads",
    })
    ctf = starfile.read(written["ctf_star"])
    optics, row = ctf["optics"].iloc[0], ctf["micrographs"].iloc[0]
    print(f"pixel size {optics['rlnMicrographPixelSize']:.4f} Å, {optics['rlnVoltage']:.0f} kV")
    print(f"defocus U {row['rlnDefocusU']:.0f} Å, V {row['rlnDefocusV']:.0f} Å, "
          f"angle {row['rlnDefocusAngle']:.1f}°, rings fitted to {row['rlnCtfMaxResolution']:.2f} Å")
    scores = pd.read_csv(written["scores"]).iloc[0]
    print(f"top cause of noise: {scores['top_cause']}; rules failed: {scores['failed_rules']} "
          f"({scores['failure_reasons']})")
    print(f"restored: {sorted(os.listdir(written['restored']))}")
    print(f"report: {written['report']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "real-example-output")
