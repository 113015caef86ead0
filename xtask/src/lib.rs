//! The helpers behind `cargo xtask` and the lab's harnesses: fetching the pinned model and data, the release
//! binaries as processes, the demo, and generated doc sections. Chores only; research lives in `mobillm-lab`.

pub mod args;
pub mod demo;
pub mod fetch;
pub mod paths;
pub mod processes;
pub mod report;
pub mod services;
pub mod tasks;
