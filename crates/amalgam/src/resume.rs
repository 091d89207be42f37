//! Cancelling merges, and resuming merges that were killed.
//!
//! A merge writes its output into a partial file with a fixed name beside it,
//! `.NAME.amalgam-partial` ([`partial_path`]), locked while a run writes it, and keeps a journal
//! `.NAME.amalgam-journal` ([`journal_path`]) of JSON lines: the first holds a fingerprint of
//! the run, each further one a key whose bytes are all written, with the key's report notes.
//!
//! The fingerprint is the SHA-256 of the output header (tensor names, dtypes, shapes and the
//! metadata, which holds the recipe), of the options that can change the bytes (everything in
//! [`MergeOptions`] except the output path, threads, chunk length, `overwrite`, `resume`,
//! `keep_partial` and the cancel token), of the graph, and of each input's path, size,
//! modification time and header hash.
//!
//! When a run starts and finds a partial file and a journal with its own fingerprint (and
//! `resume` is on), the journaled keys are not computed again, the others are. Anything else found there (another fingerprint, no journal,
//! `resume` off) is stale: it is named through [`Progress::note`] and replaced.
//!
//! Durability: a key's journal line is written only after `fdatasync` of the partial file has
//! returned, after all of that key's bytes were written, so after a SIGKILL or a power loss every
//! journaled key's bytes are on disk (a torn last journal line is ignored). Lines are written in
//! batches, at most one `fdatasync` a second, so journaling costs no read of the output and no
//! measurable time.

use crate::error::{Error, Result};
use crate::io::output::{out_err, read_exact_at, OutputFile, OutputTensor};
use crate::options::{MergeOptions, Progress};
use crate::recipe::graph::Graph;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::options::Cancel;

fn beside(output: &Path, suffix: &str) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    crate::io::dest::folder_of(output).join(format!(".{name}.{suffix}"))
}

/// The partial file a merge into `output` writes: `.NAME.amalgam-partial` beside it.
pub fn partial_path(output: &Path) -> PathBuf {
    beside(output, "amalgam-partial")
}

/// The journal of the partial file: `.NAME.amalgam-journal` beside the output.
pub fn journal_path(output: &Path) -> PathBuf {
    beside(output, "amalgam-journal")
}

/// At most one `fdatasync` and journal batch per this interval.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

struct KeyState {
    expected: u64,
    written: AtomicU64,
    /// Not journaled when written: an input's non-finite values may make it computed again.
    held: AtomicBool,
    /// Non-finite values written (see [`crate::io::non_finite`]).
    out_non_finite: AtomicU64,
}

