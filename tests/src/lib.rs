//! End-to-end tests of embodyd live in `tests/tests/`; they start the real
//! binaries built by cargo and, where a test needs them, the real model files
//! fetched by `scripts/fetch-models.sh`.
