import subprocess
import sys


def test_import_starts_nothing_and_imports_no_gpu_library():
    code = ("import sys, threading, cryodask; "
            "print(sorted(m for m in ('cupy', 'dask_cuda', 'distributed.deploy') if m in sys.modules), "
            "threading.active_count(), sorted(cryodask.__all__) == cryodask.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] 1 True"
