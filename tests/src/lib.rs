//! Support for hull's end-to-end tests and benchmarks: tiny hand-made guests, finding and
//! running the project's binaries with deadlines, and the clients under test (a private
//! containerd, a CRI node with its kubelet-side client, a local image registry).

pub mod bundle;
pub mod containerd;
pub mod cri;
pub mod harness;
pub mod image;
pub mod netns;
pub mod registry;
pub mod rng;
pub mod tiny_guest;
