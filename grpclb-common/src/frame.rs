//! Following the HTTP/2 frames a server writes on one connection, exactly,
//! to know where a `GOAWAY` may be slipped in.
//!
//! The tracker sees the server → client byte stream as chunks at absolute
//! offsets (bytes since the connection's first data byte, e.g. a TCP sequence
//! number minus the initial one). It knows the offset of every frame
//! boundary. A chunk that starts below what was already seen is a resend and
//! only its new tail counts; a chunk that starts above it means bytes went by
//! unseen, and the connection is untracked for good. Anything it cannot
//! vouch for (TLS, HTTP/1.1, a first frame that is not the server's SETTINGS,
//! a broken header block) also makes it untracked: an untracked connection is
//! never injected into.
//!
//! [`FrameTracker::step`] does a bounded amount of work (at most one frame
//! header or one payload run) so an eBPF program can drive it from a bounded
//! loop; [`FrameTracker::observe`] loops over it for whole chunks.

/// Bytes in an HTTP/2 frame header.
pub const FRAME_HEADER_LEN: usize = 9;

/// The `GOAWAY` grpclb injects: stream 0, last-stream-id 2^31-1 (every stream
/// the client opened may finish), error NO_ERROR. With the largest possible
/// last-stream-id, a GOAWAY the server sends later cannot raise it, which
/// clients treat as a connection error.
pub const GOAWAY: [u8; 17] = [
    0,
    0,
    8, // length
    FRAME_GOAWAY,
    0, // type, flags
    0,
    0,
    0,
    0, // stream 0
    0x7f,
    0xff,
    0xff,
    0xff, // last-stream-id
    0,
    0,
    0,
    0, // NO_ERROR
];

const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PUSH_PROMISE: u8 = 0x5;
const FRAME_GOAWAY: u8 = 0x7;
const FRAME_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

/// Where the tracker stands.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    /// Before the server's first frame, which must be SETTINGS.
    Preface = 0,
    /// Following frames.
    Frames = 1,
    /// Gave up; stays so.
    Untracked = 2,
}

/// Why a connection became untracked, for counters.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Untracked {
    No = 0,
    /// Bytes were sent that the tracker did not see.
    Gap = 1,
    /// The first frame was not the server's SETTINGS (TLS, HTTP/1.1, ...).
    NotHttp2 = 2,
    /// A frame other than CONTINUATION inside a header block.
    BrokenHeaderBlock = 3,
}

/// The state of one server → client stream. `#[repr(C)]` and `Copy` so it
/// can live in an eBPF map value; all fields are plain integers.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameTracker {
    /// Offset of the next byte not seen yet.
    next: u64,
    /// Offset where the frame being read ends (its payload's end); equal to
    /// `next` at a frame boundary.
    frame_end: u64,
    /// Completed responses: frames with END_STREAM, HEADERS (gRPC trailers,
    /// one per finished RPC).
    responses: u64,
    /// Stream of the open header block (HEADERS/PUSH_PROMISE without
    /// END_HEADERS), 0 when none is open.
    header_block_stream: u32,
    /// The frame header being collected, `header_len` bytes of it so far.
    header: [u8; FRAME_HEADER_LEN],
    header_len: u8,
    phase: u8,
    untracked: u8,
    /// A GOAWAY went by: the server's own or the injected one.
    goaway_seen: u8,
    /// grpclb injected its GOAWAY.
    injected: u8,
    _pad: [u8; 6],
}

// Three u64 offsets/counters first (8-aligned), then u32 + 9 header bytes + 5
// u8s + 6 explicit padding bytes: 48, a multiple of 8, so arrays and the
// TrackedConnection around it need no implicit padding.
layout!(FrameTracker, size 48, align 8, {
    next: u64 = 0,
    frame_end: u64 = 8,
    responses: u64 = 16,
    header_block_stream: u32 = 24,
    header: [u8; FRAME_HEADER_LEN] = 28,
    header_len: u8 = 37,
    phase: u8 = 38,
    untracked: u8 = 39,
    goaway_seen: u8 = 40,
    injected: u8 = 41,
    _pad: [u8; 6] = 42,
});

