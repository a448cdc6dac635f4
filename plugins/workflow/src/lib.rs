//! The `/workflow` endpoint (to be written).
