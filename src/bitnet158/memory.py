"""How much memory this machine can still give (to check a large allocation before making it)."""

from __future__ import annotations


def available_memory() -> int | None:
    """Bytes the kernel reports as available (Linux's MemAvailable: free plus reclaimable cache),
    or None where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
