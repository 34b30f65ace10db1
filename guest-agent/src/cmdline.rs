//! The kernel command line, as `/proc/cmdline` shows it.
//!
//! The host passes its requests to the agent as `hull.*` parameters. The kernel does not hand
//! dotted parameters to init as arguments or environment, so the agent reads them from
//! `/proc/cmdline`. Splitting follows the kernel's own `next_arg()`: parameters are separated by
//! white space, double quotes group (`a="b c"`), and only a quote opening the parameter or its
//! value and the one closing it are removed.

use std::path::Path;

/// The parameter that asks the agent to power off right after the readiness line.
pub const POWEROFF_PARAM: &str = "hull.poweroff";
/// The value of [`POWEROFF_PARAM`] for "power off once ready".
pub const POWEROFF_READY: &str = "ready";
/// The diagnostic boot command (`boot_command.rs`): a command for `/bin/sh -c`, run after the readiness
/// line. The kernel has no escapes: the command cannot hold a double quote.
pub const BOOT_COMMAND_PARAM: &str = "hull.exec";
/// A flag: serve the host protocol over vsock (`server/`). The VMM passes it.
pub const SERVE_PARAM: &str = "hull.serve";

/// Errors reading the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("cannot read kernel command line {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A parsed kernel command line: `name` or `name=value` parameters, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    params: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Parses a command line the way the kernel splits it.
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut chars = text.chars().peekable();
        loop {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.peek().is_none() {
                break;
            }
            let mut word = String::new();
            let mut in_quote = false;
            while let Some(c) = chars.next_if(|c| in_quote || !c.is_whitespace()) {
                if c == '"' {
                    in_quote = !in_quote;
                }
                word.push(c);
            }
            params.push(split_param(&word));
        }
        Self { params }
    }

    /// Reads and parses the command line from `path` (normally `/proc/cmdline`).
    pub fn read(path: &Path) -> Result<Self, CmdlineError> {
        let text = std::fs::read_to_string(path).map_err(|source| CmdlineError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    /// The value of the last `name=value` parameter called `name`, as the kernel lets the last
    /// one win. A bare `name` has no value.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Whether the host asked for a power-off right after the readiness line.
    pub fn poweroff_when_ready(&self) -> bool {
        self.value(POWEROFF_PARAM) == Some(POWEROFF_READY)
    }

    /// Whether `name` appears as a bare flag (or with any value), e.g. [`SERVE_PARAM`].
    pub fn has(&self, name: &str) -> bool {
        self.params.iter().any(|(n, _)| n == name)
    }

    /// Whether the host asked the agent to serve the control protocol.
    pub fn serve(&self) -> bool {
        self.has(SERVE_PARAM)
    }

    /// The diagnostic boot command, if the host gave one (the last
    /// [`BOOT_COMMAND_PARAM`] wins). A bare or empty `hull.exec` is no command.
    pub fn boot_command(&self) -> Option<&str> {
        self.value(BOOT_COMMAND_PARAM)
            .filter(|command| !command.is_empty())
    }
}

/// Splits one word into name and value and removes quotes where the kernel does: a quote
/// opening the word or the value, and then the quote closing it.
fn split_param(word: &str) -> (String, Option<String>) {
    let (word, quoted) = match word.strip_prefix('"') {
        Some(rest) => (rest, true),
        None => (word, false),
    };
    let strip_end = |s: &str| s.strip_suffix('"').unwrap_or(s).to_owned();
    match word.split_once('=') {
        Some((name, value)) => match value.strip_prefix('"') {
            Some(value) => (name.to_owned(), Some(strip_end(value))),
            None if quoted => (name.to_owned(), Some(strip_end(value))),
            None => (name.to_owned(), Some(value.to_owned())),
        },
        None if quoted => (strip_end(word), None),
        None => (word.to_owned(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_white_space_and_equals() {
        let c = Cmdline::parse("console=ttyS0 reboot=k  panic=-1\tquiet\n");
        assert_eq!(c.value("console"), Some("ttyS0"));
        assert_eq!(c.value("reboot"), Some("k"));
        assert_eq!(c.value("panic"), Some("-1"));
        assert_eq!(c.value("quiet"), None);
        assert_eq!(c.value("missing"), None);
    }

    #[test]
    fn quotes_group_values_and_are_removed() {
        let c = Cmdline::parse(r#"a="b c" d=e"f g"h "x=y z" "bare""#);
        assert_eq!(c.value("a"), Some("b c"));
        // Like the kernel, quotes inside a value stay.
        assert_eq!(c.value("d"), Some(r#"e"f g"h"#));
        assert_eq!(c.value("x"), Some("y z"));
        assert_eq!(
            Cmdline::parse(r#""bare""#).params,
            [("bare".to_owned(), None)]
        );
    }

    #[test]
    fn poweroff_flag() {
        assert!(Cmdline::parse("console=ttyS0 hull.poweroff=ready").poweroff_when_ready());
        assert!(Cmdline::parse("hull.poweroff=\"ready\"\n").poweroff_when_ready());
        assert!(!Cmdline::parse("console=ttyS0").poweroff_when_ready());
        assert!(!Cmdline::parse("hull.poweroff").poweroff_when_ready());
        assert!(!Cmdline::parse("hull.poweroff=readyx").poweroff_when_ready());
        assert!(!Cmdline::parse("xhull.poweroff=ready").poweroff_when_ready());
        // The last one wins, as in the kernel.
        assert!(!Cmdline::parse("hull.poweroff=ready hull.poweroff=no").poweroff_when_ready());
    }

    #[test]
    fn boot_command() {
        let c = Cmdline::parse(r#"console=ttyS0 reboot=k hull.exec="ls /proc | wc -l" panic=-1"#);
        assert_eq!(c.boot_command(), Some("ls /proc | wc -l"));
        assert_eq!(c.value("panic"), Some("-1"));
        // Unquoted: one word. Single quotes are the shell's business and stay.
        assert_eq!(
            Cmdline::parse("hull.exec=/bin/ymm-stress").boot_command(),
            Some("/bin/ymm-stress")
        );
        assert_eq!(
            Cmdline::parse(r#"hull.exec="echo 'a  b'; exit 3""#).boot_command(),
            Some("echo 'a  b'; exit 3")
        );
        // '=' in the command belongs to the value; the name ends at the first one.
        assert_eq!(
            Cmdline::parse(r#"hull.exec="X=1 env | grep X=""#).boot_command(),
            Some("X=1 env | grep X=")
        );
        // The whole parameter quoted, as the kernel also accepts.
        assert_eq!(
            Cmdline::parse(r#""hull.exec=sleep 1" quiet"#).boot_command(),
            Some("sleep 1")
        );
        // A trailing newline (as in /proc/cmdline) is not part of the command.
        assert_eq!(
            Cmdline::parse("hull.exec=\"true\"\n").boot_command(),
            Some("true")
        );
        // The last one wins; bare or empty is none.
        assert_eq!(
            Cmdline::parse("hull.exec=true hull.exec=false").boot_command(),
            Some("false")
        );
        assert_eq!(Cmdline::parse("hull.exec").boot_command(), None);
        assert_eq!(Cmdline::parse("hull.exec=").boot_command(), None);
        assert_eq!(Cmdline::parse(r#"hull.exec="""#).boot_command(), None);
        assert_eq!(Cmdline::parse("xhull.exec=true").boot_command(), None);
        assert_eq!(Cmdline::parse("console=ttyS0").boot_command(), None);
    }

    #[test]
    fn serve_flag() {
        assert!(Cmdline::parse("console=ttyS0 hull.serve reboot=k").serve());
        assert!(!Cmdline::parse("console=ttyS0 hull.server").serve());
        assert!(!Cmdline::parse("").serve());
    }

    #[test]
    fn empty_and_blank() {
        assert_eq!(Cmdline::parse(""), Cmdline::default());
        assert_eq!(Cmdline::parse(" \n"), Cmdline::default());
    }
}
