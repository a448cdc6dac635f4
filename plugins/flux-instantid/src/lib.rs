//! The `/flux-instantid` endpoint (to be written).
