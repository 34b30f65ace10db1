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

/// The flags of containerd's shim protocol that take a value.
const VALUE_FLAGS: [&str; 6] = [
    "-namespace",
    "-id",
    "-address",
    "-publish-binary",
    "-socket",
    "-bundle",
];

/// What containerd-shim's own parser lets through and a user should hear about: a missing
/// `-namespace` or `-id`, an action other than `start` or `delete` (or none, to serve).
fn check_arguments(args: &[String]) -> Result<(), String> {
    let (mut namespace, mut id, mut actions) = (None, None, Vec::new());
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let flag = arg.split('=').next().unwrap_or(arg).trim_start_matches('-');
        let inline = arg.split_once('=').map(|(_, v)| v.to_owned());
        if VALUE_FLAGS.contains(&format!("-{flag}").as_str()) && arg.starts_with('-') {
            let value = inline.or_else(|| args.next().cloned()).unwrap_or_default();
            match flag {
                "namespace" => namespace = Some(value),
                "id" => id = Some(value),
                _ => {}
            }
        } else if !arg.starts_with('-') {
            actions.push(arg.clone());
        }
    }
    if namespace.as_deref().unwrap_or("").is_empty() {
        return Err("-namespace is missing: containerd starts this shim with \
                    -namespace NS -address SOCKET -id ID start"
            .into());
    }
    match actions.as_slice() {
        [] => {}
        [action] if action == "start" || action == "delete" => {}
        [action] => {
            return Err(format!(
                "unknown action {action:?}: the actions are start and delete (none: serve)"
            ))
        }
        more => return Err(format!("one action at most, not {more:?}")),
    }
    if id.as_deref().unwrap_or("").is_empty() {
        return Err("-id is missing: the task's id is needed to start, serve or delete".into());
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(why) = check_arguments(&args) {
        eprintln!("containerd-shim-hull-v2: {why}");
        std::process::exit(1);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &str) -> Result<(), String> {
        check_arguments(
            &args
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn wrong_arguments_are_named() {
        let ok = "-namespace k8s.io -address /run/c.sock -publish-binary /bin/c -id t1 start";
        assert_eq!(check(ok), Ok(()));
        assert_eq!(check("-namespace=k8s.io -id=t1 delete"), Ok(()));
        assert_eq!(
            check("-namespace k8s.io -id t1 -socket unix:///s -debug"),
            Ok(())
        );
        assert!(check("").unwrap_err().contains("-namespace"));
        assert!(check("-namespace k8s.io start")
            .unwrap_err()
            .contains("-id"));
        assert!(check("-namespace k8s.io -id t1 frobnicate")
            .unwrap_err()
            .contains("frobnicate"));
        assert!(check("-namespace k8s.io -id t1 start delete").is_err());
    }
}
