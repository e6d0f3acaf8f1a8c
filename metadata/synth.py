"""A synthetic dermoscopy cohort in the SIIM-ISIC 2020 or ISIC 2024 layout, where images and patients meet.

Generative model (patients and lesions from one seeded `numpy.random.Generator`; each image's
pixels from its own, seeded by the cohort seed and its index, so rendering runs on every core):

Patient
  - age ~ N(52, 16) clipped to [18, 88], published rounded to 5 years (like `age_approx`);
    sex 50/50 with 3% missing.
  - a personal *nevus look*: a colour (brown, lightness spread widely between patients), a lesion
    radius (0.13 to 0.26 of the image) and a texture strength. Benign lesions of one patient look
    alike; between patients they differ a lot, so absolute colour and size say little on their own.
  - a patient risk effect ~ N(0, 0.4) and 2 + Poisson(4) lesions (at most 14); in the ISIC 2024
    layout a heavy-tailed count instead (1 + lognormal; median up to 150, some patients with thousands).

Lesion
  - anatomic site from ISIC-like frequencies, 5% missing.
  - melanoma with probability sigmoid(b0 + 1.4 (age - 50)/15 + site effect + patient risk):
    age and site shift the prior (the **metadata** signal); b0 = -3.2, or solved for `prevalence`.
  - a melanoma is drawn (a) with more border irregularity and colour variegation than a nevus
    (the **image-only** signal; 50% of melanomas are subtle, 20% of nevi are atypical), and (b) as
    an outlier from its patient's own look: 1.35-1.8x the patient's nevus radius and a colour shifted by 30-50 levels
    away from the patient's (the **patient-context** "ugly duckling" signal, visible only relative to
    the patient's other lesions).

Images are RGB JPEGs of a skin background with one lesion, a few pale freckles and dark hairs, the lesion
placed, stretched and lit differently in each photograph (so that unrelated photographs do not collide
in perceptual hash: 3 cross-patient pairs within 2 bits among 30,000 images at 64 px); train and
test patients are disjoint.
`colour_cast` multiplies every pixel's R, G, B (another camera or light source). The ISIC 2024
layout adds `tbp_lv_*` measurements that carry part of the signal (`tbp_features`).
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from errors import OptionError
from rundir.io import atomic_write

# The SIIM-ISIC 2020 site vocabulary, with ISIC-like frequencies and melanoma log-odds shifts.
SYNTH_SITES = ("head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital")
SITE_FREQUENCY = np.array([0.12, 0.15, 0.22, 0.45, 0.03, 0.03])
SITE_LOGIT_EFFECT = np.array([1.0, -0.3, 0.0, 0.3, -0.9, -0.9])
BASE_LOGIT = -3.2


LAYOUTS = ("isic2020", "isic2024")
LAYOUT_PREVALENCE = {"isic2024": 0.001}  # ISIC 2024: 393 melanomas in 401,059 lesions
PARALLEL_ABOVE = 4000  # lesions: smaller cohorts render in this process (no worker start-up)
CHUNK = 2000  # lesions rendered per worker task


@dataclass(frozen=True)
class SynthConfig:
    """Size, layout and seed of a synthetic cohort.

    `patients` (train + test) sets the size, unless `images` (training images) does. `prevalence`
    sets the expected melanoma share by shifting the base log-odds (None: the layout's own, about 9%
    in the SIIM-ISIC 2020 layout's default model, 0.1% in the ISIC 2024 layout, as in the real set).
    """

    patients: int = 200
    image_size: int = 64
    seed: int = 0
    test_fraction: float = 0.2
    # Per-channel gain on every pixel (R, G, B): another camera's colour balance or lighting, for
    # testing what a batch from another clinic does (1, 1, 1: none).
    colour_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "isic2020"
    images: int | None = None
    prevalence: float | None = None
    workers: int | None = None  # processes for rendering (None: every core)


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


HAIR_COLOUR = np.array([55.0, 42.0, 35.0])


def _draw_hairs(image: np.ndarray, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark, slightly curved hairs across the photograph (Poisson(2) of them), as in real dermoscopy:
    an artefact the CNN must learn to ignore, and the detail that keeps unrelated photographs apart in
    perceptual hash."""
    for _ in range(rng.poisson(2.0)):
        (y0, x0), angle = rng.uniform(-1, 1, 2), rng.uniform(0, np.pi)
        along = (xx - x0) * np.cos(angle) + (yy - y0) * np.sin(angle)
        across = -(xx - x0) * np.sin(angle) + (yy - y0) * np.cos(angle) - rng.normal(0, 0.3) * along**2
        hair = np.exp(-((across / rng.uniform(0.012, 0.03)) ** 2))[..., None] * rng.uniform(0.5, 0.9)
        image = image * (1 - hair) + HAIR_COLOUR * hair
    return image


def _draw_freckles(image: np.ndarray, xx: np.ndarray, yy: np.ndarray, colour: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Small pale spots of the lesion's pigment scattered on the skin (Poisson(1.5) of them)."""
    for _ in range(rng.poisson(1.5)):
        (y0, x0), radius = rng.uniform(-0.95, 0.95, 2), rng.uniform(0.03, 0.08)
        spot = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * radius**2))[..., None] * rng.uniform(0.3, 0.7)
        image = image * (1 - spot) + colour * spot
    return image


