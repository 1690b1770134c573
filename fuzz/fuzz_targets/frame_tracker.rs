//! Arbitrary bytes, cut into chunks fed at arbitrary (resent, gapped or
//! in-order) offsets. Checks: no panic; the tracker never claims a place to
//! inject unless it is exactly where the stream is; untracked is for good;
//! and feeding the same bytes in order, whole, agrees with feeding them in
//! pieces whenever the pieces left no gap (on everything that still matters
//! once untracked: the reason and the responses counted).

#![no_main]

use grpclb_common::frame::{FrameTracker, Phase};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first bytes steer the chunking, the rest is the stream.
    let Some((&steer, stream)) = input.split_first() else { return };
    let mut pieces = FrameTracker::new();
    let mut at = 0usize;
    let mut gapped = false;
    let mut untracked_seen = false;
    let mut i = 0usize;
    while at < stream.len() {
        let knob = stream[(i * 31 + steer as usize) % stream.len()] as usize;
        i += 1;
        let len = 1 + knob % 97;
        // Mostly in order; sometimes back (a resend), sometimes ahead (a gap).
        let start = match knob % 11 {
            0 => at.saturating_sub(knob % 40),
            1 => {
                gapped = true;
                (at + 1).min(stream.len())
            }
            _ => at,
        };
        // A resend reaches at least one new byte, so every chunk makes progress.
        let end = (start + len).max(at + 1).min(stream.len());
        if start >= end {
            break;
        }
        pieces.observe(start as u64, &stream[start..end]);
        if untracked_seen {
            assert_eq!(pieces.phase(), Phase::Untracked, "untracked is for good");
        }
        untracked_seen |= pieces.phase() == Phase::Untracked;
        let next = pieces.next_offset();
        assert!(!pieces.can_inject_at(next + 1) && !pieces.can_inject_at(next.wrapping_sub(1)));
        at = at.max(end);
    }
    if !gapped && at == stream.len() {
        let mut whole = FrameTracker::new();
        whole.observe(0, stream);
        if whole.phase() == Phase::Untracked {
            // Where it stopped reading is bookkeeping: untracked is final.
            assert_eq!(pieces.phase(), Phase::Untracked);
            assert_eq!(pieces.untracked_reason(), whole.untracked_reason());
            assert_eq!(pieces.responses(), whole.responses());
        } else {
            assert_eq!(pieces, whole);
        }
    }
});
