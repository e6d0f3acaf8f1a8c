"""A data folder named on the command line with its layout and metadata: `DIR` or `DIR,format=NAME,metadata=CSV`.

What a repeatable option that names several datasets takes (`folds --extra-data`, `pretrain --data`),
each in its own layout.

>>> DataSource.parse("../shared/data/isic9,format=class-folders")
DataSource(data=PosixPath('../shared/data/isic9'), format='class-folders', metadata=None)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from errors import OptionError
from metadata.dataset import LoadedDataset, load_dataset

SPEC_KEYS = ("format", "metadata")


@dataclass(frozen=True)
class DataSource:
    """One dataset: its folder, layout (None: detected) and metadata CSV (class folders)."""

    data: Path
    format: str | None = None
    metadata: Path | None = None

    @classmethod
    def parse(cls, spec: str, *, option: str = "--extra-data") -> DataSource:
        """`DIR` or `DIR,format=NAME,metadata=CSV`; `option` names the flag in an error."""
        folder, *options = spec.split(",")
        values = {}
        for item in options:
            key, equals, value = item.partition("=")
            if not equals or key.strip() not in SPEC_KEYS or not value.strip():
                raise OptionError(f"{option} {spec!r}: give DIR or DIR,format=NAME,metadata=CSV (keys: {', '.join(SPEC_KEYS)}).")
            values[key.strip()] = value.strip()
        return cls(Path(folder.strip()), values.get("format"), Path(values["metadata"]) if "metadata" in values else None)

    def load(self) -> LoadedDataset:
        return load_dataset(self.data, self.format, self.metadata)

    def to_json(self) -> dict[str, str | None]:
        return {"data": str(self.data), "format": self.format, "metadata": None if self.metadata is None else str(self.metadata)}
