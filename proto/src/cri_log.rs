//! The kubelet CRI container log: its record format and the file it lives in.
//!
//! This module owns two things:
//!
//! * the CRI log record format, one record per line:
//!   `<RFC3339Nano UTC timestamp> <stdout|stderr> <P|F> <text>\n`, with lines
//!   longer than [`MAX_LINE_SIZE`] split into `P` (partial) chunks ended by an
//!   `F` (full) one, as containerd writes them and kubelet reads them;
//! * the log file itself ([`CriLogFile`]): opened for append, shared by the
//!   stdout and stderr copiers of one container, and reopened on kubelet's
//!   request after kubelet has renamed it for rotation.
//!
//! It must not touch processes or create pipes: the caller hands
//! [`copy_lines`] the read end of a container's stdout or stderr, runs it on a
//! thread of its own, and decides what to do when it returns. The caller also
//! owns the log directory (kubelet creates it); nothing here creates
//! directories.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use log::{info, warn};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Longest text of one record: containerd's default
/// `max_container_log_line_size`. Longer lines are split into several records.
pub const MAX_LINE_SIZE: usize = 16 * 1024;

/// Large enough that a busy container's pipe (64 KiB by default) drains in a
/// couple of reads, small enough to live per copier thread without concern.
const READ_BUFFER_SIZE: usize = 32 * 1024;

/// What containerd creates CRI logs with: group read for node log shippers,
/// nothing for others, since container output may carry secrets.
const LOG_FILE_MODE: u32 = 0o640;

/// `2006-01-02T15:04:05.999999999Z` is 30 bytes and ` stdout P ` 10; the
/// rest is slack.
const HEADER_CAPACITY: usize = 48;

/// Which of the container's output streams a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// The bytes between the timestamp and the text, so that a header is two
    /// copies rather than a formatter run.
    fn separator(self, partial: bool) -> &'static [u8] {
        match (self, partial) {
            (Stream::Stdout, false) => b" stdout F ",
            (Stream::Stdout, true) => b" stdout P ",
            (Stream::Stderr, false) => b" stderr F ",
            (Stream::Stderr, true) => b" stderr P ",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Failures to open the CRI log file. The message names the path because the
/// error usually ends up in a ttrpc reply or the shim's log, far from the
/// call that knew it.
#[derive(Debug, thiserror::Error)]
pub enum CriLogError {
    #[error("cannot open CRI log file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "cannot reopen CRI log file {} (still writing to the previous file): {source}",
        path.display()
    )]
    Reopen { path: PathBuf, source: io::Error },
}

/// A container's CRI log file, shared by its stdout and stderr copiers.
///
/// Every record is written while holding one lock, so records of the two
/// streams never interleave within a line, and `reopen` swaps the file
/// between two records, never inside one.
#[derive(Debug)]
pub struct CriLogFile {
    path: PathBuf,
    sink: Mutex<Sink>,
}

#[derive(Debug)]
struct Sink {
    file: File,
    /// The last write failed after writing part of a record, so the file does
    /// not end with a newline. The next record starts with one, so it is not
    /// glued onto the torn line: kubelet's reader logs and skips a line it
    /// cannot parse, or shows a cut one truncated, and goes on.
    torn: bool,
}

impl CriLogFile {
    /// Opens (creating if needed) the log file at `path` for appending.
    pub fn open(path: &Path) -> Result<Self, CriLogError> {
        let file = open_append(path).map_err(|source| CriLogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(CriLogFile {
            path: path.to_path_buf(),
            sink: Mutex::new(Sink { file, torn: false }),
        })
    }

    /// The path the file was opened at, and is reopened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the path anew and makes it the target of all later records.
    ///
    /// kubelet renames the file before asking for this, so the old handle
    /// points at the rotated file. If opening fails, records keep going to
    /// the old handle: a rotated file that keeps growing beats losing output.
    pub fn reopen(&self) -> Result<(), CriLogError> {
        let file = open_append(&self.path).map_err(|source| CriLogError::Reopen {
            path: self.path.clone(),
            source,
        })?;
        let old = {
            let mut sink = self.lock();
            // A torn line belongs to the old file; the new one starts clean.
            sink.torn = false;
            std::mem::replace(&mut sink.file, file)
        };
        // Closed outside the lock so the copiers are not held up by it.
        drop(old);
        Ok(())
    }

    /// Writes one record (the caller has already split the line).
    fn write_record(&self, stream: Stream, partial: bool, text: &[u8]) -> io::Result<()> {
        let mut header = [0u8; HEADER_CAPACITY];
        let mut sink = self.lock();
        // Stamped under the lock so timestamps never go backwards in file
        // order (short of a wall-clock step); it costs a vDSO clock read and
        // about a hundred nanoseconds of formatting.
        let header_len = format_header(&mut header, OffsetDateTime::now_utc(), stream, partial)?;
        let Sink { file, torn } = &mut *sink;
        write_record_to(file, torn, &header[..header_len], text)
    }

    fn lock(&self) -> MutexGuard<'_, Sink> {
        // A copier that panicked mid-write leaves at worst a torn line, and
        // the other stream's copier must go on draining its pipe regardless.
        self.sink.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    // std opens every file with O_CLOEXEC, so the log fd does not leak into
    // runc or the container; `append` gives O_APPEND, `create` O_CREAT.
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_FILE_MODE)
        .open(path)
}

