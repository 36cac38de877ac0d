//! Console output for training: a progress bar (step/total, loss, tokens/s,
//! ETA) and structured log lines (`header`, `metric`, `key_value`,
//! `success`, `warning`, `path`) on stderr, styled with plain ANSI codes when
//! stderr is a terminal (and `NO_COLOR` is unset), plain text otherwise.
//! Log lines printed while a bar is shown appear above it.

use std::fmt::Display;
use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const CYAN: &str = "\x1b[36m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const BLUE: &str = "\x1b[34m";
const RESET: &str = "\x1b[0m";

/// Log lines to stderr, styled or plain.
#[derive(Clone, Debug)]
pub struct Console {
    styled: bool,
    bar: Option<ProgressBar>,
}

impl Console {
    /// Styled when stderr is a terminal and `NO_COLOR` is not set.
    pub fn stderr() -> Self {
        let styled = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Console { styled, bar: None }
    }

    /// Plain text, no progress bar drawn.
    pub fn plain() -> Self {
        Console {
            styled: false,
            bar: None,
        }
    }

    pub fn is_styled(&self) -> bool {
        self.styled
    }

    /// A section title.
    pub fn header(&self, title: &str) {
        self.emit(self.header_line(title));
    }

    /// A named measurement, e.g. `metric("val loss", 3.21, "")`.
    pub fn metric(&self, name: &str, value: impl Display, unit: &str) {
        self.emit(self.metric_line(name, &value, unit));
    }

    /// A setting or fact, e.g. `key_value("optimizer", "adamw")`.
    pub fn key_value(&self, key: &str, value: impl Display) {
        self.emit(self.key_value_line(key, &value));
    }

    pub fn success(&self, message: &str) {
        self.emit(self.success_line(message));
    }

    pub fn warning(&self, message: &str) {
        self.emit(self.warning_line(message));
    }

    /// A file or folder the user may want to open.
    pub fn path(&self, label: &str, path: &Path) {
        self.emit(self.path_line(label, path));
    }

    /// A training progress bar from `start_step` (non-zero when resuming) to
    /// `total_steps`; log lines print above it until it is finished. Hidden
    /// when the console is not styled.
    pub fn progress(&mut self, start_step: u64, total_steps: u64) -> TrainProgress {
        let bar = if self.styled {
            let bar = ProgressBar::new(total_steps).with_position(start_step);
            bar.set_style(
                ProgressStyle::with_template(
                    "step {pos}/{len} [{bar:30}] {msg} {elapsed_precise} (eta {eta})",
                )
                .expect("the progress template is valid")
                .progress_chars("=> "),
            );
            bar.reset_eta();
            bar
        } else {
            ProgressBar::hidden()
        };
        self.bar = Some(bar.clone());
        TrainProgress { bar }
    }

    fn emit(&self, line: String) {
        match &self.bar {
            Some(bar) if !bar.is_finished() => bar.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    fn paint(&self, style: &str, text: &str) -> String {
        if self.styled {
            format!("{style}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    fn header_line(&self, title: &str) -> String {
        if self.styled {
            format!("\n{BOLD}{CYAN}━━ {title} ━━{RESET}")
        } else {
            format!("\n== {title} ==")
        }
    }

    fn metric_line(&self, name: &str, value: &dyn Display, unit: &str) -> String {
        let value = self.paint(BOLD, &format!("{value}{unit}"));
        format!("  {name}: {value}")
    }

    fn key_value_line(&self, key: &str, value: &dyn Display) -> String {
        format!("  {} {value}", self.paint(DIM, &format!("{key}:")))
    }

    fn success_line(&self, message: &str) -> String {
        if self.styled {
            format!("{GREEN}✓{RESET} {message}")
        } else {
            format!("ok: {message}")
        }
    }

    fn warning_line(&self, message: &str) -> String {
        if self.styled {
            format!("{YELLOW}⚠ {message}{RESET}")
        } else {
            format!("warning: {message}")
        }
    }

    fn path_line(&self, label: &str, path: &Path) -> String {
        format!(
            "  {label}: {}",
            self.paint(BLUE, &path.display().to_string())
        )
    }
}

/// The training progress bar.
#[derive(Clone, Debug)]
pub struct TrainProgress {
    bar: ProgressBar,
}

impl TrainProgress {
    /// Moves the bar to `step` and shows the latest loss and throughput.
    pub fn update(&self, step: u64, loss: f64, tokens_per_s: f64) {
        self.bar.set_position(step);
        self.bar
            .set_message(format!("loss {loss:.4} | {}", format_rate(tokens_per_s)));
    }

    /// Prints a line above the bar (or plainly when there is no bar).
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Leaves the bar drawn at its last state.
    pub fn finish(&self) {
        self.bar.abandon();
    }
}

/// Tokens per second with a k/M suffix: `812 tok/s`, `12.3k tok/s`.
fn format_rate(tokens_per_s: f64) -> String {
    if tokens_per_s >= 1e6 {
        format!("{:.2}M tok/s", tokens_per_s / 1e6)
    } else if tokens_per_s >= 1e3 {
        format!("{:.1}k tok/s", tokens_per_s / 1e3)
    } else {
        format!("{tokens_per_s:.0} tok/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_have_no_escapes() {
        let c = Console::plain();
        assert_eq!(c.header_line("Training"), "\n== Training ==");
        assert_eq!(c.metric_line("val loss", &3.25, ""), "  val loss: 3.25");
        assert_eq!(c.metric_line("memory", &12, " MiB"), "  memory: 12 MiB");
        assert_eq!(
            c.key_value_line("optimizer", &"adamw"),
            "  optimizer: adamw"
        );
        assert_eq!(c.success_line("saved"), "ok: saved");
        assert_eq!(c.warning_line("loss is NaN"), "warning: loss is NaN");
        assert_eq!(
            c.path_line("run", Path::new("artifacts/x")),
            "  run: artifacts/x"
        );
    }

    #[test]
    fn styled_lines_are_ansi_wrapped() {
        let c = Console {
            styled: true,
            bar: None,
        };
        assert_eq!(c.success_line("saved"), "\x1b[32m✓\x1b[0m saved");
        assert_eq!(c.metric_line("loss", &2.5, ""), "  loss: \x1b[1m2.5\x1b[0m");
    }

    #[test]
    fn rates_and_hidden_progress() {
        assert_eq!(format_rate(812.4), "812 tok/s");
        assert_eq!(format_rate(12_345.0), "12.3k tok/s");
        assert_eq!(format_rate(2_500_000.0), "2.50M tok/s");
        let mut c = Console::plain();
        let p = c.progress(10, 100);
        p.update(11, 3.5, 1000.0);
        c.key_value("step", 11);
        p.finish();
    }
}
