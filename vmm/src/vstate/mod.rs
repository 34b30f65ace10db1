//! KVM state: the VM (memory, interrupt controllers) and its vCPUs with their run loops.

pub mod run_state;
pub mod vcpu;
pub mod vm;
pub mod xstate;
