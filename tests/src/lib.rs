//! Support for hull's end-to-end tests and benchmarks: tiny hand-made guests, and finding and
//! running the project's binaries with deadlines.

pub mod bundle;
pub mod harness;
pub mod image;
pub mod netns;
pub mod rng;
pub mod tiny_guest;