/// Formats `<timestamp> <stream> <P|F> ` into `buf` and returns its length.
///
/// The `time` crate rather than hand formatting: the workspace already
/// depends on it, its RFC 3339 formatter trims the fraction's trailing zeros
/// exactly as Go's RFC3339Nano does (what containerd writes), and it formats
/// into a stack buffer without allocating. Its `format_into` return value
/// under-counts when there is a fraction (time 0.3.55), so the length is
/// taken from how far the output slice advanced instead.
fn format_header(
    buf: &mut [u8; HEADER_CAPACITY],
    now: OffsetDateTime,
    stream: Stream,
    partial: bool,
) -> io::Result<usize> {
    let mut rest: &mut [u8] = &mut buf[..];
    now.format_into(&mut rest, &Rfc3339)
        .map_err(io::Error::other)?;
    rest.write_all(stream.separator(partial))?;
    Ok(HEADER_CAPACITY - rest.len())
}

/// Writes `header`, `text` and the newline with as few `writev` calls as the
/// file allows (one, unless the disk fills up or a signal interrupts), so a
/// record costs one system call and no copy of its text.
fn write_record_to(
    out: &mut impl Write,
    torn: &mut bool,
    header: &[u8],
    text: &[u8],
) -> io::Result<()> {
    let mut storage = [
        IoSlice::new(b"\n"),
        IoSlice::new(header),
        IoSlice::new(text),
        IoSlice::new(b"\n"),
    ];
    let lead = usize::from(*torn);
    let mut slices: &mut [IoSlice<'_>] = &mut storage[1 - lead..];
    let mut written = 0usize;
    while !slices.is_empty() {
        let err = match out.write_vectored(slices) {
            Ok(0) => io::Error::from(ErrorKind::WriteZero),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut slices, n);
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => e,
        };
        // The file ends on a line boundary only if nothing was written or
        // exactly the leading newline that closed an earlier torn line.
        *torn = written != lead;
        return Err(err);
    }
    *torn = false;
    Ok(())
}

/// Reads `input` until EOF and writes every line to `log` as `stream`.
///
/// Returns when `input` reaches EOF (the process closed its end) or on a read
/// error other than EINTR; in both cases a pending line without a newline is
/// written first, as a full record. A failing write to the log (disk full,
/// file removed) does not stop the copy: the record is dropped and reading
/// goes on, so the container never blocks on a full pipe. Each streak of
/// failed writes is reported once with `warn!`, and its end (with the number
/// of records dropped) with `info!`.
///
/// `input` must be blocking: `WouldBlock` is a read error like any other.
pub fn copy_lines(input: impl Read, stream: Stream, log: &CriLogFile) -> io::Result<()> {
    let mut drops = DropTracker::default();
    let result = copy_lines_tracked(input, stream, log, &mut drops);
    drops.finish(log.path(), stream);
    result
}

fn copy_lines_tracked(
    mut input: impl Read,
    stream: Stream,
    log: &CriLogFile,
    drops: &mut DropTracker,
) -> io::Result<()> {
    // On the heap: copier threads may run with small stacks.
    let mut buf = vec![0u8; READ_BUFFER_SIZE];
    let mut splitter = LineSplitter::new();
    let mut emit = |partial: bool, text: &[u8]| {
        let result = log.write_record(stream, partial, text);
        drops.record(log.path(), stream, result);
    };
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => splitter.push(&buf[..n], &mut emit),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                splitter.finish(&mut emit);
                return Err(e);
            }
        }
    }
    splitter.finish(&mut emit);
    Ok(())
}

/// Cuts a byte stream into record texts: lines without their `\n`, and lines
/// longer than [`MAX_LINE_SIZE`] into chunks of that size.
///
/// Texts are handed out straight from the read buffer when a line lies
/// within one read; only a line that spans reads is copied, into `carry`,
/// whose capacity is reserved once.
struct LineSplitter {
    /// The start of a line whose end has not been read yet. Never holds a
    /// newline, never more than `MAX_LINE_SIZE` bytes.
    carry: Vec<u8>,
}

impl LineSplitter {
    fn new() -> Self {
        LineSplitter {
            carry: Vec::with_capacity(MAX_LINE_SIZE),
        }
    }

    /// Emits `(partial, text)` for every record completed by `data`.
    fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(bool, &[u8])) {
        while !data.is_empty() {
            if self.carry.len() == MAX_LINE_SIZE {
                // A full chunk waits for the next byte: if that is the
                // newline, the chunk ends the line and is `F`, not `P`
                // followed by an empty `F`.
                let ends_line = data[0] == b'\n';
                emit(!ends_line, &self.carry);
                self.carry.clear();
                if ends_line {
                    data = &data[1..];
                }
                continue;
            }
            let room = MAX_LINE_SIZE - self.carry.len();
            let window = &data[..data.len().min(room)];
            if let Some(i) = find_newline(window) {
                self.emit_joined(false, &data[..i], emit);
                data = &data[i + 1..];
            } else if data.len() > room {
                let ends_line = data[room] == b'\n';
                self.emit_joined(!ends_line, &data[..room], emit);
                data = &data[room + usize::from(ends_line)..];
            } else {
                self.carry.extend_from_slice(data);
                data = &[];
            }
        }
    }

    /// Emits what is left at the end of the input as a full record.
    fn finish(&mut self, emit: &mut impl FnMut(bool, &[u8])) {
        if !self.carry.is_empty() {
            emit(false, &self.carry);
            self.carry.clear();
        }
    }

    fn emit_joined(&mut self, partial: bool, tail: &[u8], emit: &mut impl FnMut(bool, &[u8])) {
        if self.carry.is_empty() {
            emit(partial, tail);
        } else {
            self.carry.extend_from_slice(tail);
            emit(partial, &self.carry);
            self.carry.clear();
        }
    }
}

