"""Profiling: measure each member's memory and kernel footprint per batch size and backend."""

from __future__ import annotations

from colocate.profiling.cache import ProfileCache, model_hash
from colocate.profiling.profiler import (
    ProfileSettings,
    compile_seconds,
    profile,
    profile_isolated,
    profile_variants,
)
from colocate.profiling.types import (
    CpuFootprint,
    EnergyFootprint,
    KernelFootprint,
    MemoryFootprint,
    Profile,
    ProfileSet,
    VariantProfiles,
)

__all__ = [
    "CpuFootprint",
    "EnergyFootprint",
    "KernelFootprint",
    "MemoryFootprint",
    "Profile",
    "ProfileCache",
    "ProfileSet",
    "ProfileSettings",
    "VariantProfiles",
    "compile_seconds",
    "model_hash",
    "profile",
    "profile_isolated",
    "profile_variants",
]
