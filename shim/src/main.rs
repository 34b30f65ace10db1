//! `containerd-shim-hull-v2`: containerd's shim v2 for hull (runtime type `io.containerd.hull.v2`),
//! one micro-VM per Kubernetes pod.
//!
//! containerd starts one shim process per pod: the pod's sandbox task and every container task
//! whose `io.kubernetes.cri.sandbox-id` names it are served by the same process
//! ([`service::Shim::start_shim`] groups them on the sandbox's socket). The sandbox task *is*
//! the pod's VM: `hull create --pod` starts a `hull-vmm` with no container of its own, which
//! mirrors the pod's CNI network namespace into the guest (the guest's own network, IPC and UTS
//! namespaces are the pod's). Each container task is made in that VM by its agent, with its own
//! rootfs, bind mounts, PID and mount namespaces and cgroup ([`pod`]). Stdio goes between the
//! FIFOs containerd gives and vsock streams to the guest ([`stdio`]).
//!
//! Processes of the guest are not processes of the host: a container task's pid, as containerd
//! sees it, is the pod's `hull-vmm`, the one host process that stands for the whole pod.

mod pod;
mod service;
mod stdio;

fn main() {
    // A panic in any thread is logged where containerd keeps the shim's log (its standard
    // error goes nowhere).
    std::panic::set_hook(Box::new(|info| log::error!("panic: {info}")));
    containerd_shim::run::<service::Shim>(
        service::RUNTIME_ID,
        Some(containerd_shim::Config {
            // The shim waits for its own children (`hull`) and for the pod's hull-vmm by pid
            // (`pod::watch_vmm`); a reaper of every child would take their statuses away.
            no_reaper: true,
            ..Default::default()
        }),
    );
}
