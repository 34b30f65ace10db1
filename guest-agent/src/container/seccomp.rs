//! `linux.seccomp`: the spec's profile compiled to classic BPF with seccompiler, installed by
//! the container's init just before `execve` (`process.rs` says exactly when).
//!
//! seccompiler builds filters with one action on a match and one otherwise, while an OCI
//! profile gives every rule its own action. The agent therefore installs a stack of filters,
//! which the kernel runs all of, taking the highest-precedence result (`KILL_PROCESS`,
//! `KILL_THREAD`, `TRAP`, `ERRNO`, `TRACE`, `LOG`, `ALLOW`):
//! - one filter per action other than the default and `ALLOW`: that action for the system calls
//!   of its rules, `ALLOW` for everything else;
//! - unless the default action is `ALLOW`, one filter that allows the system calls of every rule
//!   and gives the default action to the rest;
//! - a guard that kills a process making x32 system calls (x86_64's architecture, numbers with
//!   `__X32_SYSCALL_BIT`), which no rule names and which would otherwise get the default action
//!   without passing the rules; libseccomp does the same when x32 is not in `architectures`.
//!
//! A system call matching no rule gets the default action; one matching a rule gets that rule's
//! action (if it matches rules with different actions, the one of higher precedence). As runc
//! does: rules whose action is the default one are dropped, names this table does not know are
//! skipped, and an argument index given more than once in a rule makes each argument its own
//! rule (OR instead of AND). Every filter checks the architecture first: only x86_64 system calls
//! pass (i386 ones kill the process), whatever the spec's `architectures` lists (the host does
//! not send it).
//!
//! The host has resolved the spec's names: actions and operators come as enums (`SCMP_ACT_KILL`
//! as `KILL_THREAD`, an `SCMP_ACT_ERRNO` without `errnoRet` as `EPERM`), flags as booleans
//! (`SECCOMP_FILTER_FLAG_TSYNC` dropped: the init has no other threads), and what the guest
//! cannot do (`SCMP_ACT_NOTIFY`, `SCMP_ACT_TRACE`, other flags) is refused before it gets here.
//! The agent still refuses an errno or argument index out of range, which the types allow, with
//! the spec's field rather than a panic or a filter that means something else.

use std::collections::BTreeMap;

use hull_protocol::spec;
use hull_protocol::{ErrorKind, ErrorResponse};
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::syscalls;
use crate::sys;

/// The largest errno the C library takes for one (`-4095..-1` are errors).
const MAX_ERRNO: u32 = 4095;
/// x32 system call numbers have this bit set (`asm/unistd.h`).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The number of arguments a system call can have.
const SYSCALL_ARGS: u8 = 6;

// Classic BPF opcodes (`linux/bpf_common.h`), in the width of `sock_filter.code`.
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JMP_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// The compiled profile: filters to install in order, and the `seccomp(2)` flags.
#[derive(Debug, Clone)]
pub struct SeccompPlan {
    programs: Vec<BpfProgram>,
    flags: libc::c_ulong,
}

/// System call number → the rules that must match (any of them); `None`: always.
type Matches = BTreeMap<i64, Option<Vec<SeccompRule>>>;

/// The profile in seccompiler's terms, before BPF.
#[derive(Debug)]
struct Translation {
    default: SeccompAction,
    /// Each action other than the default, with the system calls it applies to.
    actions: Vec<(SeccompAction, Matches)>,
    flags: libc::c_ulong,
}

fn invalid(message: String) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::InvalidSpec, message)
}

fn unsupported(message: String) -> ErrorResponse {
    ErrorResponse::new(ErrorKind::Unsupported, message)
}

