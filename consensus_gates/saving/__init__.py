"""Files: save and load without pickle (safetensors + a validated JSON spec), torch.export.

`files` writes and reads model files, `spec` validates a file's spec, `pt2` checks a
``.pt2`` archive before torch.export loads it.
"""

from .files import export, load, read_spec, save

__all__ = ["export", "load", "read_spec", "save"]
