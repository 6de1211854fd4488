"""The array and FFT modules of an input array: chosen per call, never kept globally.

NumPy arrays get ``scipy.fft`` (multithread-capable pocketfft, native float32), CuPy arrays
``cupyx.scipy.fft`` (cuFFT), anything else the ``fft`` extension of its array-API
namespace. CuPy is imported only when a CuPy array is passed in.
"""

from __future__ import annotations

import array_api_compat

__all__ = ["fft_module", "namespace", "to_numpy"]


def namespace(*arrays):
    """The array-API namespace of the arrays (NumPy and CuPy through array_api_compat)."""
    return array_api_compat.array_namespace(*arrays)


def fft_module(x):
    """An FFT module with ``rfftn``/``irfftn``/``fftfreq`` suited to ``x``'s library."""
    if array_api_compat.is_numpy_array(x):
        import scipy.fft

        return scipy.fft
    if array_api_compat.is_cupy_array(x):
        import cupyx.scipy.fft

        return cupyx.scipy.fft
    return namespace(x).fft


def to_numpy(x):
    """A NumPy copy of a (small) array from any library, for host-side bookkeeping."""
    import numpy as np

    if array_api_compat.is_numpy_array(x):
        return x
    if array_api_compat.is_cupy_array(x):
        return x.get()
    return np.from_dlpack(x)
