pub mod manifest;
pub mod pull;
