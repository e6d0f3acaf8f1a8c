"""Run-directory infrastructure every stage shares: atomic IO, the run layout, the manifest and log, --config files."""
