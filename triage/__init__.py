"""The triage service a clinic runs on an exported bundle: upload a patient's lesions, see them ranked with
alerts and differential diagnoses, review the worklist; every read of a patient's data on record.

Laid out like FastAPI's full-stack template:

    settings.py      one settings object (flags, environment MELANOMA_TRIAGE_*, a TOML file)
    errors.py        domain errors without HTTP codes (mapped to HTTP in http/errors.py, the one place)
    db/              SQLAlchemy models, engine, Alembic migrations (`python cli.py migrate`)
    store.py         the content-addressed image store (durable writes)
    lesions.py       per-lesion work done once: each image's CNN outputs and dermoscopy features, cached
                     per (image content, bundle)
    service.py       the logic: uploads, patients, worklist, reviews, images, the record of reads
    security.py      tokens, sessions, CSRF tokens, sign-in throttling
    http/            the FastAPI app: a router per resource, typed dependencies, pydantic schemas,
                     middleware (request ids, access log, protective headers, body limits)
    templates/       the server-rendered pages (no script)

It sits above `ensemble` (it scores with an exported bundle through `ensemble.predict`).
"""
