"""Installs what DreamArtist needs and the host lacks; the host runs this before it loads extensions.

Only missing (or too old) packages are installed, at pins verified against AUTOMATIC1111 v1.10's accelerate 0.21 /
transformers 4.30 (newer peft does not import there). Nothing else is upgraded or downgraded, and a start where
everything is present installs and prints nothing.
"""

from __future__ import annotations

from importlib import metadata

import launch
from packaging.version import Version

# package: (version to install, oldest version that works)
REQUIREMENTS = {
    "peft": ("0.13.2", "0.10.0"),  # 0.10.0 added per-row adapter batches (adapter_names), which routing needs
    "lpips": ("0.1.4", "0.1.4"),
}


def installed_version(package: str) -> str | None:
    if not launch.is_installed(package):
        return None
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "0"  # importable but without metadata: treat as unknown-old


def wanted(package: str) -> str | None:
    """The pin to install, or None when the installed version already works."""
    pin, oldest = REQUIREMENTS[package]
    version = installed_version(package)
    if version is not None and Version(version) >= Version(oldest):
        return None
    return pin


for name in REQUIREMENTS:
    pin = wanted(name)
    if pin is not None:
        launch.run_pip(f"install {name}=={pin}", f"{name}=={pin} for DreamArtist")
