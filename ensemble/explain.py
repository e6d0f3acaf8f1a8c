"""`predict --explain`: a Grad-CAM overlay of every alerted image and one HTML page per patient.

A patient's page lists their lesions from the riskiest down, as a dermatologist reviews a patient:
the alerted ones with the overlay of where the CNNs found melanoma evidence (the mean Grad-CAM
of every fold model of every CNN in the bundle, at the image's own size).
"""

from __future__ import annotations

import hashlib
import html
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from cnn.gradcam import GradCam, overlay, resize_map
from cnn.pipeline import COLOR_CONSTANCY, dark_border_box, decode_image
from ensemble.bundle import Bundle
from ensemble.predict import Advance
from evaluation.operating_point import OperatingPoint
from metadata.images import ImageBytesReader
from rundir.io import write_text

STYLE = """body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
th { background: #f2f2f2; } tr.alert td { background: #fdecea; } img { max-width: 320px; }"""


def file_stem(identifier: str) -> str:
    """A safe file name for an id; a hash suffix keeps ids that differ only in replaced characters apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", identifier)
    return safe if safe == identifier else f"{safe}-{hashlib.sha1(identifier.encode()).hexdigest()[:8]}"


def overlay_name(image_id: str) -> str:
    return f"{file_stem(image_id)}_gradcam.png"


def patient_page_name(patient_id: str) -> str:
    return f"patient_{file_stem(patient_id)}.html"


def ensemble_heatmaps(gradcams: list[tuple[tuple[int, str], GradCam]], encoded: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: the image (uint8 RGB, its own size) and the mean Grad-CAM of every (input size, model) at that size."""
    images = [np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(e))).convert("RGB")) for e in encoded]  # upright, as the CNNs saw them
    inputs = {view: np.stack([decode_image(e, *view).numpy() for e in encoded]) for view in {v for v, _ in gradcams}}
    totals = [np.zeros(image.shape[:2]) for image in images]
    for view, gradcam in gradcams:
        for total, image, heat in zip(totals, images, gradcam(inputs[view])):
            total += heat_on_image(heat, image, COLOR_CONSTANCY[view[1]].crop_border)
    return [(image, total / len(gradcams)) for image, total in zip(images, totals)]


def heat_on_image(heat: np.ndarray, image: np.ndarray, cropped: bool) -> np.ndarray:
    """A view's Grad-CAM at the image's own size; a view cropped to the dark-border box covers that box only."""
    if not cropped:
        return resize_map(heat, *image.shape[:2])
    top, bottom, left, right = (int(edge) for edge in dark_border_box(image))
    placed = np.zeros(image.shape[:2])
    placed[top:bottom, left:right] = resize_map(heat, bottom - top, right - left)
    return placed


def bundle_gradcams(bundle: Bundle) -> list[tuple[tuple[int, str], GradCam]]:
    """A Grad-CAM of the melanoma output of every fold model of every CNN, with the input view (size,
    colour constancy) that CNN sees."""
    return [
        ((member.image_size, member.color_constancy), GradCam(model, member.target.classes.index("MEL")))
        for member in bundle.cnns
        for model in member.models.values()
    ]


def overlay_png(gradcams: list[tuple[tuple[int, str], GradCam]], encoded: bytes) -> bytes:
    """One image's Grad-CAM overlay (the mean over `gradcams`) as PNG bytes, at the image's own size."""
    image, heat = ensemble_heatmaps(gradcams, [encoded])[0]
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, heat)).save(buffer, format="PNG")
    return buffer.getvalue()


def _operating_point_text(points: dict[str, OperatingPoint]) -> str:
    """The alert rule of each operating point the lesions on a page were judged by."""
    rules = "; ".join(
        f"{html.escape(name)}: &ge; {point.threshold:.4f} (OOF specificity {point.oof_specificity:.3f}, "
        f"{point.ci_level:.0%} CI {point.oof_specificity_ci[0]:.3f}-{point.oof_specificity_ci[1]:.3f})"
        for name, point in points.items()
    )
    target = next(iter(points.values())).target_sensitivity
    return (
        f"Alert at a melanoma probability threshold chosen for {target:.0%} sensitivity on out-of-fold predictions of lesions "
        f"with the same inputs missing (the lesion's operating point; patient-bootstrap intervals): {rules}."
    )


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>\n{STYLE}\n</style></head><body>\n{body}\n</body></html>\n"
    )


