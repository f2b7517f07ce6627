"""drift's one memory policy, for the API and the CLI alike.

drift makes and drops many buffers of a few to a few tens of MiB (layer forms, cost blocks,
aligned copies); glibc keeps such freed chunks in its heap, so without care a process's
resident size only grows. Two measures, both glibc-only (elsewhere they do nothing):
:func:`release_memory` between comparisons, and, for large layers, :func:`map_large_buffers`
once per analysis (:func:`for_layers` decides). Measured figures: benchmarks/results/.
"""

from __future__ import annotations

_LIBC = None



def _libc():
    """glibc through ctypes, or ``False`` where there is none (then the memory helpers do nothing)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC



def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    drift makes and drops many buffers of a few to a few tens of MiB; glibc keeps such freed
    chunks in the heap, so without this the process's resident size only grows (by how much:
    benchmarks/results/memory_notes.md). Called between comparisons, not per tensor: a fixed
    low mmap threshold does the same per buffer and costs more in page faults.
    """
    if _libc():
        _libc().malloc_trim(0)



def map_large_buffers(threshold: int = 4 << 20) -> None:
    """Have glibc map (and unmap on free) every buffer of ``threshold`` bytes or more.

    Process-wide, so only the CLI does it, and only for large layers: with layers of hundreds
    of MB a comparison makes and drops many buffers of 5-40 MB, which glibc's default keeps in
    the heap, where they add to the peak. Mapping them lowers the peak of large layers at no
    cost in time, while for small layers the extra page faults make it slower, hence the
    threshold (figures: benchmarks/results/memory_notes.md). Linux/glibc only; elsewhere
    nothing happens.
    """
    if _libc():
        _libc().mallopt(-3, threshold)  # M_MMAP_THRESHOLD



LARGE_LAYER_BYTES = 256 << 20
"""From this layer size on (a Qwen3-4B layer is above it, a Qwen3-0.6B one far below), analyses
map large buffers."""


def layer_bytes(sym, itemsize: int = 4) -> int:
    """Bytes of one layer's weight matrices at ``itemsize`` bytes per entry."""
    attn = (2 * sym.n_heads + 2 * sym.n_kv_heads) * sym.d_head * sym.d_model
    mlp = (3 if sym.is_glu else 2) * sym.d_ff * sym.d_model
    return (attn + mlp) * itemsize


def for_layers(sym, itemsize: int = 4) -> None:
    """Apply the policy for an analysis of layers of shape ``sym``: large layers (at least
    :data:`LARGE_LAYER_BYTES`) get their large buffers mapped (process-wide, and kept)."""
    if layer_bytes(sym, itemsize) >= LARGE_LAYER_BYTES:
        map_large_buffers()
