//! The `/flux-dev` endpoint (to be written).
