"""Rotary position tables in numpy (float64 angles, rounded once to float32): the torch model and
the torch-free runtime take the same tables from here, so both rotate by the same floats."""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def rope_arrays(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [max_seq_len, head_dim] in the rotate_half layout (halves repeat)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if config.rope_scaling == "llama3":
        inv_freq = llama3_frequencies(inv_freq, config)
    angles = np.outer(np.arange(config.max_seq_len, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def llama3_frequencies(inv_freq: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Llama 3.1's RoPE rescaling: wavelengths longer than original_context / low_freq_factor are
    stretched by `factor`, those shorter than original_context / high_freq_factor kept, and the
    band between blends the two linearly in original_context / wavelength."""
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    context = config.rope_original_context
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    smoothed = (1 - blend) * scaled / factor + blend * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, smoothed, scaled)
