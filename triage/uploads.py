"""What an upload must be before anything is stored: decodable JPEG or PNG content within the limits,
a patient id safe in a URL and a file name, metadata in the bundle's vocabularies.

>>> checked_metadata(age="64", sex="Female", site="back")
LesionMetadata(age=64.0, sex='female', site='posterior torso')
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from metadata.formats import SEX_ALIASES
from metadata.schema import MAX_AGE, SEXES, SITE_ALIASES, SITES
from triage.errors import Invalid, TooLarge
from triage.schemas import PATIENT_ID_PATTERN, LesionMetadata

# what the CNN pipeline decodes, by the content's own signature (MPO: a camera's JPEG with a multi-picture marker)
IMAGE_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png"}
MAX_FILE_NAME = 255


@dataclass(frozen=True)
class UploadLimits:
    """Per-file bytes and pixels (a decompression bomb has few bytes and very many pixels), files per request."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 300


def checked_image(name: str, content: bytes, limits: UploadLimits) -> str:
    """The stored suffix of an uploaded image whose content is a decodable JPEG or PNG within the limits."""
    shown = _shown(name)
    if len(content) > limits.max_bytes:
        raise TooLarge(f"{shown}: more than the {limits.max_bytes} bytes allowed per image.")
    try:
        with Image.open(io.BytesIO(content)) as image:
            kind, (width, height) = image.format, image.size
            if width * height > limits.max_pixels:
                raise TooLarge(f"{shown}: {width} x {height} pixels, more than the {limits.max_pixels} allowed (a decompression bomb?).")
            if kind not in IMAGE_FORMATS:
                raise Invalid(f"{shown}: a {kind} image; upload JPEG or PNG.")
            image.load()  # a truncated or corrupt file fails here, not later inside the CNNs
    except (TooLarge, Invalid):
        raise
    except Image.DecompressionBombError as error:  # PIL's own guard, far above ours
        raise TooLarge(f"{shown}: far more pixels than an image of a lesion has.") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise Invalid(f"{shown}: not a readable JPEG or PNG image.") from error
    return IMAGE_FORMATS[kind]


def _shown(name: str) -> str:
    """A file name as an answer may repeat it: printable, bounded."""
    return repr("".join(c for c in name if c.isprintable())[:80])


def stored_file_name(name: str) -> str:
    return "".join(c for c in name if c.isprintable())[:MAX_FILE_NAME] or "image"


def checked_patient_id(patient_id: str) -> str:
    if not re.fullmatch(PATIENT_ID_PATTERN, patient_id):
        raise Invalid(f"patient id {_shown(patient_id)}: use 1-128 letters, digits, '.', '_' or '-'.")
    return patient_id


def _vocabulary_value(field: str, value: str | None, aliases: dict[str, str], allowed: tuple[str, ...]) -> str | None:
    if value is None or not value.strip():
        return None
    found = aliases.get(value.strip().lower(), aliases.get(value.strip()))
    if found is None:
        raise Invalid(f"{field}={_shown(value)} is not a known value; allowed: {list(allowed)} (or leave it empty).", list(allowed))
    return found


def checked_metadata(*, age: str | None = None, sex: str | None = None, site: str | None = None) -> LesionMetadata:
    """Age in years (0-120), sex and site in the bundle's vocabularies (the layouts' spellings accepted); empty means missing."""
    years = None
    if age is not None and str(age).strip():
        try:
            years = float(age)
        except ValueError as error:
            raise Invalid(f"age={_shown(str(age))} is not a number of years.") from error
        if not 0 <= years <= MAX_AGE:
            raise Invalid(f"age={_shown(str(age))} is outside 0-{MAX_AGE} years.")
    try:
        return LesionMetadata(age=years, sex=_vocabulary_value("sex", sex, SEX_ALIASES, SEXES), site=_vocabulary_value("site", site, SITE_ALIASES, SITES))
    except ValidationError as error:  # a value the vocabularies map but the schema does not know: a bug, not the user's
        raise RuntimeError(f"vocabulary and schema disagree: {error}") from error