def _overlay_cell(image_id: str) -> str:
    name = html.escape(overlay_name(image_id))
    return f'<img alt="Grad-CAM of {html.escape(image_id)}" src="{name}">'


def patient_page(patient_id: str, lesions: pd.DataFrame, points: dict[str, OperatingPoint]) -> str:
    """One patient's lesions, riskiest first, alerted ones with their Grad-CAM overlay."""
    rows = "".join(
        f'<tr class="{"alert" if lesion.alert else ""}"><td>{lesion.rank_in_patient}</td>'
        f"<td>{html.escape(lesion.image_id)}</td><td>{lesion.melanoma_probability:.4f}</td>"
        f"<td>{'yes' if lesion.alert else 'no'}</td><td>{html.escape(lesion.missing_metadata) or '-'}</td>"
        f"<td>{html.escape(lesion.operating_point)}</td>"
        f"<td>{_overlay_cell(lesion.image_id) if lesion.alert else ''}</td></tr>"
        for lesion in lesions.sort_values("rank_in_patient").itertuples()
    )
    body = (
        f"<h1>Patient {html.escape(patient_id)}</h1><p>{len(lesions)} lesion(s), {int(lesions['alert'].sum())} alerted. "
        f"{_operating_point_text({n: points[n] for n in lesions['operating_point'].unique()})}</p>"
        "<table><tr><th>rank</th><th>image</th><th>melanoma probability</th><th>alert</th>"
        f"<th>missing metadata</th><th>operating point</th><th>Grad-CAM</th></tr>{rows}</table>"
        '<p><a href="index.html">all patients</a></p>'
    )
    return _page(f"Patient {patient_id}", body)


def index_page(predictions: pd.DataFrame, points: dict[str, OperatingPoint]) -> str:
    """Every patient, the one with the riskiest lesion first, linked to their page."""
    patients = predictions.groupby("patient_id").agg(
        lesions=("image_id", "size"), alerts=("alert", "sum"), highest=("melanoma_probability", "max")
    )
    rows = "".join(
        f'<tr class="{"alert" if p.alerts else ""}"><td><a href="{html.escape(patient_page_name(p.Index))}">'
        f"{html.escape(p.Index)}</a></td><td>{p.lesions}</td><td>{p.alerts}</td><td>{p.highest:.4f}</td></tr>"
        for p in patients.sort_values("highest", ascending=False).itertuples()
    )
    body = (
        f"<h1>Patients</h1><p>{_operating_point_text({n: points[n] for n in predictions['operating_point'].unique()})}</p>"
        f"<table><tr><th>patient</th><th>lesions</th><th>alerts</th><th>highest probability</th></tr>{rows}</table>"
    )
    return _page("Patients", body)


def write_explanations(
    bundle: Bundle,
    rows: pd.DataFrame,
    predictions: pd.DataFrame,
    out_dir: Path,
    *,
    batch_size: int,
    advance: Advance,
) -> Path:
    """Overlay PNGs of the alerted images (`batch_size` at a time) and the patient pages; returns the index page."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gradcams = bundle_gradcams(bundle)
    sources = rows.set_index("image_id")["image_path"]
    alerted = predictions.loc[predictions["alert"] == 1, "image_id"].tolist()
    with ImageBytesReader() as reader:
        for start in range(0, len(alerted), batch_size):
            batch = alerted[start : start + batch_size]
            for image_id, (image, heat) in zip(batch, ensemble_heatmaps(gradcams, [reader.read(sources[i]) for i in batch])):
                Image.fromarray(overlay(image, heat)).save(out_dir / overlay_name(image_id))
            advance(len(batch))
    points = bundle.operating_points
    for patient_id, lesions in predictions.groupby("patient_id"):
        write_text(patient_page(patient_id, lesions, points), out_dir / patient_page_name(patient_id))
    return write_text(index_page(predictions, points), out_dir / "index.html")