/// libc's memchr scans a word or a vector at a time; a byte loop would make
/// newline search the most expensive part of copying long lines.
fn find_newline(haystack: &[u8]) -> Option<usize> {
    // An empty slice's pointer may dangle, which C does not allow even for
    // a zero length.
    if haystack.is_empty() {
        return None;
    }
    // SAFETY: the pointer and length come from a live slice and memchr reads
    // only within them; the result is null or points into the slice.
    let found = unsafe {
        libc::memchr(
            haystack.as_ptr().cast(),
            libc::c_int::from(b'\n'),
            haystack.len(),
        )
    };
    if found.is_null() {
        None
    } else {
        Some(found as usize - haystack.as_ptr() as usize)
    }
}

/// Keeps a failing log from flooding the shim's own log: one warning when
/// writes start failing, one note when they recover or the copy ends.
#[derive(Debug, Default)]
struct DropTracker {
    /// Records dropped since the last successful write.
    in_streak: u64,
    /// Records dropped over the whole copy.
    total: u64,
    /// Streaks of failed writes, which is also the number of warnings logged.
    streaks: u64,
}

impl DropTracker {
    fn record(&mut self, path: &Path, stream: Stream, result: io::Result<()>) {
        match result {
            Ok(()) => {
                if self.in_streak > 0 {
                    info!(
                        "CRI log {}: {stream} records are written again, {} dropped meanwhile",
                        path.display(),
                        self.in_streak
                    );
                    self.in_streak = 0;
                }
            }
            Err(e) => {
                if self.in_streak == 0 {
                    self.streaks += 1;
                    warn!(
                        "CRI log {}: cannot write {stream} record, dropping records until \
                         writes succeed again: {e}",
                        path.display()
                    );
                }
                self.in_streak += 1;
                self.total += 1;
            }
        }
    }

    fn finish(&mut self, path: &Path, stream: Stream) {
        if self.in_streak > 0 {
            info!(
                "CRI log {}: {stream} ended with writes still failing, {} records dropped \
                 ({} over the whole copy)",
                path.display(),
                self.in_streak,
                self.total
            );
            self.in_streak = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::fs;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// One parsed line of a CRI log file.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Record {
        timestamp: String,
        stream: String,
        partial: bool,
        text: Vec<u8>,
    }

    fn parse_line(line: &[u8]) -> Record {
        let mut parts = line.splitn(4, |&b| b == b' ');
        let timestamp = parts.next().unwrap();
        let stream = parts.next().unwrap();
        let tag = parts.next().unwrap();
        let text = parts
            .next()
            .unwrap_or_else(|| panic!("record without text field: {line:?}"));
        let partial = match tag {
            b"P" => true,
            b"F" => false,
            other => panic!("bad tag {other:?} in {line:?}"),
        };
        let stream = String::from_utf8(stream.to_vec()).unwrap();
        assert!(
            stream == "stdout" || stream == "stderr",
            "bad stream {stream:?}"
        );
        assert!(!text.contains(&b'\n'));
        Record {
            timestamp: String::from_utf8(timestamp.to_vec()).unwrap(),
            stream,
            partial,
            text: text.to_vec(),
        }
    }

    fn read_records(path: &Path) -> Vec<Record> {
        let data = fs::read(path).unwrap();
        if data.is_empty() {
            return Vec::new();
        }
        assert_eq!(data.last(), Some(&b'\n'), "file does not end with newline");
        data[..data.len() - 1]
            .split(|&b| b == b'\n')
            .map(parse_line)
            .collect()
    }

    /// Joins P…F sequences of one stream back into lines, checking that no
    /// sequence is left open.
    fn join_lines(records: &[Record], stream: &str) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        let mut current = Vec::new();
        let mut open = false;
        for r in records.iter().filter(|r| r.stream == stream) {
            current.extend_from_slice(&r.text);
            open = r.partial;
            if !r.partial {
                lines.push(std::mem::take(&mut current));
            }
        }
        assert!(!open, "{stream} ends with a partial record");
        lines
    }

    /// Hands out `data` in reads whose sizes cycle through `sizes`.
    struct ChunkedReader {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        next: usize,
    }

    impl ChunkedReader {
        fn new(data: &[u8], sizes: &[usize]) -> Self {
            ChunkedReader {
                data: data.to_vec(),
                pos: 0,
                sizes: sizes.to_vec(),
                next: 0,
            }
        }
    }

    impl Read for ChunkedReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let size = self.sizes[self.next % self.sizes.len()];
            self.next += 1;
            let n = size.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    enum Step<'a> {
        Data(&'a [u8]),
        Fail(io::Error),
        Run(Box<dyn FnOnce() + 'a>),
    }

    /// Plays a script of reads, errors and side effects (run between reads).
    struct ScriptReader<'a> {
        steps: VecDeque<Step<'a>>,
    }