impl Default for FrameTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameTracker {
    /// A tracker for a connection whose first server byte is at offset 0.
    pub const fn new() -> Self {
        FrameTracker {
            next: 0,
            frame_end: 0,
            responses: 0,
            header_block_stream: 0,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            phase: Phase::Preface as u8,
            untracked: Untracked::No as u8,
            goaway_seen: 0,
            injected: 0,
            _pad: [0; 6],
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase {
            0 => Phase::Preface,
            1 => Phase::Frames,
            _ => Phase::Untracked,
        }
    }

    pub fn untracked_reason(&self) -> Untracked {
        match self.untracked {
            0 => Untracked::No,
            1 => Untracked::Gap,
            2 => Untracked::NotHttp2,
            _ => Untracked::BrokenHeaderBlock,
        }
    }

    /// Offset of the next byte the tracker expects.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Completed responses seen: HEADERS or DATA with END_STREAM (gRPC ends
    /// every response with trailers; a plain HTTP/2 response may end with
    /// its last DATA frame).
    pub fn responses(&self) -> u64 {
        self.responses
    }

    /// A GOAWAY went by: the server's own or the injected one.
    pub fn goaway_seen(&self) -> bool {
        self.goaway_seen != 0
    }

    pub fn injected(&self) -> bool {
        self.injected != 0
    }

    /// Feeds a whole chunk: `bytes` sent at stream offset `offset`.
    pub fn observe(&mut self, offset: u64, bytes: &[u8]) {
        let mut at = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let used = self.step(at, rest);
            if used == 0 {
                return;
            }
            at += used as u64;
            rest = &rest[used..];
        }
    }

    /// Consumes a bounded prefix of `bytes` (sent at `offset`): the part
    /// already seen, then at most one frame header or one run of payload.
    /// Returns how many bytes it consumed; 0 means it has nothing more to do
    /// with this chunk (untracked, or a gap).
    pub fn step(&mut self, offset: u64, bytes: &[u8]) -> usize {
        self.step_with(offset, bytes.len(), |header, count| {
            match (header.get_mut(..count), bytes.get(..count)) {
                (Some(to), Some(from)) => {
                    to.copy_from_slice(from);
                    true
                }
                _ => false,
            }
        })
    }

    /// [`FrameTracker::step`] for a chunk of `len` bytes the caller cannot
    /// lend as a slice (an skb): `read_start(buf, n)` copies the chunk's
    /// first `n` bytes (1..=9) into `buf` and says whether it could. A read
    /// that fails leaves bytes unseen, so the connection becomes untracked.
    pub fn step_with<R>(&mut self, offset: u64, len: usize, read_start: R) -> usize
    where
        R: FnOnce(&mut [u8; FRAME_HEADER_LEN], usize) -> bool,
    {
        if self.phase() == Phase::Untracked || len == 0 {
            return 0;
        }
        if offset > self.next {
            self.give_up(Untracked::Gap);
            return 0;
        }
        let seen = self.next - offset;
        if seen >= len as u64 {
            // A resend of bytes already accounted for.
            return len;
        }
        if seen > 0 {
            return seen as usize;
        }
        if self.next < self.frame_end {
            let run = (self.frame_end - self.next).min(len as u64);
            self.next += run;
            return run as usize;
        }
        self.collect_header(len, read_start)
    }

    /// Copies header bytes; parses the header once all 9 are in.
    fn collect_header<R>(&mut self, len: usize, read_start: R) -> usize
    where
        R: FnOnce(&mut [u8; FRAME_HEADER_LEN], usize) -> bool,
    {
        let have = self.header_len as usize;
        let take = (FRAME_HEADER_LEN.saturating_sub(have)).min(len);
        let mut chunk = [0u8; FRAME_HEADER_LEN];
        if take == 0 || !read_start(&mut chunk, take) {
            self.give_up(Untracked::Gap);
            return 0;
        }
        let mut i = 0;
        while i < FRAME_HEADER_LEN {
            if i < take && have + i < FRAME_HEADER_LEN {
                self.header[have + i] = chunk[i];
            }
            i += 1;
        }
        self.header_len += take as u8;
        self.next += take as u64;
        if self.phase() == Phase::Preface
            && !could_be_settings(&self.header, self.header_len as usize)
        {
            // Decided on the first bytes: TLS, HTTP/1.1 and the like never
            // start with a SETTINGS frame header.
            self.give_up(Untracked::NotHttp2);
            return take;
        }
        if self.header_len as usize == FRAME_HEADER_LEN {
            self.header_len = 0;
            self.frame_end = self.next + payload_len(&self.header);
            self.on_frame();
        } else {
            // Mid-header: the boundary is not where `next` is.
            self.frame_end = self.next;
        }
        take
    }