/// What the journal records of a key besides its bytes, so that a resumed run reports it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct KeyRecord {
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs_non_finite: Vec<crate::io::non_finite::InputNonFinite>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub output_non_finite: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The journal of a merge being written.
pub(crate) struct Journal {
    path: PathBuf,
    file: Mutex<File>,
    /// The partial file (a second handle).
    data: File,
    keys: Vec<KeyState>,
    records: Mutex<HashMap<usize, KeyRecord>>,
    pending: Mutex<Vec<usize>>,
    last_flush: Mutex<Instant>,
    keep: bool,
    committed: bool,
    cancel: Cancel,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FirstLine {
    amalgam_journal: u32,
    fingerprint: String,
    keys: usize,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyLine {
    key: usize,
    #[serde(flatten)]
    record: KeyRecord,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The header bytes (length prefix included) of a safetensors file.
fn input_header(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    read_exact_at(&file, &mut len, 0).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len).min(100 << 20) as usize;
    let mut bytes = vec![0u8; 8 + n];
    read_exact_at(&file, &mut bytes, 0).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The fingerprint of a run (see the module documentation).
fn fingerprint(header: &[u8], graph: &Graph, opts: &MergeOptions) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"amalgam partial v1\n");
    h.update((header.len() as u64).to_le_bytes());
    h.update(header);
    // Options that do not change the bytes are reset; any other (also ones added later) counts.
    let mut o = opts.clone();
    o.output = PathBuf::new();
    o.threads = 0;
    o.chunk_override = None;
    o.overwrite = false;
    o.report_json = None;
    o.resume = true;
    o.keep_partial = false;
    o.cancel = Cancel::default();
    h.update(format!("{o:?}\n{graph:?}\n").as_bytes());
    for m in &graph.models {
        let meta = std::fs::metadata(&m.path).map_err(|e| Error::io(&m.path, e))?;
        let canon = std::fs::canonicalize(&m.path).unwrap_or_else(|_| m.path.clone());
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let head = Sha256::digest(input_header(&m.path)?);
        h.update(
            format!(
                "{}\n{} {mtime} {}\n",
                canon.display(),
                meta.len(),
                hex(&head)
            )
            .as_bytes(),
        );
    }
    Ok(hex(&h.finalize()))
}

#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor this function borrows.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

/// An output opened for writing, fresh or resumed.
pub(crate) struct Opened {
    pub out: OutputFile,
    pub journal: Journal,
    /// The keys already written (by planned index), with what their report says.
    pub done: Vec<(usize, KeyRecord)>,
}

/// Opens the partial file of `opts.output`: resumes it if its journal has this run's
/// fingerprint, else starts it afresh. `key_tensors[k]` are the output tensors key `k` writes.
pub(crate) fn open(
    graph: &Graph,
    opts: &MergeOptions,
    tensors: &[OutputTensor],
    metadata: HashMap<String, String>,
    key_tensors: &[Vec<usize>],
    progress: &dyn Progress,
) -> Result<Opened> {
    let dest = opts.output.as_path();
    let layout = crate::io::output::layout(dest, tensors, metadata)?;
    let print = fingerprint(&layout.header, graph, opts)?;
    let partial = partial_path(dest);
    let jpath = journal_path(dest);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .map_err(|e| out_err(dest, &format!("cannot create {}", partial.display()), e))?;
    match try_lock(&file) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::Output {
                path: dest.to_path_buf(),
                message: format!(
                    "another amalgam run is writing it (its partial file {} is locked)",
                    partial.display()
                ),
            })
        }
        Err(e) => {
            return Err(out_err(
                dest,
                &format!("cannot lock {}", partial.display()),
                e,
            ))
        }
    }
    let io = |e| out_err(dest, &format!("cannot write {}", partial.display()), e);
    let data = file.try_clone().map_err(io)?;
    let file_len = layout.file_len();
    let header = layout.header.clone();
    let ranges: Vec<Vec<Range<u64>>> = key_tensors
        .iter()
        .map(|ts| {
            ts.iter()
                .map(|&t| layout.offsets[t]..layout.offsets[t] + layout.lens[t])
                .collect()
        })
        .collect();
    let out = OutputFile::from_parts(dest, partial.clone(), file, layout, opts.overwrite);

    // What an earlier run left.
    let existing = data.metadata().map(|m| m.len()).unwrap_or(0);
    let text = std::fs::read_to_string(&jpath).ok();
    let mut done: Vec<(usize, KeyRecord)> = Vec::new();
    let mut lines: Vec<KeyLine> = Vec::new();
    if existing > 0 || text.is_some() {
        let mut it = text.as_deref().unwrap_or("").lines();
        let first: Option<FirstLine> = it.next().and_then(|l| serde_json::from_str(l).ok());
        let mut head = vec![0u8; header.len()];
        let stale = if !opts.resume {
            Some("resuming is off")
        } else if text.is_none() {
            Some("it has no journal")
        } else if first.as_ref().is_none_or(|f| {
            f.amalgam_journal != 1 || f.fingerprint != print || f.keys != key_tensors.len()
        }) {
            Some("from a run with other inputs, recipe or options")
        } else if existing != file_len
            || read_exact_at(&data, &mut head, 0).is_err()
            || head != header
        {
            Some("its size or header is not this run's")
        } else {
            None
        };
        match stale {
            Some(why) => progress.note(&format!(
                "removing stale partial file {} ({why})",
                partial.display()
            )),
            None => {
                // The last line of each key counts; a torn last line is ignored.
                let mut claimed: BTreeMap<usize, KeyLine> = BTreeMap::new();
                for l in it {
                    if let Ok(k) = serde_json::from_str::<KeyLine>(l) {
                        if k.key < key_tensors.len() {
                            claimed.insert(k.key, k);
                        }
                    }
                }
                for k in claimed.into_values() {
                    done.push((k.key, k.record.clone()));
                    lines.push(k);
                }
                progress.note(&format!(
                    "resuming: {} of {} keys already written in {}",
                    done.len(),
                    key_tensors.len(),
                    partial.display()
                ));
            }
        }
        if stale.is_some() {
            out.start()?;
        }
    } else {
        out.start()?;
    }

    // The journal: the fingerprint, then the keys kept.
    let jio = |e| out_err(dest, &format!("cannot write {}", jpath.display()), e);
    let mut text = serde_json::to_string(&FirstLine {
        amalgam_journal: 1,
        fingerprint: print,
        keys: key_tensors.len(),
    })
    .expect("json")
        + "\n";
    for l in &lines {
        text += &(serde_json::to_string(l).expect("json") + "\n");
    }
    let mut jfile = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&jpath)
        .map_err(jio)?;
    jfile.write_all(text.as_bytes()).map_err(jio)?;
    let keys = ranges
        .into_iter()
        .map(|ranges| KeyState {
            expected: ranges.iter().map(|r| r.end - r.start).sum(),
            written: AtomicU64::new(0),
            held: AtomicBool::new(false),
            out_non_finite: AtomicU64::new(0),
        })
        .collect();
    let journal = Journal {
        path: jpath,
        file: Mutex::new(jfile),
        data,
        keys,
        records: Mutex::new(HashMap::new()),
        pending: Mutex::new(Vec::new()),
        last_flush: Mutex::new(Instant::now()),
        keep: opts.keep_partial,
        committed: false,
        cancel: opts.cancel.clone(),
    };
    let mut out = out;
    out.keep_on_drop(opts.keep_partial);
    Ok(Opened { out, journal, done })
}

