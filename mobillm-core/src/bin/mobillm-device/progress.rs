//! How the CLI shows a fine-tune's progress: a bar per phase on a terminal; elsewhere (a log, a pipe, the demo's
//! output) one line when the phase or round changes and at most one every five seconds otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use mobillm_core::fine_tune::{Mode, Phase, Progress};
use mobillm_core::memory;

/// Quiet time between two lines of the same phase, off a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct ProgressReport {
    started: Instant,
    mode: Mode,
    bar: Option<ProgressBar>,
    terminal: bool,
    current: Option<(Phase, usize)>,
    /// The current phase's last line said it was complete (polling repeats that report).
    complete_shown: bool,
    last_line: Instant,
}

fn title(p: &Progress, mode: Mode) -> String {
    let local = mode == Mode::Local;
    match p.phase {
        Phase::Secrets => "drawing secrets".into(),
        Phase::Forward if local => "forward".into(),
        Phase::Forward => format!("forward + upload (pass {})", p.round),
        Phase::Train if local => format!("device training, round {}", p.round),
        Phase::Train => format!("server training, round {}", p.round),
        Phase::Targets => format!("round {}: new targets", p.round),
        Phase::Refit => format!("refit on every example, round {}", p.round),
        Phase::Evaluate => "held-out forward".into(),
        Phase::Done => "done".into(),
    }
}

fn details(p: &Progress) -> String {
    let loss = p.loss.map(|l| format!(" loss {l:.4}")).unwrap_or_default();
    let rss = memory::current_rss_mb().map(|m| format!(" [rss {m:.0} MB]")).unwrap_or_default();
    format!("{loss}{rss}")
}

impl ProgressReport {
    pub fn new(started: Instant, mode: Mode) -> Self {
        Self {
            started,
            mode,
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            current: None,
            complete_shown: false,
            last_line: started,
        }
    }

    pub fn show(&mut self, p: &Progress) {
        let phase = (p.phase, p.round);
        let changed = self.current != Some(phase);
        self.current = Some(phase);
        if changed {
            self.complete_shown = false;
        }
        let complete = p.done == p.total;
        if self.terminal {
            if changed {
                if let Some(bar) = self.bar.take() {
                    bar.finish();
                }
                let bar = ProgressBar::new(p.total as u64).with_prefix(title(p, self.mode));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:38} [{bar:30}] {pos}/{len} {elapsed_precise}{msg}")
                        .expect("a valid template")
                        .progress_chars("=> "),
                );
                self.bar = Some(bar);
            }
            if let Some(bar) = &self.bar {
                bar.set_length(p.total as u64);
                bar.set_position(p.done as u64);
                bar.set_message(details(p));
            }
        } else if changed || (complete && !self.complete_shown) || self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            self.complete_shown = complete;
            let t = self.started.elapsed().as_secs_f64();
            eprintln!("[{t:7.1}s] {} {}/{}{}", title(p, self.mode), p.done, p.total, details(p));
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