    fn on_frame(&mut self) {
        let kind = self.header[3];
        let flags = self.header[4];
        let stream = stream_id(&self.header);
        if self.phase() == Phase::Preface {
            let settings = kind == FRAME_SETTINGS && stream == 0 && flags & FLAG_ACK == 0;
            if !settings || !payload_len(&self.header).is_multiple_of(6) {
                self.give_up(Untracked::NotHttp2);
                return;
            }
            self.phase = Phase::Frames as u8;
            return;
        }
        if self.header_block_stream != 0 {
            if kind != FRAME_CONTINUATION || stream != self.header_block_stream {
                self.give_up(Untracked::BrokenHeaderBlock);
                return;
            }
            if flags & FLAG_END_HEADERS != 0 {
                self.header_block_stream = 0;
            }
            return;
        }
        if (kind == FRAME_HEADERS || kind == FRAME_DATA) && flags & FLAG_END_STREAM != 0 {
            self.responses += 1;
        }
        match kind {
            // A header block opens. A zero stream id is a protocol error; the
            // client will close the connection, so never inject.
            FRAME_HEADERS | FRAME_PUSH_PROMISE if flags & FLAG_END_HEADERS == 0 => {
                if stream == 0 {
                    self.give_up(Untracked::BrokenHeaderBlock);
                    return;
                }
                self.header_block_stream = stream;
            }
            FRAME_CONTINUATION => self.give_up(Untracked::BrokenHeaderBlock),
            FRAME_GOAWAY => self.goaway_seen = 1,
            // DATA and every other frame: only their payload to skip.
            _ => {}
        }
    }

    fn give_up(&mut self, why: Untracked) {
        self.phase = Phase::Untracked as u8;
        self.untracked = why as u8;
    }

    /// At a frame boundary at `offset` where a GOAWAY may go: after the
    /// server's SETTINGS, outside header blocks, before any GOAWAY of the
    /// server's or ours.
    pub fn can_inject_at(&self, offset: u64) -> bool {
        self.phase() == Phase::Frames
            && offset == self.next
            && self.next == self.frame_end
            && self.header_len == 0
            && self.header_block_stream == 0
            && self.goaway_seen == 0
            && self.injected == 0
    }

    /// Where a GOAWAY may go when the server has written up to `written` but
    /// sent (and the tracker seen) only up to `sent`: at `written`, if that is
    /// provably a frame boundary. With nothing unsent that is
    /// [`FrameTracker::can_inject_at`]. With bytes unsent, the tracker knows
    /// only where the frame being sent ends (its header went out whole): if
    /// the unsent bytes are exactly the rest of that frame's payload, the
    /// next byte written goes at a frame boundary. Anything more unsent holds
    /// frames the tracker has not seen, whose boundaries it cannot know.
    pub fn can_inject_after(&self, sent: u64, written: u64) -> bool {
        if written == sent {
            return self.can_inject_at(sent);
        }
        self.phase() == Phase::Frames
            && sent == self.next
            && written > sent
            && written == self.frame_end
            && self.header_len == 0
            // The frame being sent closes any header block it is part of.
            && self.header_block_stream == 0
            && self.goaway_seen == 0
            && self.injected == 0
    }

    /// Claims the one injection of this connection, to go at `written`
    /// (see [`FrameTracker::can_inject_after`]); returns false, changing
    /// nothing, where that says no. The offsets do not move: the injected
    /// bytes, once sent, are observed like any other frame (a GOAWAY, so no
    /// further injection), and if the send fails after the claim the server's
    /// own bytes still arrive where expected. Either way the tracker stays
    /// exact; a failed send only means this connection never moves.
    pub fn claim_injection(&mut self, sent: u64, written: u64) -> bool {
        if !self.can_inject_after(sent, written) {
            return false;
        }
        self.injected = 1;
        true
    }
}