impl Journal {
    /// The report notes of key `key`, journaled with it.
    pub(crate) fn set_notes(&self, key: usize, notes: &[String]) {
        if !notes.is_empty() {
            let mut r = self.records.lock().unwrap_or_else(|e| e.into_inner());
            r.entry(key).or_default().notes = notes.to_vec();
        }
    }

    /// The non-finite values of the inputs of key `key`, journaled with it.
    pub(crate) fn set_inputs_non_finite(
        &self,
        key: usize,
        found: &[crate::io::non_finite::InputNonFinite],
    ) {
        let mut r = self.records.lock().unwrap_or_else(|e| e.into_inner());
        r.entry(key).or_default().inputs_non_finite = found.to_vec();
    }

    /// `bytes` more bytes of key `key` were written, `non_finite` of their values NaN or Inf;
    /// journals the keys completed (unless held), at most once a second.
    pub(crate) fn wrote(&self, key: usize, bytes: u64, non_finite: u64) -> Result<()> {
        let k = &self.keys[key];
        if non_finite > 0 {
            k.out_non_finite.fetch_add(non_finite, Ordering::AcqRel);
        }
        let before = k.written.fetch_add(bytes, Ordering::AcqRel);
        // Every task of the key marks it held before its bytes are counted, so the last one
        // sees the mark.
        if k.expected > 0 && before + bytes == k.expected && !k.held.load(Ordering::SeqCst) {
            self.push(key);
        }
        self.flush(false)
    }

    fn push(&self, key: usize) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key);
    }

    /// Key `key` is not journaled when its bytes are written, until [`Journal::release`] or
    /// [`Journal::restart`].
    pub(crate) fn hold(&self, key: usize) {
        self.keys[key].held.store(true, Ordering::SeqCst);
    }

    /// Key `key` as written is final: journals it, if it was held and its bytes are all written.
    pub(crate) fn release(&self, key: usize) {
        let k = &self.keys[key];
        if k.held.swap(false, Ordering::SeqCst)
            && k.expected > 0
            && k.written.load(Ordering::Acquire) == k.expected
        {
            self.push(key);
        }
    }

    /// Key `key` is written again from the start.
    pub(crate) fn restart(&self, key: usize) {
        let k = &self.keys[key];
        k.held.store(false, Ordering::SeqCst);
        k.written.store(0, Ordering::SeqCst);
        k.out_non_finite.store(0, Ordering::SeqCst);
    }

    /// The non-finite values written for key `key` in this run.
    pub(crate) fn output_non_finite(&self, key: usize) -> u64 {
        self.keys[key].out_non_finite.load(Ordering::Acquire)
    }

    fn flush(&self, force: bool) -> Result<()> {
        let mut last = if force {
            self.last_flush.lock().unwrap_or_else(|e| e.into_inner())
        } else {
            match self.last_flush.try_lock() {
                Ok(g) => g,
                Err(_) => return Ok(()),
            }
        };
        if !force && last.elapsed() < FLUSH_EVERY {
            return Ok(());
        }
        let keys = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if keys.is_empty() {
            return Ok(());
        }
        let err = |e| out_err(&self.path, "cannot write the journal", e);
        // The keys' bytes are on disk before their lines are written.
        self.data.sync_data().map_err(err)?;
        let mut text = String::new();
        for key in keys {
            let mut record = self
                .records
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key)
                .unwrap_or_default();
            record.output_non_finite = self.output_non_finite(key);
            text += &(serde_json::to_string(&KeyLine { key, record }).expect("json") + "\n");
        }
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(text.as_bytes()).map_err(err)?;
        *last = Instant::now();
        Ok(())
    }

    /// Moves the finished output into place and removes the journal; refuses if the merge was
    /// cancelled meanwhile.
    pub(crate) fn commit(mut self, out: OutputFile) -> Result<PathBuf> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let path = out.commit()?;
        self.committed = true;
        let _ = std::fs::remove_file(&self.path);
        Ok(path)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if self.keep {
            let _ = self.flush(true);
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
