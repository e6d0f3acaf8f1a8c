"""Dermoscopy feature families on a lesion mask: shape and asymmetry, colour, texture (scikit-image).

Each family maps one decoded image (uint8 RGB) and its lesion mask to a fixed set of named numbers;
`FEATURE_FAMILIES` is the registry the `features` stage, the stack and `predict` read, so adding a
family is adding one entry. An image without a usable lesion mask (a blank or saturated image) gets
NaN features: LightGBM treats them as missing instead of inventing a lesion.

>>> image = np.full((64, 64, 3), 200, np.uint8)
>>> rr, cc = draw.disk((32, 32), 14)
>>> image[rr, cc] = (90, 50, 30)
>>> bool(lesion_mask(image)[32, 32]), bool(lesion_mask(image)[2, 2])
(True, False)
>>> features = image_features(image, ("shape",))
>>> round(features["shape_asymmetry_major"], 2), round(features["shape_solidity"], 2)
(0.0, 0.97)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
from scipy import ndimage
from skimage import color, draw, feature, filters, measure, morphology, transform

from errors import OptionError

# The six dermoscopic colours of the ABCD rule and the 7-point checklist, as sRGB in [0, 1]
# (reference values of Kasmi & Mokrani 2016); each lesion pixel counts for the nearest one in L*a*b*.
DERMOSCOPIC_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "red": (0.8, 0.2, 0.2),
    "light_brown": (0.6, 0.4, 0.0),
    "dark_brown": (0.2, 0.0, 0.0),
    "blue_gray": (0.2, 0.6, 0.6),
    "black": (0.0, 0.0, 0.0),
}
COLOR_PRESENT_SHARE = 0.05  # a colour counts as present when at least this share of the lesion has it
MIN_LESION_SHARE = 0.002  # a mask smaller than this share of the image is noise, not a lesion
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 3)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
LBP_POINTS, LBP_RADIUS = 8, 1  # rotation-invariant uniform patterns: P + 2 = 10 codes


def lesion_mask(image: np.ndarray) -> np.ndarray:
    """The lesion as a boolean mask: Otsu's threshold on the smoothed lightness, small specks opened
    away, holes filled, and of the dark regions the one that is large and central (a dermoscope's
    dark corners are large too, but sit at the edge). All False when nothing stands out."""
    lightness = filters.gaussian(color.rgb2gray(image), sigma=max(1.0, image.shape[0] / 64))
    if np.ptp(lightness) < 1e-3:
        return np.zeros(image.shape[:2], bool)
    dark = morphology.opening(lightness < filters.threshold_otsu(lightness), morphology.disk(2))
    regions = measure.regionprops(measure.label(dark))
    if not regions:
        return np.zeros(image.shape[:2], bool)
    centre, scale = np.array(image.shape[:2]) / 2, 0.35 * image.shape[0]
    best = max(regions, key=lambda r: r.area * np.exp(-(np.linalg.norm(np.array(r.centroid) - centre) / scale) ** 2))
    mask = ndimage.binary_fill_holes(best.image)
    full = np.zeros(image.shape[:2], bool)
    r0, c0, r1, c1 = best.bbox
    full[r0:r1, c0:c1] = mask
    return full if full.mean() >= MIN_LESION_SHARE else np.zeros_like(full)


@dataclass(frozen=True)
class LesionView:
    """One image and its lesion mask, with the conversions several families share computed once."""

    image: np.ndarray  # uint8 RGB
    mask: np.ndarray  # bool, the lesion

    @cached_property
    def lab(self) -> np.ndarray:
        return color.rgb2lab(self.image)

    @cached_property
    def gray(self) -> np.ndarray:
        return (color.rgb2gray(self.image) * 255).astype(np.uint8)

    @cached_property
    def region(self) -> measure._regionprops.RegionProperties:
        return measure.regionprops(self.mask.astype(np.uint8))[0]


def mirror_asymmetry(mask: np.ndarray) -> tuple[float, float]:
    """Share of the lesion with no mirror image across its major and its minor principal axis.

    The mask is resampled into a frame centred on its centroid with the major axis horizontal
    (scikit-image's warp), then flipped about each axis: 0 for a disc or an ellipse, towards 1 for a
    lesion that is all on one side.
    """
    rows, cols = np.nonzero(mask)
    centre = np.array([cols.mean(), rows.mean()])
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(np.vstack([cols, rows])))
    major, minor = eigenvectors[:, 1], eigenvectors[:, 0]  # (x, y) unit vectors, largest variance first
    half = int(np.ceil(np.hypot(*mask.shape) / 2))

    def aligned_to_image(coords: np.ndarray) -> np.ndarray:
        offsets = coords - half
        return centre + offsets[:, :1] * major + offsets[:, 1:] * minor

    aligned = transform.warp(mask.astype(float), aligned_to_image, output_shape=(2 * half + 1, 2 * half + 1), order=0) > 0.5
    area = max(int(aligned.sum()), 1)
    return float((aligned & ~aligned[::-1, :]).sum() / area), float((aligned & ~aligned[:, ::-1]).sum() / area)


def shape_features(view: LesionView) -> dict[str, float]:
    """Area, elongation, convexity and border irregularity of the lesion, and its asymmetry (the A and B of ABCD)."""
    region = view.region
    asymmetry_major, asymmetry_minor = mirror_asymmetry(view.mask)
    return {
        "area_share": region.area / view.mask.size,
        "eccentricity": region.eccentricity,
        "solidity": region.solidity,
        "extent": region.extent,
        # perimeter^2 / (4 pi area): 1 for a disc, larger for a ragged or notched border
        "border_irregularity": region.perimeter**2 / (4 * np.pi * region.area),
        "asymmetry_major": asymmetry_major,
        "asymmetry_minor": asymmetry_minor,
        "border_touch_share": float(np.concatenate([view.mask[0], view.mask[-1], view.mask[:, 0], view.mask[:, -1]]).mean()),
    }


_REFERENCE_LAB = color.rgb2lab(np.array([list(DERMOSCOPIC_COLORS.values())]))[0]


def dermoscopic_color_shares(lab_pixels: np.ndarray) -> dict[str, float]:
    """Share of `lab_pixels` (N, 3) nearest to each of the six dermoscopic colours."""
    nearest = np.argmin(np.linalg.norm(lab_pixels[:, None, :] - _REFERENCE_LAB[None], axis=2), axis=1)
    counts = np.bincount(nearest, minlength=len(DERMOSCOPIC_COLORS)) / max(len(lab_pixels), 1)
    return dict(zip(DERMOSCOPIC_COLORS, counts.tolist()))


def color_features(view: LesionView) -> dict[str, float]:
    """L*a*b* statistics inside and outside the lesion, lesion-skin contrast, the dermoscopic colours (the C of ABCD)."""
    inside, outside = view.lab[view.mask], view.lab[~view.mask]
    mean_in = inside.mean(axis=0)
    mean_out = outside.mean(axis=0) if len(outside) else np.full(3, np.nan)
    shares = dermoscopic_color_shares(inside)
    features = {f"lesion_{c}_mean": v for c, v in zip("Lab", mean_in)}
    features |= {f"lesion_{c}_std": v for c, v in zip("Lab", inside.std(axis=0))}
    features |= {f"skin_{c}_mean": v for c, v in zip("Lab", mean_out)}
    features["contrast_delta_e"] = float(np.linalg.norm(mean_in - mean_out))
    features |= {f"share_{name}": share for name, share in shares.items()}
    features["n_colors"] = float(sum(share >= COLOR_PRESENT_SHARE for share in shares.values()))
    return features


def texture_features(view: LesionView) -> dict[str, float]:
    """Grey-level co-occurrence statistics over the lesion's box and uniform LBP codes inside the lesion."""
    r0, c0, r1, c1 = view.region.bbox
    levels = (view.gray[r0:r1, c0:c1].astype(np.uint16) * GLCM_LEVELS // 256).astype(np.uint8)
    glcm = feature.graycomatrix(levels, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True, normed=True)
    features = {
        f"glcm_{prop}_d{d}": float(value)
        for prop in GLCM_PROPERTIES
        for d, value in zip(GLCM_DISTANCES, feature.graycoprops(glcm, prop).mean(axis=1))
    }
    codes = feature.local_binary_pattern(view.gray, LBP_POINTS, LBP_RADIUS, method="uniform")[view.mask].astype(int)
    histogram = np.bincount(codes, minlength=LBP_POINTS + 2) / max(len(codes), 1)
    return features | {f"lbp_{code}": float(share) for code, share in enumerate(histogram)}


@dataclass(frozen=True)
class FeatureFamily:
    """A named set of lesion features; columns are `<family>_<feature>`."""

    compute: Callable[[LesionView], dict[str, float]]
    description: str


FEATURE_FAMILIES: dict[str, FeatureFamily] = {
    "shape": FeatureFamily(shape_features, "area, eccentricity, solidity, border irregularity, asymmetry about the principal axes"),
    "color": FeatureFamily(color_features, "L*a*b* inside and outside the lesion, contrast, shares of the six dermoscopic colours"),
    "texture": FeatureFamily(texture_features, "GLCM statistics and uniform LBP codes"),
}


@cache
def _probe_columns(family: str) -> tuple[str, ...]:
    return tuple(image_features(_PROBE_IMAGE, (family,)))


def family_columns(family: str) -> list[str]:
    """The columns of one family, in order (from a hand-drawn lesion, so no image is needed)."""
    return list(_probe_columns(family))


def check_families(families: Sequence[str]) -> list[str]:
    """The families asked for, refusing an unknown name with the registered ones."""
    unknown = [f for f in families if f not in FEATURE_FAMILIES]
    if unknown:
        raise OptionError(f"unknown feature famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; registered: {sorted(FEATURE_FAMILIES)}.")
    if not families:
        raise OptionError(f"no feature family given; registered: {sorted(FEATURE_FAMILIES)}.")
    return list(dict.fromkeys(families))


def image_features(image: np.ndarray, families: Sequence[str]) -> dict[str, float]:
    """Every feature of `families` for one uint8 RGB image (NaN for all when it shows no lesion)."""
    mask = lesion_mask(image)
    if not mask.any():
        return {column: np.nan for family in families for column in family_columns(family)}
    view = LesionView(image, mask)
    return {f"{family}_{name}": float(value) for family in families for name, value in FEATURE_FAMILIES[family].compute(view).items()}


def batch_features(images: np.ndarray, families: Sequence[str]) -> list[dict[str, float]]:
    """`image_features` of each image of a (N, H, W, 3) uint8 batch (one task of the parallel stage)."""
    return [image_features(image, families) for image in images]


def _probe_image() -> np.ndarray:
    image = np.full((32, 32, 3), 200, np.uint8)
    rr, cc = draw.ellipse(16, 16, 9, 6)
    image[rr, cc] = (90, 50, 30)
    return image


_PROBE_IMAGE = _probe_image()