/// Whether the first `have` bytes of a frame header can still be the
/// server's first SETTINGS: a payload under 64 KiB (a handful of 6-byte
/// settings), type SETTINGS, no flags (not an ACK), stream 0.
fn could_be_settings(header: &[u8; FRAME_HEADER_LEN], have: usize) -> bool {
    let mut i = 0;
    while i < have && i < FRAME_HEADER_LEN {
        let ok = match i {
            0 => header[0] == 0,
            1 | 2 => true,
            3 => header[3] == FRAME_SETTINGS,
            _ => header[i] == 0,
        };
        if !ok {
            return false;
        }
        i += 1;
    }
    true
}

fn payload_len(header: &[u8; FRAME_HEADER_LEN]) -> u64 {
    (u64::from(header[0]) << 16) | (u64::from(header[1]) << 8) | u64::from(header[2])
}

fn stream_id(header: &[u8; FRAME_HEADER_LEN]) -> u32 {
    u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn frame(kind: u8, flags: u8, stream: u32, payload_len: usize) -> Vec<u8> {
        let len = payload_len as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend((0..payload_len).map(|i| (i * 7) as u8));
        f
    }

    fn settings() -> Vec<u8> {
        frame(FRAME_SETTINGS, 0, 0, 12)
    }

    /// A server's typical unary response on `stream`: HEADERS, DATA, trailers.
    fn response(stream: u32, body: usize) -> Vec<u8> {
        let mut r = frame(FRAME_HEADERS, FLAG_END_HEADERS, stream, 20);
        r.extend(frame(FRAME_DATA, 0, stream, body));
        r.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            stream,
            15,
        ));
        r
    }

    fn tracked(bytes: &[u8]) -> FrameTracker {
        let mut t = FrameTracker::new();
        t.observe(0, bytes);
        t
    }

    #[test]
    fn the_state_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FrameTracker>(), 48);
    }

    #[test]
    fn goaway_is_a_well_formed_frame() {
        let g = tracked(&[settings(), GOAWAY.to_vec()].concat());
        assert_eq!(g.phase(), Phase::Frames);
        assert!(g.goaway_seen());
        assert_eq!(payload_len(GOAWAY[..9].try_into().unwrap()), 8);
        assert_eq!(stream_id(GOAWAY[..9].try_into().unwrap()), 0);
    }

    #[test]
    fn injectable_only_at_boundaries_after_settings() {
        let s = settings();
        let r = response(1, 100);
        let stream = [s.clone(), r.clone()].concat();
        let mut t = FrameTracker::new();
        assert!(!t.can_inject_at(0), "nothing before the server's SETTINGS");
        t.observe(0, &stream[..s.len()]);
        assert!(t.can_inject_at(s.len() as u64));
        t.observe(s.len() as u64, &stream[s.len()..s.len() + 4]);
        assert!(!t.can_inject_at(s.len() as u64 + 4), "mid-header");
        t.observe(s.len() as u64 + 4, &stream[s.len() + 4..s.len() + 40]);
        assert!(!t.can_inject_at(s.len() as u64 + 40), "mid-payload");
        t.observe(s.len() as u64 + 40, &stream[s.len() + 40..]);
        assert!(t.can_inject_at(stream.len() as u64));
        assert!(
            !t.can_inject_at(stream.len() as u64 - 1),
            "not where the stream is"
        );
        assert_eq!(t.responses(), 1);
    }

    #[test]
    fn tls_http1_and_settings_ack_first_are_untracked() {
        let client_hello = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        let http1 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let ack_first = frame(FRAME_SETTINGS, FLAG_ACK, 0, 0);
        let settings_on_stream = frame(FRAME_SETTINGS, 0, 1, 6);
        let odd_settings = frame(FRAME_SETTINGS, 0, 0, 5);
        for bytes in [
            &client_hello[..],
            &http1[..],
            &ack_first,
            &settings_on_stream,
            &odd_settings,
        ] {
            let t = tracked(bytes);
            assert_eq!(t.phase(), Phase::Untracked, "{bytes:?}");
            assert_eq!(t.untracked_reason(), Untracked::NotHttp2);
            assert!(!t.can_inject_at(bytes.len() as u64));
        }
    }

    #[test]
    fn other_protocols_are_recognised_on_their_first_byte() {
        for first in [&b"b0\n"[..], b"H", &[0x16]] {
            let t = tracked(first);
            assert_eq!(t.untracked_reason(), Untracked::NotHttp2, "{first:?}");
        }
        // Three bytes that can still start the server's SETTINGS.
        assert_eq!(tracked(&[0, 0, 12]).phase(), Phase::Preface);
    }

    #[test]
    fn header_blocks_with_continuation_are_not_injectable_until_they_end() {
        let s = settings();
        let headers = frame(FRAME_HEADERS, 0, 3, 16_000);
        let cont = frame(FRAME_CONTINUATION, 0, 3, 16_000);
        let last = frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, 500);
        let mut t = tracked(&s);
        let mut at = s.len() as u64;
        for f in [&headers, &cont] {
            t.observe(at, f);
            at += f.len() as u64;
            assert!(!t.can_inject_at(at), "inside the header block");
        }
        t.observe(at, &last);
        at += last.len() as u64;
        assert!(t.can_inject_at(at));
    }

    #[test]
    fn a_foreign_frame_inside_a_header_block_untracks() {
        let stream = [
            settings(),
            frame(FRAME_HEADERS, 0, 3, 10),
            frame(FRAME_DATA, 0, 3, 10),
        ]
        .concat();
        let t = tracked(&stream);
        assert_eq!(t.untracked_reason(), Untracked::BrokenHeaderBlock);
        let wrong_stream = [
            settings(),
            frame(FRAME_HEADERS, 0, 3, 10),
            frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 5, 10),
        ]
        .concat();
        assert_eq!(tracked(&wrong_stream).phase(), Phase::Untracked);
        let stray = [
            settings(),
            frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 5, 1),
        ]
        .concat();
        assert_eq!(tracked(&stray).phase(), Phase::Untracked);
    }

    #[test]
    fn a_plain_http2_response_ends_with_its_last_data_frame() {
        let stream = [
            settings(),
            frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, 20),
            frame(FRAME_DATA, 0, 1, 100),
            frame(FRAME_DATA, FLAG_END_STREAM, 1, 100),
        ]
        .concat();
        assert_eq!(tracked(&stream).responses(), 1);
    }

    #[test]
    fn never_after_the_servers_goaway_and_only_once() {
        let s = settings();
        let t = tracked(&[s.clone(), GOAWAY.to_vec(), response(1, 5)].concat());
        assert!(!t.can_inject_at(t.next_offset()));

        let mut t = tracked(&s);
        let at = s.len() as u64;
        assert!(t.claim_injection(at, at));
        assert!(!t.claim_injection(at, at), "a second GOAWAY");
        // The injected bytes go out, then the server's continue after them.
        t.observe(at, &GOAWAY);
        let r = response(1, 64);
        t.observe(at + 17, &r);
        assert_eq!(t.phase(), Phase::Frames);
        assert_eq!(t.responses(), 1);
        assert!(t.goaway_seen());
        assert!(!t.can_inject_at(t.next_offset()));
    }

    #[test]
    fn a_claimed_injection_that_was_never_sent_leaves_the_tracker_exact() {
        let s = settings();
        let mut t = tracked(&s);
        let at = s.len() as u64;
        assert!(t.claim_injection(at, at));
        let r = response(1, 64);
        t.observe(at, &r);
        assert_eq!(t.phase(), Phase::Frames);
        assert_eq!(t.responses(), 1);
        assert!(
            !t.can_inject_at(t.next_offset()),
            "claimed once, never again"
        );
    }

    #[test]
    fn with_bytes_unsent_only_the_end_of_the_frame_being_sent() {
        let s = settings();
        let data = frame(FRAME_DATA, 0, 1, 1000);
        let next = frame(FRAME_DATA, FLAG_END_STREAM, 1, 10);
        let stream = [s.clone(), data.clone(), next.clone()].concat();
        let data_end = (s.len() + data.len()) as u64;
        let mut t = FrameTracker::new();
        // Sent: SETTINGS, the DATA header and 100 payload bytes.
        let sent = s.len() + 9 + 100;
        t.observe(0, &stream[..sent]);
        let sent = sent as u64;
        assert!(
            t.can_inject_after(sent, data_end),
            "the rest of this frame unsent"
        );
        assert!(!t.can_inject_after(sent, data_end - 1), "inside the frame");
        assert!(
            !t.can_inject_after(sent, stream.len() as u64),
            "a frame beyond the one being sent: its boundaries are unknown"
        );
        assert!(
            !t.can_inject_after(sent - 1, data_end),
            "not where the tracker is"
        );
        // Mid-header: where the frame ends is not known yet.
        let mut t = FrameTracker::new();
        t.observe(0, &stream[..s.len() + 4]);
        assert!(!t.can_inject_after(s.len() as u64 + 4, data_end));
        // Inside a header block the frame's end is no boundary for a GOAWAY.
        let block = [s.clone(), frame(FRAME_HEADERS, 0, 3, 100)].concat();
        let mut t = FrameTracker::new();
        t.observe(0, &block[..block.len() - 50]);
        assert!(!t.can_inject_after(block.len() as u64 - 50, block.len() as u64));
        let mut t = FrameTracker::new();
        t.observe(0, &stream[..sent as usize]);
        assert!(t.claim_injection(sent, data_end));
        assert!(!t.claim_injection(data_end, data_end), "once");
        t.observe(sent, &stream[sent as usize..data_end as usize]);
        t.observe(data_end, &GOAWAY);
        t.observe(data_end + 17, &next);
        assert_eq!(t.phase(), Phase::Frames);
        assert!(t.goaway_seen());
        assert_eq!(t.responses(), 1);
    }

    #[test]
    fn injection_elsewhere_changes_nothing() {
        let s = settings();
        let mut t = tracked(&s[..5]);
        let before = t;
        assert!(!t.claim_injection(5, 5));
        assert_eq!(t, before);
    }

    #[test]
    fn resends_are_skipped_and_gaps_untrack() {
        let stream = [settings(), response(1, 300), response(3, 10)].concat();
        let mut t = FrameTracker::new();
        t.observe(0, &stream[..200]);
        // A failed push: the application sends bytes 150.. again.
        t.observe(150, &stream[150..260]);
        t.observe(100, &stream[100..120]);
        t.observe(260, &stream[260..]);
        assert_eq!(t, tracked(&stream));

        let mut t = FrameTracker::new();
        t.observe(0, &stream[..200]);
        t.observe(201, &stream[201..]);
        assert_eq!(t.untracked_reason(), Untracked::Gap);
        t.observe(200, &stream[200..]);
        assert_eq!(t.phase(), Phase::Untracked, "untracked is for good");
    }

    #[test]
    fn step_does_bounded_work() {
        let stream = [settings(), response(1, 1 << 20)].concat();
        let mut t = FrameTracker::new();
        let mut at = 0;
        let mut steps = 0;
        while (at as usize) < stream.len() {
            let used = t.step(at, &stream[at as usize..]);
            assert!(used > 0);
            at += used as u64;
            steps += 1;
        }
        // Four headers and three payload runs, however large the payloads.
        assert_eq!(steps, 8);
    }

    /// A frame of the server → client stream, for property tests.
    #[derive(Clone, Debug)]
    enum Frame {
        Data {
            stream: u32,
            len: usize,
            end_stream: bool,
        },
        Headers {
            stream: u32,
            end_stream: bool,
            continuations: Vec<usize>,
        },
        Settings(bool),
        Ping,
        Unknown(u8, usize),
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            4 => (1u32..9, 0usize..3000, any::<bool>())
                .prop_map(|(s, n, e)| Frame::Data { stream: s * 2 + 1, len: n, end_stream: e }),
            4 => (1u32..9, any::<bool>(), proptest::collection::vec(0usize..200, 0..3))
                .prop_map(|(s, e, c)| Frame::Headers { stream: s * 2 + 1, end_stream: e, continuations: c }),
            1 => any::<bool>().prop_map(Frame::Settings),
            1 => Just(Frame::Ping),
            1 => (0x0au8..0xff, 0usize..50).prop_map(|(k, n)| Frame::Unknown(k, n)),
        ]
    }

    /// The stream's bytes, and the offsets where a GOAWAY may go.
    fn encode(frames: &[Frame]) -> (Vec<u8>, Vec<u64>, u64) {
        let mut bytes = settings();
        let mut boundaries = vec![bytes.len() as u64];
        let mut responses = 0;
        for f in frames {
            match f {
                Frame::Data {
                    stream,
                    len,
                    end_stream,
                } => {
                    responses += u64::from(*end_stream);
                    let flags = if *end_stream { FLAG_END_STREAM } else { 0 };
                    bytes.extend(frame(FRAME_DATA, flags, *stream, *len));
                }
                Frame::Headers {
                    stream,
                    end_stream,
                    continuations,
                } => {
                    let mut flags = if *end_stream { FLAG_END_STREAM } else { 0 };
                    if continuations.is_empty() {
                        flags |= FLAG_END_HEADERS;
                    }
                    responses += u64::from(*end_stream);
                    bytes.extend(frame(FRAME_HEADERS, flags, *stream, 30));
                    for (i, n) in continuations.iter().enumerate() {
                        let last = i + 1 == continuations.len();
                        let flags = if last { FLAG_END_HEADERS } else { 0 };
                        bytes.extend(frame(FRAME_CONTINUATION, flags, *stream, *n));
                    }
                }
                Frame::Settings(ack) => {
                    let (flags, n) = if *ack { (FLAG_ACK, 0) } else { (0, 6) };
                    bytes.extend(frame(FRAME_SETTINGS, flags, 0, n));
                }
                Frame::Ping => bytes.extend(frame(0x6, 0, 0, 8)),
                Frame::Unknown(k, n) => bytes.extend(frame(*k, 0, 0, *n)),
            }
            boundaries.push(bytes.len() as u64);
        }
        (bytes, boundaries, responses)
    }

    /// Splits `len` bytes into chunks at the given cut points.
    fn chunks(len: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
        points.push(0);
        points.push(len);
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| (w[0], w[1])).collect()
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_boundaries_and_counts(
            frames in proptest::collection::vec(any_frame(), 0..20),
            cuts in proptest::collection::vec(any::<usize>(), 0..40),
        ) {
            let (bytes, boundaries, responses) = encode(&frames);
            let whole = tracked(&bytes);
            let mut t = FrameTracker::new();
            let mut injectable = Vec::new();
            for (start, end) in chunks(bytes.len(), &cuts) {
                t.observe(start as u64, &bytes[start..end]);
                let end = end as u64;
                if t.can_inject_at(end) {
                    injectable.push(end);
                }
                // Each generated frame ends outside any header block.
                prop_assert_eq!(t.can_inject_at(end), boundaries.contains(&end), "at {}", end);
            }
            prop_assert_eq!(t, whole);
            prop_assert_eq!(t.phase(), Phase::Frames);
            prop_assert_eq!(t.responses(), responses);
            // Every place it said yes is a frame boundary outside a header block.
            for at in &injectable {
                prop_assert!(boundaries.contains(at), "injectable inside a frame at {}", at);
            }
        }

        #[test]
        fn with_bytes_unsent_yes_only_at_a_generated_frame_end(
            frames in proptest::collection::vec(any_frame(), 1..12),
            sent in any::<usize>(),
            written in any::<usize>(),
        ) {
            let (bytes, boundaries, _) = encode(&frames);
            let sent = sent % (bytes.len() + 1);
            let written = sent + written % (bytes.len() - sent + 1);
            let t = tracked(&bytes[..sent]);
            if t.can_inject_after(sent as u64, written as u64) {
                prop_assert!(
                    boundaries.contains(&(written as u64)),
                    "sent {}, written {}: not a frame end", sent, written
                );
            }
        }

        #[test]
        fn resending_any_earlier_range_changes_nothing(
            frames in proptest::collection::vec(any_frame(), 1..12),
            split in any::<usize>(),
            resend in (any::<usize>(), any::<usize>()),
        ) {
            let (bytes, _, _) = encode(&frames);
            let split = split % (bytes.len() + 1);
            let mut t = FrameTracker::new();
            t.observe(0, &bytes[..split]);
            let (a, b) = (resend.0 % (split + 1), resend.1 % (split + 1));
            let (a, b) = (a.min(b), a.max(b));
            t.observe(a as u64, &bytes[a..b]);
            t.observe(split as u64, &bytes[split..]);
            prop_assert_eq!(t, tracked(&bytes));
        }

        #[test]
        fn a_gap_always_ends_untracked(
            frames in proptest::collection::vec(any_frame(), 1..12),
            skip_from in any::<usize>(),
            skip_len in 1usize..100,
        ) {
            let (bytes, _, _) = encode(&frames);
            let from = skip_from % bytes.len();
            let to = (from + skip_len).min(bytes.len());
            let mut t = FrameTracker::new();
            t.observe(0, &bytes[..from]);
            t.observe(to as u64, &bytes[to..]);
            if to < bytes.len() {
                prop_assert_eq!(t.phase(), Phase::Untracked);
                prop_assert!(!t.can_inject_at(t.next_offset()));
            }
        }
    }
}
