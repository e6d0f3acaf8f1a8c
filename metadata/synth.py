"""A synthetic dermoscopy cohort in the SIIM-ISIC 2020 layout, where images and patients meet.

Generative model (all draws from one seeded `numpy.random.Generator`):

Patient
  - age ~ N(52, 16) clipped to [18, 88], published rounded to 5 years (like `age_approx`);
    sex 50/50 with 3% missing.
  - a personal *nevus look*: a colour (brown, lightness spread widely between patients), a lesion
    radius (0.13 to 0.26 of the image) and a texture strength. Benign lesions of one patient look
    alike; between patients they differ a lot, so absolute colour and size say little on their own.
  - a patient risk effect ~ N(0, 0.4) and 2 + Poisson(4) lesions (at most 14).

Lesion
  - anatomic site from ISIC-like frequencies, 5% missing.
  - melanoma with probability sigmoid(b0 + 1.4 (age - 50)/15 + site effect + patient risk):
    age and site shift the prior (the **metadata** signal).
  - a melanoma is drawn (a) with more border irregularity and colour variegation than a nevus
    (the **image-only** signal; 50% of melanomas are subtle, 20% of nevi are atypical), and (b) as
    an outlier from its patient's own look: 1.35-1.8x the patient's nevus radius and a colour shifted by 30-50 levels
    away from the patient's (the **patient-context** "ugly duckling" signal, visible only relative to
    the patient's other lesions).

Images are RGB JPEGs of a skin background with one lesion; train and test patients are disjoint.
`colour_cast` multiplies every pixel's R, G, B (another camera or light source).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from rich.progress import Progress

from metadata.io import atomic_write

# The SIIM-ISIC 2020 site vocabulary, with ISIC-like frequencies and melanoma log-odds shifts.
SYNTH_SITES = ("head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital")
SITE_FREQUENCY = np.array([0.12, 0.15, 0.22, 0.45, 0.03, 0.03])
SITE_LOGIT_EFFECT = np.array([1.0, -0.3, 0.0, 0.3, -0.9, -0.9])
BASE_LOGIT = -3.2


@dataclass(frozen=True)
class SynthConfig:
    """Size and seed of a synthetic cohort."""

    patients: int = 200
    image_size: int = 64
    seed: int = 0
    test_fraction: float = 0.2
    # Per-channel gain on every pixel (R, G, B): another camera's colour balance or lighting, for
    # testing what a batch from another clinic does (1, 1, 1: none).
    colour_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class LesionLook:
    """Everything the renderer needs to draw one lesion."""

    radius: float
    colour: np.ndarray
    irregularity: float
    variegation: float
    texture: float
    skin: np.ndarray


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(image)


def render_lesion(look: LesionLook, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one lesion as a uint8 HxWx3 array."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    cy, cx = rng.normal(0, 0.06, 2)
    theta = np.arctan2(yy - cy, xx - cx)
    rr = np.hypot(yy - cy, xx - cx)
    border = np.ones_like(theta)
    for k in range(2, 8):
        border += look.irregularity * rng.normal() / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = 2 * look.radius * border  # image spans [-1, 1], radius is a fraction of the width
    mask = 1.0 / (1.0 + np.exp(-(radius - rr) / 0.025))
    texture = _smooth_noise(rng, size, 6) * 25 * look.texture
    lesion = look.colour[None, None, :] + texture[..., None]
    if look.variegation > 0:
        by, bx = rng.normal(0, 0.5 * look.radius * 2, 2)
        blob = np.exp(-(((yy - cy - by) ** 2 + (xx - cx - bx) ** 2) / (2 * (look.radius * 0.9) ** 2)))
        blue_grey = np.array([70.0, 65.0, 95.0])
        weight = (look.variegation * blob)[..., None]
        lesion = lesion * (1 - weight) + blue_grey * weight
    skin = look.skin[None, None, :] + _smooth_noise(rng, size, 4)[..., None] * 6
    image = skin * (1 - mask[..., None]) + lesion * mask[..., None]
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _patient_table(config: SynthConfig, rng: np.random.Generator) -> pd.DataFrame:
    n = config.patients
    lightness = rng.uniform(0.35, 1.0, n)
    tint = rng.normal(0, 12, (n, 3))
    colours = np.array([165.0, 110.0, 75.0])[None, :] * lightness[:, None] + tint
    sex = rng.choice(np.array(["male", "female"], dtype=object), n)
    sex[rng.random(n) < 0.03] = None
    test = np.zeros(n, bool)
    test[rng.permutation(n)[: int(round(n * config.test_fraction))]] = True
    return pd.DataFrame(
        {
            "patient_id": [f"IP_{config.seed:03d}{i:05d}" for i in range(n)],
            "split": np.where(test, "test", "train"),
            "age": np.clip(rng.normal(52, 16, n), 18, 88),
            "sex": sex,
            "risk": rng.normal(0, 0.4, n),
            "radius": rng.uniform(0.13, 0.26, n),
            "colour": list(colours),
            "texture": rng.uniform(0.2, 1.0, n),
            "skin": list(np.array([225.0, 185.0, 160.0]) * rng.uniform(0.8, 1.05, (n, 1))),
            "n_lesions": np.minimum(2 + rng.poisson(4, n), 14),
        }
    )


def _lesion_look(patient: pd.Series, melanoma: bool, rng: np.random.Generator) -> LesionLook:
    """Benign lesions follow the patient's look; melanomas are irregular outliers from it."""
    if melanoma:
        subtle = rng.random() < 0.5
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        return LesionLook(
            radius=patient["radius"] * rng.uniform(1.35, 1.8),
            colour=patient["colour"] + direction * rng.uniform(30, 50) - 15,
            irregularity=0.04 if subtle else rng.uniform(0.07, 0.16),
            variegation=0.0 if subtle else rng.uniform(0.2, 0.6),
            texture=patient["texture"],
            skin=patient["skin"],
        )
    atypical = rng.random() < 0.2
    return LesionLook(
        radius=patient["radius"] * float(np.exp(rng.normal(0, 0.07))),
        colour=patient["colour"] + rng.normal(0, 6, 3),
        irregularity=rng.uniform(0.07, 0.15) if atypical else abs(rng.normal(0, 0.04)),
        variegation=rng.uniform(0.15, 0.45) if atypical else 0.0,
        texture=patient["texture"],
        skin=patient["skin"],
    )


