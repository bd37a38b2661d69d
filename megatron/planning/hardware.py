"""Hardware profiles: peak FLOP/s, memory, bandwidths and node size of a GPU type.

The profiles ship with the package (``megatron/planning/hardware.yaml``, each
number with its source); ``get_profile`` takes a profile's name
(case-insensitive) or the path of a YAML file of one's own in the same format.
"""
import difflib
import os
from dataclasses import dataclass, field

import yaml

from megatron.errors import UserError

PROFILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hardware.yaml")
_FIELDS = ("peak_flops", "memory_bytes", "memory_bandwidth", "intra_node_bandwidth",
           "inter_node_bandwidth", "gpus_per_node")


class HardwareError(UserError, ValueError):
    """An unknown profile, an unreadable profile file, or a precision the GPU lacks."""


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU type in its usual server. Bandwidths in bytes/s per direction: intra-node per
    GPU (NVLink / NVSwitch), inter-node per node (all its network adapters together)."""
    name: str
    peak_flops: dict
    memory_bytes: float
    memory_bandwidth: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    gpus_per_node: int
    description: str = ""
    sources: dict = field(default_factory=dict)

    def peak(self, precision):
        """Dense peak FLOP/s of the GPU's matrix units in ``precision``."""
        value = self.peak_flops.get(precision)
        if not value:
            have = ", ".join(sorted(self.peak_flops))
            raise HardwareError(f"hardware {self.name} has no {precision} peak (it has: {have})")
        return float(value)

    def inter_node_bandwidth_per_gpu(self, gpus_per_node=None):
        """Each GPU's share of its node's network bandwidth when all of them communicate."""
        return self.inter_node_bandwidth / (gpus_per_node or self.gpus_per_node)


def _read(path):
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise HardwareError(f"cannot read hardware profiles {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise HardwareError(f"hardware profiles {path} are not valid YAML: "
                            f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise HardwareError(f"hardware profiles {path} must map names to profiles")
    return data


def _profile(name, entry, path):
    missing = [k for k in _FIELDS if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise HardwareError(f"hardware profile {name} in {path} lacks {', '.join(missing)}")
    return HardwareProfile(
        name=name, peak_flops={k: float(v) for k, v in entry["peak_flops"].items() if v},
        memory_bytes=float(entry["memory_bytes"]), memory_bandwidth=float(entry["memory_bandwidth"]),
        intra_node_bandwidth=float(entry["intra_node_bandwidth"]),
        inter_node_bandwidth=float(entry["inter_node_bandwidth"]),
        gpus_per_node=int(entry["gpus_per_node"]), description=entry.get("description", ""),
        sources=entry.get("sources", {}))


def load_profiles(path=PROFILES_FILE):
    """Every profile of a YAML file, by name."""
    return {str(name): _profile(str(name), entry, path) for name, entry in _read(path).items()}


def profile_names():
    """Names of the profiles that ship with the package."""
    return list(load_profiles())


def get_profile(name):
    """The shipped profile called ``name`` (any case), or the only / first profile of the
    YAML file at path ``name``."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        profiles = load_profiles(name)
        if not profiles:
            raise HardwareError(f"hardware profiles {name} hold no profile")
        return next(iter(profiles.values()))
    profiles = load_profiles()
    by_lower = {k.lower(): v for k, v in profiles.items()}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    close = difflib.get_close_matches(name, list(profiles), n=1, cutoff=0.4)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise HardwareError(f"unknown hardware {name!r}{hint}; known: {', '.join(profiles)} "
                        f"or a profiles .yaml file")