impl SeccompPlan {
    /// Checks and compiles `linux.seccomp`.
    pub fn from_spec(seccomp: &spec::Seccomp) -> Result<Self, ErrorResponse> {
        if !cfg!(target_arch = "x86_64") {
            return Err(unsupported(
                "linux.seccomp: the agent knows only the x86_64 system call table".into(),
            ));
        }
        let translation = translate(seccomp)?;
        let compile = |filter: Result<SeccompFilter, seccompiler::BackendError>| {
            filter
                .and_then(BpfProgram::try_from)
                .map_err(|e| invalid(format!("linux.seccomp: compiling the filter: {e}")))
        };
        let mut programs = vec![x32_guard()];
        for (action, matches) in &translation.actions {
            if *action != SeccompAction::Allow {
                programs.push(compile(SeccompFilter::new(
                    rules(matches.clone()),
                    SeccompAction::Allow,
                    action.clone(),
                    TargetArch::x86_64,
                ))?);
            }
        }
        if translation.default != SeccompAction::Allow {
            let mut allowed = Matches::new();
            for (_, matches) in &translation.actions {
                for (nr, conditions) in matches {
                    add(&mut allowed, *nr, conditions.clone());
                }
            }
            programs.push(compile(SeccompFilter::new(
                rules(allowed),
                translation.default.clone(),
                SeccompAction::Allow,
                TargetArch::x86_64,
            ))?);
        }
        Ok(Self {
            programs,
            flags: translation.flags,
        })
    }

    /// Installs the filters on the calling thread. Needs `no_new_privs` or `CAP_SYS_ADMIN`.
    pub fn install(&self) -> Result<(), ErrorResponse> {
        for program in &self.programs {
            sys::seccomp_set_filter(program, self.flags).map_err(|e| {
                ErrorResponse::new(
                    ErrorKind::Io,
                    format!("linux.seccomp: installing the filter: {e}"),
                )
            })?;
        }
        Ok(())
    }
}

fn translate(seccomp: &spec::Seccomp) -> Result<Translation, ErrorResponse> {
    let default = action("linux.seccomp.defaultErrnoRet", seccomp.default_action)?;
    // No TSYNC: the host drops it, since the init is single-threaded and has no other threads
    // to synchronise.
    let mut flags = 0;
    if seccomp.log {
        flags |= libc::SECCOMP_FILTER_FLAG_LOG;
    }
    if seccomp.spec_allow {
        flags |= libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW;
    }
    let mut actions: Vec<(SeccompAction, Matches)> = Vec::new();
    for (i, rule) in seccomp.syscalls.iter().enumerate() {
        let act = action(
            &format!("linux.seccomp.syscalls[{i}].errnoRet"),
            rule.action,
        )?;
        let conditions = conditions(i, rule)?;
        if act == default {
            continue;
        }
        let slot = match actions.iter().position(|(a, _)| *a == act) {
            Some(pos) => &mut actions[pos].1,
            None => {
                actions.push((act, Matches::new()));
                &mut actions.last_mut().expect("just pushed").1
            }
        };
        for name in &rule.names {
            if let Some(nr) = syscalls::number(name) {
                add(slot, nr, conditions.clone());
            }
        }
    }
    actions.retain(|(_, matches)| !matches.is_empty());
    Ok(Translation {
        default,
        actions,
        flags,
    })
}

/// seccompiler's action for the spec's. `errno_field` names where an errno out of range came
/// from (the host checks the range; the agent does not trust it to).
fn action(errno_field: &str, action: spec::SeccompAction) -> Result<SeccompAction, ErrorResponse> {
    Ok(match action {
        spec::SeccompAction::Allow => SeccompAction::Allow,
        spec::SeccompAction::Errno(errno) if errno > MAX_ERRNO => {
            return Err(invalid(format!(
                "{errno_field} {errno}: errno values end at {MAX_ERRNO}"
            )))
        }
        spec::SeccompAction::Errno(errno) => SeccompAction::Errno(errno),
        spec::SeccompAction::KillThread => SeccompAction::KillThread,
        spec::SeccompAction::KillProcess => SeccompAction::KillProcess,
        spec::SeccompAction::Trap => SeccompAction::Trap,
        spec::SeccompAction::Log => SeccompAction::Log,
    })
}