def render_lesion(look: LesionLook, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one lesion as a uint8 HxWx3 array."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    # Position, elongation and orientation vary per photograph, and so does the light falling across
    # the skin: without them the perceptual hashes of different patients' lesions collide (`folds`
    # would chain them into one duplicate group).
    cy, cx = rng.normal(0, 0.22, 2)
    angle, stretch = rng.uniform(0, np.pi), rng.uniform(1.0, 1.5)
    along = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / stretch
    across = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) * np.sqrt(stretch)
    theta = np.arctan2(across, along)
    rr = np.hypot(across, along)
    border = np.ones_like(theta)
    for k in range(2, 8):
        border += look.irregularity * rng.normal() / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = 2 * look.radius * border  # image spans [-1, 1], radius is a fraction of the width
    mask = 1.0 / (1.0 + np.exp(-(radius - rr) / 0.025))
    texture = _smooth_noise(rng, size, 6) * 25 * look.texture + _smooth_noise(rng, size, 3) * 30
    lesion = look.colour[None, None, :] + texture[..., None]
    if look.variegation > 0:
        by, bx = rng.normal(0, 0.5 * look.radius * 2, 2)
        blob = np.exp(-(((yy - cy - by) ** 2 + (xx - cx - bx) ** 2) / (2 * (look.radius * 0.9) ** 2)))
        blue_grey = np.array([70.0, 65.0, 95.0])
        weight = (look.variegation * blob)[..., None]
        lesion = lesion * (1 - weight) + blue_grey * weight
    light = rng.uniform(0, 2 * np.pi)
    gradient = (xx * np.cos(light) + yy * np.sin(light)) * rng.uniform(8, 30)
    skin = look.skin[None, None, :] + (_smooth_noise(rng, size, 5) * 24 + _smooth_noise(rng, size, 3) * 30 + gradient)[..., None]
    image = skin * (1 - mask[..., None]) + lesion * mask[..., None]
    image = _draw_freckles(image, xx, yy, look.colour, rng=rng)
    image = _draw_hairs(image, xx, yy, rng)
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _lesion_counts(config: SynthConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """Lesions per patient: 2 + Poisson(4) (at most 14) in the 2020 layout; heavy-tailed in the 2024 one
    (1 + lognormal, median up to 150, a few patients with thousands, as in the real set)."""
    if config.layout == "isic2020":
        return np.minimum(2 + rng.poisson(4, n), 14)
    median = float(np.clip((config.images or 200 * config.patients) / 200, 2, 150))
    return 1 + np.floor(rng.lognormal(np.log(median), 1.0, n)).astype(int)


def _patient_table(config: SynthConfig, rng: np.random.Generator) -> pd.DataFrame:
    if config.images is None:
        n = config.patients
        counts = _lesion_counts(config, rng, n)
        test = np.zeros(n, bool)
        test[rng.permutation(n)[: int(round(n * config.test_fraction))]] = True
    else:  # patients until the training images number `images`, then a test share of patients on top
        draws = _lesion_counts(config, rng, config.images)
        n_train = int(np.searchsorted(np.cumsum(draws), config.images) + 1)
        train_counts = draws[:n_train].copy()
        train_counts[-1] -= int(train_counts.sum() - config.images)
        n_test = int(round(n_train * config.test_fraction / (1 - config.test_fraction)))
        counts = np.concatenate([train_counts, _lesion_counts(config, rng, n_test)])
        n = n_train + n_test
        test = np.arange(n) >= n_train
    lightness = rng.uniform(0.35, 1.0, n)
    tint = rng.normal(0, 12, (n, 3))
    colours = np.array([165.0, 110.0, 75.0])[None, :] * lightness[:, None] + tint
    sex = rng.choice(np.array(["male", "female"], dtype=object), n)
    sex[rng.random(n) < 0.03] = None
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
            "n_lesions": counts,
        }
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _base_logit(logit_without_base: np.ndarray, prevalence: float | None) -> float:
    """The base log-odds giving the wanted expected prevalence (bisection; the default without one)."""
    if prevalence is None:
        return BASE_LOGIT
    if not 0 < prevalence < 1:
        raise OptionError(f"--prevalence {prevalence}: give a share between 0 and 1 (exclusive), e.g. 0.001.")
    low, high = -30.0, 30.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _sigmoid(logit_without_base + middle).mean() < prevalence else (low, middle)
    return (low + high) / 2