def generate_cohort(out: Path, config: SynthConfig = SynthConfig()) -> pd.DataFrame:
    """Write train.csv, test.csv and jpeg/{train,test}/*.jpg under `out`; return all rows with truth."""
    rng = np.random.default_rng(config.seed)
    patients = _patient_table(config, rng)
    out = Path(out)
    for split in ("train", "test"):
        (out / "jpeg" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("synth: drawing lesions", total=int(patients["n_lesions"].sum()))
        for _, patient in patients.iterrows():
            for _ in range(int(patient["n_lesions"])):
                site_index = int(rng.choice(len(SYNTH_SITES), p=SITE_FREQUENCY))
                logit = BASE_LOGIT + 1.4 * (patient["age"] - 50) / 15 + SITE_LOGIT_EFFECT[site_index]
                melanoma = bool(rng.random() < 1 / (1 + np.exp(-(logit + patient["risk"]))))
                look = _lesion_look(patient, melanoma, rng)
                image = render_lesion(look, config.image_size, rng)
                if config.colour_cast != (1.0, 1.0, 1.0):
                    image = np.clip(image * np.asarray(config.colour_cast), 0, 255).astype(np.uint8)
                name = f"ISIC_{config.seed:03d}{len(rows):06d}"
                Image.fromarray(image).save(out / "jpeg" / patient["split"] / f"{name}.jpg", quality=92)
                rows.append(
                    {
                        "image_name": name,
                        "patient_id": patient["patient_id"],
                        "sex": patient["sex"],
                        "age_approx": float(5 * np.round(patient["age"] / 5)),
                        "anatom_site_general_challenge": None if rng.random() < 0.05 else SYNTH_SITES[site_index],
                        "diagnosis": "melanoma" if melanoma else "nevus",
                        "benign_malignant": "malignant" if melanoma else "benign",
                        "target": int(melanoma),
                        "split": patient["split"],
                    }
                )
                progress.advance(task)
    cohort = pd.DataFrame(rows)
    label_columns = ["diagnosis", "benign_malignant", "target"]
    public_columns = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge"]
    train = cohort[cohort["split"] == "train"][public_columns + label_columns]
    test = cohort[cohort["split"] == "test"][public_columns]
    atomic_write(out / "train.csv", lambda tmp: train.to_csv(tmp, index=False))
    atomic_write(out / "test.csv", lambda tmp: test.to_csv(tmp, index=False))
    return cohort
