"""Every `${moelab.*:}` resolver the configs use, registered on import: the sizes of the model
read from the data (moelab.models.sizes) and the names of runs. Light: no torch."""

from __future__ import annotations

from omegaconf import OmegaConf

from moelab.models import sizes  # noqa: F401 - registers ${moelab.image_classes:}, ${moelab.patch_size:}, ${moelab.vocab_size:}
from moelab.run.names import display_name, run_folder_suffix, run_version

OmegaConf.register_new_resolver("moelab.run_version", run_version, replace=True)
OmegaConf.register_new_resolver("moelab.run_name", display_name, replace=True)
OmegaConf.register_new_resolver("moelab.run_folder_suffix", run_folder_suffix, replace=True)