/// The conditions of `linux.seccomp.syscalls[i]`: `None` if it has no `args`.
fn conditions(
    i: usize,
    rule: &spec::SeccompRule,
) -> Result<Option<Vec<SeccompRule>>, ErrorResponse> {
    if rule.args.is_empty() {
        return Ok(None);
    }
    let conditions = rule
        .args
        .iter()
        .enumerate()
        .map(|(j, arg)| condition(&format!("linux.seccomp.syscalls[{i}].args[{j}]"), arg))
        .collect::<Result<Vec<_>, _>>()?;
    let repeated =
        (0..SYSCALL_ARGS).any(|index| rule.args.iter().filter(|a| a.index == index).count() > 1);
    let rules = if repeated {
        conditions.into_iter().map(|c| vec![c]).collect()
    } else {
        vec![conditions]
    };
    rules
        .into_iter()
        .map(|c| {
            SeccompRule::new(c)
                .map_err(|e| invalid(format!("linux.seccomp.syscalls[{i}].args: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn condition(field: &str, arg: &spec::SeccompArg) -> Result<SeccompCondition, ErrorResponse> {
    if arg.index >= SYSCALL_ARGS {
        return Err(invalid(format!(
            "{field}.index {}: system call arguments are 0 to {}",
            arg.index,
            SYSCALL_ARGS - 1
        )));
    }
    let (op, value) = match arg.op {
        spec::SeccompOp::Eq(value) => (SeccompCmpOp::Eq, value),
        spec::SeccompOp::Ne(value) => (SeccompCmpOp::Ne, value),
        spec::SeccompOp::Lt(value) => (SeccompCmpOp::Lt, value),
        spec::SeccompOp::Le(value) => (SeccompCmpOp::Le, value),
        spec::SeccompOp::Gt(value) => (SeccompCmpOp::Gt, value),
        spec::SeccompOp::Ge(value) => (SeccompCmpOp::Ge, value),
        spec::SeccompOp::MaskedEq { mask, value } => (SeccompCmpOp::MaskedEq(mask), value),
    };
    SeccompCondition::new(arg.index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| invalid(format!("{field}: {e}")))
}

/// Adds a system call with its conditions; an unconditional entry absorbs conditional ones.
fn add(matches: &mut Matches, nr: i64, conditions: Option<Vec<SeccompRule>>) {
    let slot = matches.entry(nr).or_insert_with(|| Some(Vec::new()));
    match (slot.as_mut(), conditions) {
        (None, _) => {}
        (Some(_), None) => *slot = None,
        (Some(existing), Some(more)) => existing.extend(more),
    }
}

/// seccompiler's form: an empty rule list matches the system call unconditionally.
fn rules(matches: Matches) -> BTreeMap<i64, Vec<SeccompRule>> {
    matches
        .into_iter()
        .map(|(nr, conditions)| (nr, conditions.unwrap_or_default()))
        .collect()
}

/// Kills the process on an x32 system call, allows everything else (the other filters decide).
fn x32_guard() -> BpfProgram {
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // A = seccomp_data.nr
        insn(BPF_LD_W_ABS, 0, 0, 0),
        insn(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

#[cfg(test)]
mod tests {
    use spec::SeccompAction as Act;
    use spec::SeccompOp as Op;

    use super::*;

    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_KILL_THREAD: u32 = 0;
    const RET_TRAP: u32 = 0x0003_0000;
    const RET_LOG: u32 = 0x7ffc_0000;

    /// A profile with this default action and rules, without flags.
    fn profile(default_action: Act, syscalls: Vec<spec::SeccompRule>) -> spec::Seccomp {
        spec::Seccomp {
            default_action,
            log: false,
            spec_allow: false,
            syscalls,
        }
    }

    /// A rule for `names` without conditions.
    fn rule(names: &[&str], action: Act) -> spec::SeccompRule {
        spec::SeccompRule {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            action,
            args: Vec::new(),
        }
    }

    /// A rule for `names` with conditions, each an argument index and how it is compared.
    fn rule_if(names: &[&str], action: Act, args: &[(u8, Op)]) -> spec::SeccompRule {
        spec::SeccompRule {
            args: args
                .iter()
                .map(|&(index, op)| spec::SeccompArg { index, op })
                .collect(),
            ..rule(names, action)
        }
    }

    fn nr(name: &str) -> i64 {
        syscalls::number(name).unwrap()
    }

    /// Runs one classic BPF program (the instructions seccompiler and `x32_guard` emit) on a
    /// `struct seccomp_data`.
    fn run(program: &[sock_filter], data: &[u8; 64]) -> u32 {
        let mut a = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = &program[pc];
            pc += 1;
            let k = insn.k;
            match (insn.code & 0x07, insn.code & 0xf0) {
                (0x00, 0x20) if insn.code == BPF_LD_W_ABS => {
                    let at = k as usize;
                    a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                }
                (0x04, 0x50) => a &= k,
                (0x05, op) => {
                    let taken = match op {
                        0x00 => {
                            pc += k as usize;
                            continue;
                        }
                        0x10 => a == k,
                        0x20 => a > k,
                        0x30 => a >= k,
                        0x40 => a & k != 0,
                        _ => panic!("unexpected jump {insn:?}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                (0x06, _) => return k,
                _ => panic!("unexpected instruction {insn:?}"),
            }
        }
    }

    /// What the kernel returns for a system call with every program of `plan` installed: the
    /// result of highest precedence (lowest as a signed action).
    fn verdict_arch(plan: &SeccompPlan, arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, arg) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
        }
        plan.programs
            .iter()
            .map(|p| run(p, &data))
            .min_by_key(|ret| (ret & 0xffff_0000) as i32)
            .unwrap()
    }

    fn verdict(plan: &SeccompPlan, name: &str, args: [u64; 6]) -> u32 {
        verdict_arch(plan, AUDIT_ARCH_X86_64, nr(name), args)
    }

    fn plan(seccomp: spec::Seccomp) -> SeccompPlan {
        SeccompPlan::from_spec(&seccomp).unwrap()
    }

    fn error(seccomp: spec::Seccomp) -> ErrorResponse {
        SeccompPlan::from_spec(&seccomp).unwrap_err()
    }

    #[test]
    fn actions_map_to_seccompiler() {
        for (given, expected) in [
            (Act::Allow, SeccompAction::Allow),
            (Act::Errno(1), SeccompAction::Errno(1)),
            (Act::Errno(MAX_ERRNO), SeccompAction::Errno(MAX_ERRNO)),
            (Act::KillThread, SeccompAction::KillThread),
            (Act::KillProcess, SeccompAction::KillProcess),
            (Act::Trap, SeccompAction::Trap),
            (Act::Log, SeccompAction::Log),
        ] {
            assert_eq!(action("f", given).unwrap(), expected, "{given:?}");
        }
    }

    #[test]
    fn errno_ret_is_used_and_out_of_range_is_refused() {
        let p = plan(profile(
            Act::Errno(1),
            vec![
                rule(&["mkdir"], Act::Errno(13)),
                rule(&["rmdir"], Act::Errno(1)),
                rule(&["read"], Act::Allow),
            ],
        ));
        assert_eq!(verdict(&p, "mkdir", [0; 6]), RET_ERRNO | 13);
        // Same action as the default: dropped, and the default is EPERM too.
        assert_eq!(verdict(&p, "rmdir", [0; 6]), RET_ERRNO | 1);
        assert_eq!(verdict(&p, "write", [0; 6]), RET_ERRNO | 1);
        assert_eq!(verdict(&p, "read", [0; 6]), libc::SECCOMP_RET_ALLOW);

        let p = plan(profile(Act::Errno(38), vec![]));
        assert_eq!(verdict(&p, "write", [0; 6]), RET_ERRNO | 38);

        // The host checks the range; the agent refuses what would not fit the return value.
        let err = error(profile(Act::Errno(70000), vec![]));
        assert_eq!(err.kind, ErrorKind::InvalidSpec);
        assert_eq!(
            err.message,
            "linux.seccomp.defaultErrnoRet 70000: errno values end at 4095"
        );
        let rules = vec![
            rule(&["read"], Act::Allow),
            rule(&["mkdir"], Act::Errno(4096)),
        ];
        let err = error(profile(Act::Allow, rules));
        assert_eq!(err.kind, ErrorKind::InvalidSpec);
        assert_eq!(
            err.message,
            "linux.seccomp.syscalls[1].errnoRet 4096: errno values end at 4095"
        );
    }

    #[test]
    fn every_action_wins_over_allow_and_the_default() {
        let p = plan(profile(
            Act::KillProcess,
            vec![
                rule(&["read", "write"], Act::Allow),
                rule(&["mkdir"], Act::Errno(1)),
                rule(&["rmdir"], Act::KillThread),
                rule(&["unlink"], Act::Trap),
                rule(&["chdir"], Act::Log),
            ],
        ));
        assert_eq!(verdict(&p, "read", [0; 6]), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(&p, "write", [0; 6]), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(&p, "mkdir", [0; 6]), RET_ERRNO | 1);
        assert_eq!(verdict(&p, "rmdir", [0; 6]), RET_KILL_THREAD);
        assert_eq!(verdict(&p, "unlink", [0; 6]), RET_TRAP);
        assert_eq!(verdict(&p, "chdir", [0; 6]), RET_LOG);
        assert_eq!(verdict(&p, "open", [0; 6]), libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn default_allow_with_a_denied_call() {
        let p = plan(profile(
            Act::Allow,
            vec![rule(&["mkdir", "mkdirat"], Act::Errno(1))],
        ));
        // The x32 guard and one ERRNO filter; no default filter for an ALLOW default.
        assert_eq!(p.programs.len(), 2);
        assert_eq!(verdict(&p, "mkdirat", [0; 6]), RET_ERRNO | 1);
        assert_eq!(verdict(&p, "mkdir", [0; 6]), RET_ERRNO | 1);
        assert_eq!(verdict(&p, "write", [0; 6]), libc::SECCOMP_RET_ALLOW);
        // x32's mkdir does not slip past.
        assert_eq!(
            verdict_arch(&p, AUDIT_ARCH_X86_64, nr("mkdir") | 0x4000_0000, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn ops_compare_64_bit_arguments() {
        let rule = |op: Op| {
            plan(profile(
                Act::Allow,
                vec![rule_if(&["personality"], Act::Errno(1), &[(1, op)])],
            ))
        };
        let denied = |p: &SeccompPlan, arg: u64| {
            verdict(p, "personality", [0, arg, 0, 0, 0, 0]) == RET_ERRNO | 1
        };
        let big = 1u64 << 40;
        let p = rule(Op::Eq(big + 5));
        assert!(denied(&p, big + 5) && !denied(&p, 5) && !denied(&p, big));
        let p = rule(Op::Ne(big));
        assert!(!denied(&p, big) && denied(&p, 0) && denied(&p, big + 1));
        let p = rule(Op::Lt(big));
        assert!(denied(&p, big - 1) && !denied(&p, big) && !denied(&p, big + 1));
        let p = rule(Op::Le(big));
        assert!(denied(&p, big) && !denied(&p, big + 1));
        let p = rule(Op::Gt(big));
        assert!(denied(&p, big + 1) && !denied(&p, big));
        let p = rule(Op::Ge(big));
        assert!(denied(&p, big) && !denied(&p, big - 1));
        // (arg & mask) == value
        let p = rule(Op::MaskedEq {
            mask: 0xff | big,
            value: 0x12,
        });
        assert!(denied(&p, 0x312) && !denied(&p, 0x313) && !denied(&p, big | 0x12));
        // Another argument is not compared.
        let p = rule(Op::Eq(7));
        assert!(!denied(&p, 0));
        assert_ne!(
            verdict(&p, "personality", [0, 0, 7, 0, 0, 0]),
            RET_ERRNO | 1
        );
    }

    #[test]
    fn args_are_anded_unless_an_index_repeats() {
        let spec = |args: &[(u8, Op)]| {
            plan(profile(
                Act::Allow,
                vec![rule_if(&["kill"], Act::Errno(1), args)],
            ))
        };
        let both = spec(&[(0, Op::Eq(1)), (1, Op::Eq(9))]);
        assert_eq!(verdict(&both, "kill", [1, 9, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(
            verdict(&both, "kill", [1, 15, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
        let either = spec(&[(1, Op::Eq(9)), (1, Op::Eq(15))]);
        assert_eq!(verdict(&either, "kill", [1, 9, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(verdict(&either, "kill", [1, 15, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(
            verdict(&either, "kill", [1, 2, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn a_conditional_allow_with_a_deny_default() {
        let p = plan(profile(
            Act::Errno(1),
            vec![rule_if(&["personality"], Act::Allow, &[(0, Op::Eq(8))])],
        ));
        assert_eq!(
            verdict(&p, "personality", [8, 0, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            verdict(&p, "personality", [9, 0, 0, 0, 0, 0]),
            RET_ERRNO | 1
        );
    }

    #[test]
    fn an_argument_index_out_of_range_is_refused() {
        for index in [6, u8::MAX] {
            let e = error(profile(
                Act::Allow,
                vec![
                    rule(&["read"], Act::Errno(1)),
                    rule_if(
                        &["kill"],
                        Act::Errno(1),
                        &[(0, Op::Eq(1)), (index, Op::Eq(1))],
                    ),
                ],
            ));
            assert_eq!(e.kind, ErrorKind::InvalidSpec);
            assert_eq!(
                e.message,
                format!(
                    "linux.seccomp.syscalls[1].args[1].index {index}: system call arguments are \
                     0 to 5"
                )
            );
        }
    }

    #[test]
    fn unknown_names_are_skipped_and_other_architectures_ignored() {
        let p = plan(profile(
            Act::Allow,
            vec![
                rule(&["no_such_call", "socketcall", "mkdir"], Act::Errno(1)),
                rule(&["only_elsewhere"], Act::KillThread),
            ],
        ));
        // A rule with nothing this table knows adds no filter.
        assert_eq!(p.programs.len(), 2);
        assert_eq!(verdict(&p, "mkdir", [0; 6]), RET_ERRNO | 1);
        // Every filter but the x32 guard checks for x86_64 first.
        for program in &p.programs[1..] {
            assert_eq!(program[0].k, 4, "loads seccomp_data.arch");
            assert_eq!(program[1].k, AUDIT_ARCH_X86_64);
        }
        assert_eq!(
            verdict_arch(&p, AUDIT_ARCH_I386, 39, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn flags() {
        let with = |log, spec_allow| {
            plan(spec::Seccomp {
                log,
                spec_allow,
                ..profile(Act::Allow, vec![])
            })
            .flags
        };
        assert_eq!(with(false, false), 0);
        assert_eq!(with(true, false), libc::SECCOMP_FILTER_FLAG_LOG);
        assert_eq!(with(false, true), libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW);
        assert_eq!(
            with(true, true),
            libc::SECCOMP_FILTER_FLAG_LOG | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
        );
    }

    #[test]
    fn an_allow_list_of_every_known_call_fits() {
        let names: Vec<&str> = syscalls::SYSCALLS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| *n != "mkdir")
            .collect();
        let p = plan(profile(Act::Errno(1), vec![rule(&names, Act::Allow)]));
        assert_eq!(verdict(&p, "mkdir", [0; 6]), RET_ERRNO | 1);
        assert_eq!(verdict(&p, "mseal", [0; 6]), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(&p, "read", [0; 6]), libc::SECCOMP_RET_ALLOW);
    }
}
