//! Filter logic with no proxy-wasm calls, so it runs and is tested natively.

pub mod config;
pub mod fanout;
pub mod headers;
pub mod json_path;
pub mod log_limit;
pub mod matcher;
pub mod outcome;
pub mod retry;
pub mod sampling;
pub mod side_request;
