//! What a plugin may write to the service's log in one call: at most [`BYTES_PER_CALL`] bytes (then
//! one "log truncated" line and silence), every control character escaped so a message is always
//! one log line (a plugin must not forge lines with `\n`, rewrite them with `\r` or send terminal
//! escapes), in the text and the JSON format alike.
//!
//! This module only decides what text may be logged; it must never log itself.

/// Bytes of log text one call may produce (messages after escaping, over all its `log` calls and
/// its stdout/stderr).
pub const BYTES_PER_CALL: usize = 64 << 10;

/// The state of one call's budget.
#[derive(Debug)]
pub struct LogBudget {
    left: usize,
    exhausted: bool,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self { left: BYTES_PER_CALL, exhausted: false }
    }
}

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log this (escaped, possibly cut to what is left).
    Log(String),
    /// The budget just ran out: log one line saying the rest is dropped.
    Truncated,
    /// The budget ran out earlier: drop the message.
    Drop,
}

impl LogBudget {
    pub fn admit(&mut self, message: &str) -> Admit {
        if self.exhausted {
            return Admit::Drop;
        }
        if self.left == 0 {
            self.exhausted = true;
            return Admit::Truncated;
        }
        let escaped = escape_controls(message);
        if escaped.len() <= self.left {
            self.left -= escaped.len();
            return Admit::Log(escaped);
        }
        let mut cut = self.left;
        while !escaped.is_char_boundary(cut) {
            cut -= 1;
        }
        self.left = 0;
        Admit::Log(format!("{} …(truncated)", &escaped[..cut]))
    }
}

/// `text` with every control character written as an escape (`\n`, `\r`, `\t`, `\u{1b}`), and
/// backslashes doubled so an escape cannot be faked either.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(|c| c.is_control() || c == '\\') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_bytes_per_call_obeyed() {
        let mut budget = LogBudget::default();
        let line = "x".repeat(1024);
        for _ in 0..BYTES_PER_CALL / 1024 {
            assert_eq!(budget.admit(&line), Admit::Log(line.clone()));
        }
    }

    #[test]
    fn log_bytes_per_call_violated() {
        let mut budget = LogBudget::default();
        let line = "x".repeat(4000);
        let mut logged = 0;
        let mut truncated = 0;
        for _ in 0..100_000 {
            match budget.admit(&line) {
                Admit::Log(text) => logged += text.len(),
                Admit::Truncated => truncated += 1,
                Admit::Drop => {}
            }
        }
        assert!(logged <= BYTES_PER_CALL + 32, "{logged}");
        assert_eq!(truncated, 1);
    }

    /// Everything logged while `f` runs, in the text or the JSON format.
    fn captured(json: bool, f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let builder = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false);
        if json {
            tracing::subscriber::with_default(builder.json().finish(), f);
        } else {
            tracing::subscriber::with_default(builder.finish(), f);
        }
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
    }

    fn sandbox() -> crate::plugins::sandbox::SandboxState {
        let limits = crate::plugins::PluginLimits::default();
        let share = crate::plugins::budget::HostBudget::new(limits.host_budget_bytes).share();
        crate::plugins::sandbox::SandboxState::new("hostile@0.1.0".into(), "r1".into(), &limits, std::sync::Arc::new(crate::plugins::NoModels), share)
    }

    #[test]
    fn a_plugin_flooding_the_log_is_cut_off_per_call() {
        use crate::plugins::calls::LogLevel;
        for json in [false, true] {
            let text = captured(json, || {
                let state = sandbox();
                for _ in 0..5_000 {
                    state.log(LogLevel::Info, &"f".repeat(4000));
                }
            });
            assert!(text.len() < 2 * BYTES_PER_CALL, "{} bytes logged", text.len());
            assert_eq!(text.matches("log truncated").count(), 1, "json={json}");
            // A new call has a new budget.
            let text = captured(json, || sandbox().log(LogLevel::Info, "next call"));
            assert!(text.contains("next call"));
        }
    }

    #[test]
    fn a_plugin_forging_log_lines_stays_on_one_line() {
        use crate::plugins::calls::LogLevel;
        for json in [false, true] {
            let text = captured(json, || sandbox().log(LogLevel::Info, "innocent\nERROR forged line: admin logged in\r\u{1b}[2J"));
            assert_eq!(text.trim_end().lines().count(), 1, "{text}");
            assert!(!text.contains('\u{1b}'), "{text:?}");
        }
    }

    #[test]
    fn forged_log_lines_are_escaped() {
        assert_eq!(escape_controls("ok\nERROR forged\r\u{1b}[2J\\n"), "ok\\nERROR forged\\r\\u{1b}[2J\\\\n");
        assert_eq!(escape_controls("plain text, ünïcode"), "plain text, ünïcode");
    }
}
