"""The only code that touches HDF5: the dump layout, its writer and its reader."""

from alignkit.storage.reader import Call, Dump, open_dump
from alignkit.storage.schema import FORMAT_NAME, FORMAT_VERSION

__all__ = ["Call", "Dump", "open_dump", "FORMAT_NAME", "FORMAT_VERSION"]
