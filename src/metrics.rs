//! Aggregate counters, written to the log on `SIGUSR1`.
//!
//! Contract: counters only grow (except `active`); they are updated when a connection is
//! accepted and when it ends, never per byte moved, so they cost nothing on the hot path.

use crate::conn::machine::End;

#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub accepted: u64,
    pub active: u64,
    pub peak_active: u64,
    pub completed: u64,
    pub reset: u64,
    pub errors: u64,
    pub aborted: u64,
    pub refused_403: u64,
    pub refused_500: u64,
    pub refused_502: u64,
    pub refused_503: u64,
    pub refused_504: u64,
    pub bytes_to_daemon: u64,
    pub bytes_from_daemon: u64,
    pub accept_errors: u64,
}

impl Counters {
    pub fn opened(&mut self) {
        self.accepted += 1;
        self.active += 1;
        self.peak_active = self.peak_active.max(self.active);
    }

    pub fn closed(&mut self, end: &End, bytes_up: u64, bytes_down: u64) {
        self.active = self.active.saturating_sub(1);
        self.bytes_to_daemon += bytes_up;
        self.bytes_from_daemon += bytes_down;
        match end {
            End::Completed => self.completed += 1,
            End::Reset(_) => self.reset += 1,
            End::Failed(..) => self.errors += 1,
            End::Aborted => self.aborted += 1,
            End::Refused(refusal) => match refusal.status() {
                403 => self.refused_403 += 1,
                502 => self.refused_502 += 1,
                503 => self.refused_503 += 1,
                504 => self.refused_504 += 1,
                _ => self.refused_500 += 1,
            },
        }
    }

    /// One `key=value` line with every counter; `live` gives the bytes each open connection has
    /// moved so far (to the daemon, from the daemon), so long streams are counted too.
    pub fn summary(&self, live: impl Iterator<Item = (u64, u64)>) -> String {
        let (live_up, live_down) = live.fold((0, 0), |(up, down), (u, d)| (up + u, down + d));
        format!(
            "counters accepted={} active={} peak_active={} completed={} reset={} errors={} \
             aborted={} refused_403={} refused_500={} refused_502={} refused_503={} \
             refused_504={} bytes_to_daemon={} bytes_from_daemon={} accept_errors={}",
            self.accepted,
            self.active,
            self.peak_active,
            self.completed,
            self.reset,
            self.errors,
            self.aborted,
            self.refused_403,
            self.refused_500,
            self.refused_502,
            self.refused_503,
            self.refused_504,
            self.bytes_to_daemon + live_up,
            self.bytes_from_daemon + live_down,
            self.accept_errors
        )
    }
}
