"""Weight-folder operations for the entrypoints (they call the pipeline layer only)."""

from multitalk.models.tiny import default_tiny_dir, write_tiny_checkpoints
from multitalk.models.weights_check import check_folders

__all__ = ["check_folders", "default_tiny_dir", "write_tiny_checkpoints"]
