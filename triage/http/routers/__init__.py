"""A router per resource: health, patients, lesions, worklist (the JSON API under /api/v1), sign-in, pages."""

from triage.schemas import ErrorOut

# What every API route may answer besides its success: each as the one error body.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorOut, "description": why}
    for status, why in {401: "No valid token.", 404: "No such patient or lesion.", 413: "Over an upload limit.", 422: "A refused value.",
                        503: "Busy or unavailable; the log has the request id."}.items()
}