    impl<'a> ScriptReader<'a> {
        fn new(steps: Vec<Step<'a>>) -> Self {
            ScriptReader {
                steps: steps.into(),
            }
        }
    }

    impl Read for ScriptReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                match self.steps.pop_front() {
                    None => return Ok(0),
                    Some(Step::Data(d)) => {
                        assert!(d.len() <= buf.len());
                        buf[..d.len()].copy_from_slice(d);
                        return Ok(d.len());
                    }
                    Some(Step::Fail(e)) => return Err(e),
                    Some(Step::Run(f)) => f(),
                }
            }
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, CriLogFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = CriLogFile::open(&path).unwrap();
        (dir, path, log)
    }

    fn copy_in_chunks(data: &[u8], sizes: &[usize], stream: Stream) -> Vec<Record> {
        let (_dir, path, log) = setup();
        copy_lines(ChunkedReader::new(data, sizes), stream, &log).unwrap();
        read_records(&path)
    }

    fn tags(records: &[Record]) -> String {
        records
            .iter()
            .map(|r| if r.partial { 'P' } else { 'F' })
            .collect()
    }

    fn texts(records: &[Record]) -> Vec<&[u8]> {
        records.iter().map(|r| r.text.as_slice()).collect()
    }

    /// Read patterns that hit the splitter's different paths: all at once,
    /// a trickle, and sizes around the chunk limit.
    const READ_PATTERNS: &[&[usize]] = &[
        &[usize::MAX],
        &[1, 2, 3],
        &[4096],
        &[MAX_LINE_SIZE - 1],
        &[MAX_LINE_SIZE],
        &[MAX_LINE_SIZE + 1],
        &[7, MAX_LINE_SIZE, 1],
    ];

    /// A line of `len` bytes that is not the same byte throughout, so a chunk
    /// out of order or doubled shows up.
    fn long_line(len: usize) -> Vec<u8> {
        (0..len).map(|i| b'a' + (i % 26) as u8).collect()
    }

    #[test]
    fn short_line_is_one_full_record() {
        let (_dir, path, log) = setup();
        copy_lines(&b"hello\n"[..], Stream::Stdout, &log).unwrap();
        let raw = fs::read_to_string(&path).unwrap();
        let records = read_records(&path);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].stream, "stdout");
        assert!(!records[0].partial);
        assert_eq!(records[0].text, b"hello");
        assert_eq!(raw, format!("{} stdout F hello\n", records[0].timestamp));
    }

    #[test]
    fn stderr_records_are_tagged_stderr() {
        let (_dir, path, log) = setup();
        copy_lines(&b"oops\n"[..], Stream::Stderr, &log).unwrap();
        let records = read_records(&path);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].stream, "stderr");
        assert_eq!(records[0].text, b"oops");
    }

    #[test]
    fn several_lines_in_one_read() {
        let records = copy_in_chunks(b"one\ntwo\nthree\n", &[usize::MAX], Stream::Stdout);
        assert_eq!(texts(&records), [&b"one"[..], b"two", b"three"]);
        assert_eq!(tags(&records), "FFF");
    }

    #[test]
    fn line_split_across_many_small_reads() {
        let input = b"a line that arrives a few bytes at a time\nand another\n";
        let records = copy_in_chunks(input, &[1, 2, 3], Stream::Stdout);
        assert_eq!(
            texts(&records),
            [
                &b"a line that arrives a few bytes at a time"[..],
                b"and another"
            ]
        );
        assert_eq!(tags(&records), "FF");
    }

    fn check_long_line(len: usize, want_tags: &str, want_sizes: &[usize]) {
        let line = long_line(len);
        let mut input = line.clone();
        input.push(b'\n');
        input.extend_from_slice(b"next\n");
        for sizes in READ_PATTERNS {
            let records = copy_in_chunks(&input, sizes, Stream::Stdout);
            let (long, next) = records.split_at(records.len() - 1);
            assert_eq!(tags(long), want_tags, "reads of {sizes:?}");
            let got_sizes: Vec<usize> = long.iter().map(|r| r.text.len()).collect();
            assert_eq!(got_sizes, want_sizes, "reads of {sizes:?}");
            assert_eq!(long.concat_texts(), line, "reads of {sizes:?}");
            assert_eq!(texts(next), [&b"next"[..]], "reads of {sizes:?}");
            assert!(!next[0].partial);
        }
    }

    trait ConcatTexts {
        fn concat_texts(&self) -> Vec<u8>;
    }

    impl ConcatTexts for [Record] {
        fn concat_texts(&self) -> Vec<u8> {
            self.iter().flat_map(|r| r.text.iter().copied()).collect()
        }
    }

    #[test]
    fn line_of_exactly_16k_is_one_full_record() {
        check_long_line(MAX_LINE_SIZE, "F", &[MAX_LINE_SIZE]);
    }

    #[test]
    fn line_of_16k_plus_one_is_partial_then_full() {
        check_long_line(MAX_LINE_SIZE + 1, "PF", &[MAX_LINE_SIZE, 1]);
    }

    #[test]
    fn line_of_40k_is_partial_partial_full() {
        check_long_line(
            40 * 1024,
            "PPF",
            &[MAX_LINE_SIZE, MAX_LINE_SIZE, 40 * 1024 - 2 * MAX_LINE_SIZE],
        );
    }

    #[test]
    fn line_of_32k_is_partial_then_full_without_empty_record() {
        check_long_line(2 * MAX_LINE_SIZE, "PF", &[MAX_LINE_SIZE, MAX_LINE_SIZE]);
    }

    #[test]
    fn empty_line_is_a_full_record_with_empty_text() {
        let (_dir, path, log) = setup();
        copy_lines(&b"\nx\n\n"[..], Stream::Stdout, &log).unwrap();
        let records = read_records(&path);
        assert_eq!(texts(&records), [&b""[..], b"x", b""]);
        assert_eq!(tags(&records), "FFF");
        let raw = fs::read_to_string(&path).unwrap();
        let first = raw.lines().next().unwrap();
        assert_eq!(first, format!("{} stdout F ", records[0].timestamp));
    }

    #[test]
    fn final_fragment_without_newline_is_a_full_record() {
        for sizes in READ_PATTERNS {
            let records = copy_in_chunks(b"done\nno newline", sizes, Stream::Stdout);
            assert_eq!(texts(&records), [&b"done"[..], b"no newline"], "{sizes:?}");
            assert_eq!(tags(&records), "FF", "{sizes:?}");
        }
    }

    #[test]
    fn final_fragment_of_exactly_16k_without_newline_is_one_full_record() {
        let line = long_line(MAX_LINE_SIZE);
        for sizes in READ_PATTERNS {
            let records = copy_in_chunks(&line, sizes, Stream::Stdout);
            assert_eq!(tags(&records), "F", "{sizes:?}");
            assert_eq!(records[0].text, line, "{sizes:?}");
        }
    }

    #[test]
    fn final_fragment_longer_than_16k_ends_with_full_record() {
        let line = long_line(MAX_LINE_SIZE + 5);
        for sizes in READ_PATTERNS {
            let records = copy_in_chunks(&line, sizes, Stream::Stdout);
            assert_eq!(tags(&records), "PF", "{sizes:?}");
            assert_eq!(records.concat_texts(), line, "{sizes:?}");
        }
    }

    #[test]
    fn empty_input_writes_nothing() {
        let records = copy_in_chunks(b"", &[usize::MAX], Stream::Stdout);
        assert!(records.is_empty());
    }

    #[test]
    fn carriage_return_is_kept_in_the_text() {
        let records = copy_in_chunks(b"dos line\r\n", &[usize::MAX], Stream::Stdout);
        assert_eq!(texts(&records), [&b"dos line\r"[..]]);
    }

    #[test]
    fn arbitrary_bytes_pass_through_unchanged() {
        let line: Vec<u8> = (0u8..=255).filter(|&b| b != b'\n').collect();
        let mut input = line.clone();
        input.push(b'\n');
        let records = copy_in_chunks(&input, &[usize::MAX], Stream::Stdout);
        assert_eq!(texts(&records), [line.as_slice()]);
    }

    #[test]
    fn interrupted_reads_are_retried() {
        let (_dir, path, log) = setup();
        let reader = ScriptReader::new(vec![
            Step::Data(b"be"),
            Step::Fail(io::Error::from(ErrorKind::Interrupted)),
            Step::Data(b"fore\nafter\n"),
        ]);
        copy_lines(reader, Stream::Stdout, &log).unwrap();
        assert_eq!(texts(&read_records(&path)), [&b"before"[..], b"after"]);
    }

    #[test]
    fn read_error_returns_after_writing_the_pending_fragment() {
        let (_dir, path, log) = setup();
        let reader = ScriptReader::new(vec![
            Step::Data(b"whole\npend"),
            Step::Fail(io::Error::from(ErrorKind::ConnectionReset)),
            Step::Data(b"never read\n"),
        ]);
        let err = copy_lines(reader, Stream::Stdout, &log).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
        let records = read_records(&path);
        assert_eq!(texts(&records), [&b"whole"[..], b"pend"]);
        assert_eq!(tags(&records), "FF");
    }

    #[test]
    fn stdout_and_stderr_from_two_threads_never_interleave_within_a_record() {
        let (_dir, path, log) = setup();
        let log = Arc::new(log);
        let lines_of = |tag: &str| -> Vec<Vec<u8>> {
            (0..3000)
                .map(|i| {
                    // Every 100th line is long, so P chunks of one stream
                    // sit between the other's records.
                    let len = if i % 100 == 0 {
                        2 * MAX_LINE_SIZE + 17
                    } else {
                        i % 300
                    };
                    let mut line = format!("{tag}-{i}-").into_bytes();
                    line.extend(std::iter::repeat_n(tag.as_bytes()[0], len));
                    line
                })
                .collect()
        };
        let want_out = lines_of("out");
        let want_err = lines_of("err");
        let spawn = |lines: &[Vec<u8>], stream: Stream, sizes: &'static [usize]| {
            let mut input = Vec::new();
            for l in lines {
                input.extend_from_slice(l);
                input.push(b'\n');
            }
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                copy_lines(ChunkedReader::new(&input, sizes), stream, &log).unwrap();
            })
        };
        let a = spawn(&want_out, Stream::Stdout, &[4096, 100, 7]);
        let b = spawn(&want_err, Stream::Stderr, &[3000, 50, 11]);
        a.join().unwrap();
        b.join().unwrap();

        let records = read_records(&path);
        for r in &records {
            // A record whose text mixes both streams' bytes was interleaved.
            let own = if r.stream == "stdout" { b'o' } else { b'e' };
            let other = if own == b'o' { b"err-" } else { b"out-" };
            assert!(
                !r.text.windows(4).any(|w| w == other),
                "record of {} holds the other stream's text",
                r.stream
            );
            let body_start = r.text.iter().rposition(|&b| b == b'-').map_or(0, |p| p + 1);
            assert!(r.text[body_start..].iter().all(|&b| b == own));
        }
        let stamps: Vec<i128> = records
            .iter()
            .map(|r| parse_timestamp(&r.timestamp))
            .collect();
        assert!(
            stamps.windows(2).all(|w| w[0] <= w[1]),
            "timestamps go backwards in file order"
        );
        assert_eq!(join_lines(&records, "stdout"), want_out);
        assert_eq!(join_lines(&records, "stderr"), want_err);
        let stdout_interrupted = records
            .windows(2)
            .any(|w| w[0].partial && w[0].stream == "stdout" && w[1].stream == "stderr");
        let stderr_interrupted = records
            .windows(2)
            .any(|w| w[0].partial && w[0].stream == "stderr" && w[1].stream == "stdout");
        // Not asserted: whether threads actually overlapped is up to the
        // scheduler; reported so a run that never interleaved is visible.
        eprintln!(
            "{} records; a partial line cut by the other stream: stdout {stdout_interrupted}, stderr {stderr_interrupted}",
            records.len()
        );
    }

    #[test]
    fn reopen_after_rename_sends_later_records_to_the_new_file() {
        let (dir, path, log) = setup();
        let rotated = dir.path().join("0.log.20261129-003102");
        let reader = ScriptReader::new(vec![
            Step::Data(b"before 1\nbefore 2\nsplit "),
            Step::Run(Box::new(|| {
                fs::rename(&path, &rotated).unwrap();
                log.reopen().unwrap();
            })),
            Step::Data(b"line\nafter\n"),
        ]);
        copy_lines(reader, Stream::Stdout, &log).unwrap();
        assert_eq!(
            texts(&read_records(&rotated)),
            [&b"before 1"[..], b"before 2"]
        );
        assert_eq!(texts(&read_records(&path)), [&b"split line"[..], b"after"]);
    }

    #[test]
    fn failed_reopen_keeps_writing_to_the_old_file_and_names_the_path() {
        let (dir, path, log) = setup();
        let rotated = dir.path().join("rotated");
        copy_lines(&b"first\n"[..], Stream::Stdout, &log).unwrap();
        fs::rename(&path, &rotated).unwrap();
        // A directory at the path makes the open fail, even for root.
        fs::create_dir(&path).unwrap();
        let err = log.reopen().unwrap_err();
        assert!(matches!(err, CriLogError::Reopen { .. }));
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        copy_lines(&b"second\n"[..], Stream::Stdout, &log).unwrap();
        assert_eq!(texts(&read_records(&rotated)), [&b"first"[..], b"second"]);

        fs::remove_dir(&path).unwrap();
        log.reopen().unwrap();
        copy_lines(&b"third\n"[..], Stream::Stdout, &log).unwrap();
        assert_eq!(texts(&read_records(&path)), [&b"third"[..]]);
    }

    #[test]
    fn open_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("0.log");
        let err = CriLogFile::open(&path).unwrap_err();
        assert!(
            matches!(&err, CriLogError::Open { source, .. } if source.kind() == ErrorKind::NotFound)
        );
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn open_appends_to_an_existing_file_with_the_right_flags() {
        let (_dir, path, log) = setup();
        drop(log);
        fs::write(&path, b"2026-01-01T00:00:00Z stdout F old\n").unwrap();
        let log = CriLogFile::open(&path).unwrap();
        assert_eq!(log.path(), path);
        copy_lines(&b"new\n"[..], Stream::Stdout, &log).unwrap();
        assert_eq!(texts(&read_records(&path)), [&b"old"[..], b"new"]);

        let fresh = path.with_file_name("fresh.log");
        let fresh_log = CriLogFile::open(&fresh).unwrap();
        let fresh_mode = fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        // The umask may take bits away but never add any.
        assert_eq!(fresh_mode & !0o640, 0, "mode {fresh_mode:o}");
        assert_eq!(fresh_mode & 0o600, 0o600, "mode {fresh_mode:o}");

        use std::os::fd::AsRawFd;
        let sink = fresh_log.lock();
        let fd = sink.file.as_raw_fd();
        // SAFETY: fd is open for as long as `sink` is held.
        let (fd_flags, fl_flags) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(fd, libc::F_GETFL),
            )
        };
        assert!(fd_flags & libc::FD_CLOEXEC != 0);
        assert!(fl_flags & libc::O_APPEND != 0);
    }

    #[test]
    fn stream_display() {
        assert_eq!(Stream::Stdout.to_string(), "stdout");
        assert_eq!(Stream::Stderr.to_string(), "stderr");
    }

    #[test]
    fn log_file_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CriLogFile>();
        assert_send_sync::<CriLogError>();
    }

    /// Strict RFC 3339 check of what we write: UTC with `Z`, and a fraction,
    /// if any, of 1 to 9 digits without trailing zeros. Returns Unix nanos.
    fn parse_timestamp(ts: &str) -> i128 {
        let b = ts.as_bytes();
        let num = |r: std::ops::Range<usize>| -> i64 {
            let s = &ts[r.clone()];
            assert!(s.bytes().all(|c| c.is_ascii_digit()), "{ts}: {s}");
            s.parse().unwrap()
        };
        assert!(b.len() >= 20, "{ts}");
        assert_eq!(
            (b[4], b[7], b[10], b[13], b[16]),
            (b'-', b'-', b'T', b':', b':'),
            "{ts}"
        );
        let (year, month, day) = (num(0..4), num(5..7), num(8..10));
        let (hour, minute, second) = (num(11..13), num(14..16), num(17..19));
        assert!((1..=12).contains(&month) && (1..=31).contains(&day), "{ts}");
        assert!(hour < 24 && minute < 60 && second < 61, "{ts}");
        assert_eq!(b[b.len() - 1], b'Z', "{ts} is not UTC with Z");
        let nanos = if b.len() > 20 {
            assert_eq!(b[19], b'.', "{ts}");
            let frac = &ts[20..ts.len() - 1];
            assert!((1..=9).contains(&frac.len()), "{ts}");
            assert!(!frac.ends_with('0'), "{ts} has trailing zeros");
            num(20..ts.len() - 1) * 10i64.pow(9 - frac.len() as u32)
        } else {
            0
        };
        // Days from the civil date (Howard Hinnant's algorithm).
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (month + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
        i128::from(secs) * 1_000_000_000 + i128::from(nanos)
    }

    fn now_nanos() -> i128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128
    }

    #[test]
    fn timestamp_is_rfc3339_utc_and_current() {
        let (_dir, path, log) = setup();
        let before = now_nanos();
        copy_lines(&b"a\nb\nc\n"[..], Stream::Stdout, &log).unwrap();
        let after = now_nanos();
        for r in read_records(&path) {
            let t = parse_timestamp(&r.timestamp);
            assert!(
                before <= t && t <= after,
                "{} not in [{before}, {after}]",
                r.timestamp
            );
        }
    }

    #[test]
    fn timestamp_fraction_is_trimmed_like_go_rfc3339nano() {
        let base = OffsetDateTime::from_unix_timestamp(1_795_912_262).unwrap();
        let cases = [
            (0, "2026-11-29T00:31:02Z"),
            (100_000_000, "2026-11-29T00:31:02.1Z"),
            (120_000_000, "2026-11-29T00:31:02.12Z"),
            (123_456_789, "2026-11-29T00:31:02.123456789Z"),
            (5, "2026-11-29T00:31:02.000000005Z"),
        ];
        for (nanos, want) in cases {
            let t = base.replace_nanosecond(nanos).unwrap();
            let mut buf = [0u8; HEADER_CAPACITY];
            let len = format_header(&mut buf, t, Stream::Stderr, true).unwrap();
            assert_eq!(
                std::str::from_utf8(&buf[..len]).unwrap(),
                format!("{want} stderr P ")
            );
            let got = parse_timestamp(want);
            assert_eq!(got, 1_795_912_262 * 1_000_000_000 + i128::from(nanos));
        }
    }

    /// A pipe, so the writer really blocks when the copier stops reading.
    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 returns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and owned by nothing else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn write_errors_do_not_stop_draining_the_input() {
        // /dev/full fails every write with ENOSPC, like a full disk.
        let log = CriLogFile::open(Path::new("/dev/full")).unwrap();
        let (reader, mut writer) = pipe();
        const LINES: usize = 40_000;
        let producer = std::thread::spawn(move || {
            // ~4 MiB, far past a pipe's buffer: this only finishes if the
            // other end keeps reading.
            for i in 0..LINES {
                writeln!(writer, "line {i:06} {}", "x".repeat(90)).unwrap();
            }
        });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut drops = DropTracker::default();
            let result = copy_lines_tracked(reader, Stream::Stdout, &log, &mut drops);
            let _ = done_tx.send((result, drops));
        });
        // A copier that stopped reading would block the producer forever;
        // fail instead of hanging the test run.
        let (result, drops) = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("copy_lines did not drain its input");
        result.unwrap();
        producer.join().unwrap();
        assert_eq!(drops.total, LINES as u64);
        assert_eq!(drops.streaks, 1, "one warning for one streak");
    }

    #[test]
    fn writes_resume_after_reopen_once_the_log_is_writable_again() {
        let (_dir, path, log) = setup();
        let break_log = || {
            // A read-only handle in place of the log: writes fail with EBADF.
            let mut sink = log.lock();
            sink.file = File::open(&path).unwrap();
        };
        let reader = ScriptReader::new(vec![
            Step::Data(b"kept 1\n"),
            Step::Run(Box::new(break_log)),
            Step::Data(b"lost 1\nlost 2\nlost "),
            Step::Data(b"3\n"),
            Step::Run(Box::new(|| log.reopen().unwrap())),
            Step::Data(b"kept 2\n"),
            Step::Run(Box::new(break_log)),
            Step::Data(b"lost 4\n"),
            Step::Run(Box::new(|| log.reopen().unwrap())),
            Step::Data(b"kept 3\n"),
        ]);
        let mut drops = DropTracker::default();
        copy_lines_tracked(reader, Stream::Stdout, &log, &mut drops).unwrap();
        assert_eq!(
            texts(&read_records(&path)),
            [&b"kept 1"[..], b"kept 2", b"kept 3"]
        );
        assert_eq!(drops.total, 4);
        assert_eq!(drops.streaks, 2);
        assert_eq!(drops.in_streak, 0);
    }

    /// Accepts `budget` bytes, `per_call` at most per call, then fails.
    struct FlakyWriter {
        out: Vec<u8>,
        budget: usize,
        per_call: usize,
    }

    impl Write for FlakyWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(self.budget).min(self.per_call);
            self.out.extend_from_slice(&buf[..n]);
            self.budget -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_writes_are_completed() {
        let mut w = FlakyWriter {
            out: Vec::new(),
            budget: usize::MAX,
            per_call: 3,
        };
        let mut torn = false;
        write_record_to(&mut w, &mut torn, b"HDR ", b"some text").unwrap();
        assert_eq!(w.out, b"HDR some text\n");
        assert!(!torn);
    }

    #[test]
    fn a_torn_record_is_closed_before_the_next_one() {
        let mut w = FlakyWriter {
            out: Vec::new(),
            budget: 6,
            per_call: usize::MAX,
        };
        let mut torn = false;
        write_record_to(&mut w, &mut torn, b"HDR ", b"some text").unwrap_err();
        assert!(torn);
        // Only the newline gets through: the file is back on a boundary.
        w.budget = 1;
        write_record_to(&mut w, &mut torn, b"HDR ", b"next").unwrap_err();
        assert!(!torn);
        // Nothing gets through: still on a boundary.
        write_record_to(&mut w, &mut torn, b"HDR ", b"lost").unwrap_err();
        assert!(!torn);
        w.budget = 3;
        write_record_to(&mut w, &mut torn, b"HDR ", b"cut").unwrap_err();
        assert!(torn);
        // Nothing gets through: still torn.
        write_record_to(&mut w, &mut torn, b"HDR ", b"lost").unwrap_err();
        assert!(torn);
        w.budget = usize::MAX;
        write_record_to(&mut w, &mut torn, b"HDR ", b"whole").unwrap();
        assert!(!torn);
        assert_eq!(w.out, b"HDR so\nHDR\nHDR whole\n");
    }

    #[test]
    fn a_torn_record_in_the_file_does_not_swallow_the_next_one() {
        let (_dir, path, log) = setup();
        {
            let mut sink = log.lock();
            sink.file
                .write_all(b"2026-11-29T00:31:02Z stdout F cut sho")
                .unwrap();
            sink.torn = true;
        }
        copy_lines(&b"whole\n"[..], Stream::Stdout, &log).unwrap();
        let data = fs::read(&path).unwrap();
        let last = data[..data.len() - 1]
            .split(|&b| b == b'\n')
            .next_back()
            .unwrap();
        assert_eq!(parse_line(last).text, b"whole");
    }

    #[test]
    fn reopen_starts_the_new_file_without_closing_an_old_torn_line() {
        let (dir, path, log) = setup();
        {
            let mut sink = log.lock();
            sink.file
                .write_all(b"2026-11-29T00:31:02Z stdout F cut")
                .unwrap();
            sink.torn = true;
        }
        fs::rename(&path, dir.path().join("rotated")).unwrap();
        log.reopen().unwrap();
        copy_lines(&b"fresh\n"[..], Stream::Stdout, &log).unwrap();
        let data = fs::read(&path).unwrap();
        assert_ne!(data[0], b'\n', "new file starts with a stray newline");
        assert_eq!(texts(&read_records(&path)), [&b"fresh"[..]]);
    }

    #[test]
    fn splitter_holds_a_full_chunk_until_the_next_byte() {
        let got = std::cell::RefCell::new(Vec::<(bool, Vec<u8>)>::new());
        let mut emit = |p: bool, t: &[u8]| got.borrow_mut().push((p, t.to_vec()));
        let mut s = LineSplitter::new();
        s.push(&long_line(MAX_LINE_SIZE), &mut emit);
        assert!(
            got.borrow().is_empty(),
            "a full chunk must wait for the next byte"
        );
        s.push(b"\n", &mut emit);
        assert_eq!(*got.borrow(), [(false, long_line(MAX_LINE_SIZE))]);
        s.push(&long_line(MAX_LINE_SIZE), &mut emit);
        s.push(b"z", &mut emit);
        assert_eq!(got.borrow().len(), 2);
        assert!(
            got.borrow()[1].0,
            "followed by more text, the chunk is partial"
        );
        s.finish(&mut emit);
        assert_eq!(got.borrow().len(), 3);
        assert_eq!(got.borrow()[2], (false, b"z".to_vec()));
        s.finish(&mut emit);
        assert_eq!(
            got.borrow().len(),
            3,
            "finish on an empty carry writes nothing"
        );
    }

    #[test]
    fn find_newline_finds_the_first() {
        assert_eq!(find_newline(b""), None);
        assert_eq!(find_newline(b"abc"), None);
        assert_eq!(find_newline(b"\n"), Some(0));
        assert_eq!(find_newline(b"ab\ncd\n"), Some(2));
        let mut big = vec![b'x'; 40_000];
        big[39_999] = b'\n';
        assert_eq!(find_newline(&big), Some(39_999));
    }
}
