"""The service's database: tables (`models`), the engine and the schema's version (`engine`), and the
Alembic migrations that take any earlier database to the code's schema (`migrations/`)."""
