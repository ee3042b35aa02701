//! Driver model for tests (filled in below).