def draw_lesions(config: SynthConfig, rng: np.random.Generator) -> pd.DataFrame:
    """One row per lesion: patient, metadata, melanoma label and the look the renderer draws.

    Benign lesions follow the patient's look; melanomas are irregular outliers from it (see the module doc).
    """
    patients = _patient_table(config, rng)
    owner = np.repeat(np.arange(len(patients)), patients["n_lesions"].to_numpy())
    p = patients.iloc[owner].reset_index(drop=True)
    n = len(p)
    site_index = rng.choice(len(SYNTH_SITES), size=n, p=SITE_FREQUENCY)
    logit = 1.4 * (p["age"].to_numpy() - 50) / 15 + SITE_LOGIT_EFFECT[site_index] + p["risk"].to_numpy()
    prevalence = config.prevalence if config.prevalence is not None else LAYOUT_PREVALENCE.get(config.layout)
    melanoma = rng.random(n) < _sigmoid(logit + _base_logit(logit, prevalence))
    colour, skin, radius = np.stack(p["colour"]), np.stack(p["skin"]), p["radius"].to_numpy()
    direction = rng.normal(0, 1, (n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    subtle, atypical = rng.random(n) < 0.5, rng.random(n) < 0.2
    melanoma_look = {
        "radius": radius * rng.uniform(1.35, 1.8, n),
        "colour": colour + direction * rng.uniform(30, 50, (n, 1)) - 15,
        "irregularity": np.where(subtle, 0.04, rng.uniform(0.07, 0.16, n)),
        "variegation": np.where(subtle, 0.0, rng.uniform(0.2, 0.6, n)),
    }
    benign_look = {
        "radius": radius * np.exp(rng.normal(0, 0.07, n)),
        "colour": colour + rng.normal(0, 6, (n, 3)),
        "irregularity": np.where(atypical, rng.uniform(0.07, 0.15, n), np.abs(rng.normal(0, 0.04, n))),
        "variegation": np.where(atypical, rng.uniform(0.15, 0.45, n), 0.0),
    }
    look = {k: np.where(melanoma[:, None] if k == "colour" else melanoma, melanoma_look[k], benign_look[k]) for k in melanoma_look}
    site = np.array(SYNTH_SITES, dtype=object)[site_index]
    site[rng.random(n) < 0.05] = None
    return pd.DataFrame(
        {
            "image_name": [f"ISIC_{config.seed:03d}{i:06d}" for i in range(n)],
            "patient_id": p["patient_id"],
            "split": p["split"],
            "sex": p["sex"],
            "age_approx": 5 * np.round(p["age"].to_numpy() / 5),
            "anatom_site_general_challenge": site,
            "target": melanoma.astype(int),
            "radius": look["radius"],
            "colour": list(look["colour"]),
            "irregularity": look["irregularity"],
            "variegation": look["variegation"],
            "texture": p["texture"].to_numpy(),
            "skin": list(skin),
        }
    )


def tbp_features(lesions: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """ISIC 2024-style `tbp_lv_*` measurements of each lesion, noisy functions of its look.

    Area, border irregularity, colour spread and lesion-skin contrast carry part of the melanoma
    signal (melanomas are larger, more irregular and variegated outliers); eccentricity carries none.
    """
    n = len(lesions)
    colour, skin = np.stack(lesions["colour"]), np.stack(lesions["skin"])
    return pd.DataFrame(
        {
            "tbp_lv_areaMM2": np.pi * (lesions["radius"].to_numpy() * 10) ** 2 * rng.lognormal(0, 0.15, n),
            "tbp_lv_norm_border": lesions["irregularity"].to_numpy() * 60 + rng.normal(0, 1.0, n),
            "tbp_lv_color_std_mean": lesions["variegation"].to_numpy() * 8 + lesions["texture"].to_numpy() * 2 + rng.normal(0, 0.5, n),
            "tbp_lv_deltaLBnorm": np.abs(colour.mean(axis=1) - skin.mean(axis=1)) / 10 + rng.normal(0, 0.5, n),
            "tbp_lv_eccentricity": rng.uniform(0.2, 0.9, n),
        },
        index=lesions.index,
    )


def render_jpegs(lesions: pd.DataFrame, image_size: int, *, seed: int, colour_cast: tuple[float, float, float], start: int = 0) -> list[bytes]:
    """JPEG bytes of each lesion; lesion i's pixels are drawn from its own seeded generator, so the
    images do not depend on how the cohort is split between workers."""
    out = []
    for offset, row in enumerate(lesions.itertuples(index=False)):
        rng = np.random.default_rng([seed, 1, start + offset])
        look = LesionLook(row.radius, row.colour, row.irregularity, row.variegation, row.texture, row.skin)
        image = render_lesion(look, image_size, rng)
        if colour_cast != (1.0, 1.0, 1.0):
            image = np.clip(image * np.asarray(colour_cast), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=92)
        out.append(buffer.getvalue())
    return out


def _render_task(task: tuple[pd.DataFrame, int, int, tuple[float, float, float], int]) -> list[bytes]:
    lesions, image_size, seed, colour_cast, start = task
    return render_jpegs(lesions, image_size, seed=seed, colour_cast=colour_cast, start=start)


def rendered_images(lesions: pd.DataFrame, config: SynthConfig) -> Iterator[tuple[int, list[bytes]]]:
    """(first lesion index, JPEG bytes) per chunk, rendered on every core for large cohorts."""
    look = lesions[["radius", "colour", "irregularity", "variegation", "texture", "skin"]]
    tasks = [(look.iloc[i : i + CHUNK], config.image_size, config.seed, config.colour_cast, i) for i in range(0, len(look), CHUNK)]
    if len(lesions) <= PARALLEL_ABOVE or config.workers == 1:
        yield from ((task[-1], _render_task(task)) for task in tasks)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once TensorFlow's threads exist
    with ProcessPoolExecutor(max_workers=config.workers or os.cpu_count(), mp_context=context) as pool:
        yield from zip((task[-1] for task in tasks), pool.map(_render_task, tasks))


def generate_cohort(out: Path, config: SynthConfig = SynthConfig(), advance: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Write the cohort under `out` in `config.layout`; return every lesion with its label.

    isic2020: train.csv, test.csv and jpeg/{train,test}/*.jpg. isic2024: train-metadata.csv,
    test-metadata.csv (`isic_id`, `patient_id`, `age_approx`, `sex`, `anatom_site_general`, `target`
    in train, and the `tbp_lv_*` columns of `tbp_features`), train-image.hdf5 and test-image.hdf5
    (JPEG bytes by `isic_id`). Cohorts above 4,000 lesions render in spawned worker processes: a
    script that calls this needs the usual `if __name__ == "__main__":` guard (the CLI and notebooks do not).
    `advance(n, total)` is called as each chunk of `n` of the `total` images is written (a progress bar's hook).
    """
    if config.layout not in LAYOUTS:
        raise OptionError(f"--layout {config.layout!r}: choose one of {LAYOUTS}.")
    rng = np.random.default_rng(config.seed)
    lesions = draw_lesions(config, rng)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = lesions["split"].to_numpy()
    with ExitStack() as stack:
        if config.layout == "isic2024":
            hdf5 = {s: stack.enter_context(h5py.File(out / f".{s}-image.hdf5.tmp", "w")) for s in ("train", "test")}
        else:
            for s in ("train", "test"):
                (out / "jpeg" / s).mkdir(parents=True, exist_ok=True)
        for start, images in rendered_images(lesions, config):
            for i, encoded in enumerate(images, start):
                name = lesions["image_name"].iat[i]
                if config.layout == "isic2024":
                    hdf5[split[i]][name] = np.void(encoded)
                else:
                    (out / "jpeg" / split[i] / f"{name}.jpg").write_bytes(encoded)
            if advance is not None:
                advance(len(images), len(lesions))
    if config.layout == "isic2024":
        for s in ("train", "test"):
            os.replace(out / f".{s}-image.hdf5.tmp", out / f"{s}-image.hdf5")
    labels = lesions.assign(
        diagnosis=np.where(lesions["target"] == 1, "melanoma", "nevus"),
        benign_malignant=np.where(lesions["target"] == 1, "malignant", "benign"),
    )
    _write_tables(out, labels, config, rng)
    return labels


def _write_tables(out: Path, labels: pd.DataFrame, config: SynthConfig, rng: np.random.Generator) -> None:
    """The layout's metadata tables (written last: a folder with them is a finished cohort)."""
    train = labels["split"] == "train"
    if config.layout == "isic2024":
        table = pd.concat([labels, tbp_features(labels, rng)], axis=1).rename(
            columns={"image_name": "isic_id", "anatom_site_general_challenge": "anatom_site_general"}
        )
        public = ["isic_id", "patient_id", "age_approx", "sex", "anatom_site_general", *[c for c in table if c.startswith("tbp_")]]
        files = {"train-metadata.csv": table.loc[train, [*public[:5], "target", *public[5:]]], "test-metadata.csv": table.loc[~train, public]}
    else:
        public = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge"]
        files = {"train.csv": labels.loc[train, [*public, "diagnosis", "benign_malignant", "target"]], "test.csv": labels.loc[~train, public]}
    for name, frame in files.items():
        atomic_write(out / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
