//! What one process remembers of its own last apply, so that the next one
//! (a [`crate::vpc::Vpc`] delta, `sgfw run` reloading its model) costs what
//! the change costs and not what the model costs: the state it saved (not
//! read and parsed again), the keys of its objects (not read, and written
//! to disk only when the process lets go of the backend), the content
//! addresses of the rule lists it compiled ([`CompileMemo`]), and what each
//! half of the slotted maps holds (so a switch writes only what differs).
//!
//! It owns the rule for trusting that memory and nothing else: the state in
//! memory is used only while the state file and its journal are exactly the
//! files this process wrote (same inode, size and modification time: every
//! writer replaces them by rename, so any other apply, a teardown or a
//! crashed apply's journal shows). It must never be the only record of
//! anything the kernel holds, and never make an apply trust what another
//! process may have changed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::compile::CompileMemo;
use super::{Half, Journal, ObjectKeys, State};

/// A file's identity and version as `stat` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        std::fs::metadata(path).ok().map(|m| Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

/// The stamps of a state file and of its journal (either may be absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Files {
    state: Option<Stamp>,
    journal: Option<Stamp>,
}

impl Files {
    fn of(state_path: &Path) -> Files {
        Files {
            state: Stamp::of(state_path),
            journal: Stamp::of(&Journal::path(state_path)),
        }
    }
}

/// The memory of one backend (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct Session {
    /// The files as this process left them after its last apply.
    files: Option<Files>,
    /// The state it saved then.
    state: Option<State>,
    /// The keys of that apply's objects, for its generation.
    keys: Option<(u32, ObjectKeys)>,
    /// Where those keys go when they were not written yet, and the state
    /// file they belong to.
    unsaved_keys: Option<(PathBuf, PathBuf)>,
    /// Content addresses of the rule lists of the last compile.
    pub(crate) memo: CompileMemo,
    /// What each half of the slotted maps holds, as this process's applies
    /// wrote them ([`super::write_generation_over`]).
    pub(crate) halves: [Option<Half>; 2],
}

impl Session {
    /// The state in force: the one in memory when the files are still the
    /// ones this process wrote, else read from the file (and the memory of
    /// the state and keys forgotten). Taken out of memory: an apply puts the
    /// state it saves back with [`Session::saved`].
    pub(crate) fn state(&mut self, state_path: &Path) -> Result<Option<State>, super::EbpfError> {
        let now = Files::of(state_path);
        if self.files == Some(now)
            && now.state.is_some()
            && let Some(s) = self.state.take()
        {
            return Ok(Some(s));
        }
        self.forget();
        State::load(state_path)
    }

    /// The keys recorded for `generation`: from memory when this process
    /// recorded them, else from the file beside the state.
    pub(crate) fn keys(&mut self, keys_path: &Path, generation: u32) -> Option<ObjectKeys> {
        match self.keys.take() {
            Some((g, k)) if g == generation => Some(k),
            _ => super::keys_file::load(keys_path, generation),
        }
    }

    /// Records what an apply saved: the state (and its files as they are
    /// now) and the keys of its generation. With `defer`, the keys are
    /// written to `keys_path` only when the backend is let go of (or by the
    /// next apply that is not deferred); until then another process's apply
    /// finds no record of this generation and walks the tries instead.
    pub(crate) fn saved(
        &mut self,
        state_path: &Path,
        keys_path: &Path,
        state: State,
        keys: ObjectKeys,
        defer: bool,
    ) {
        let generation = state.generation;
        if defer {
            self.unsaved_keys = Some((state_path.to_path_buf(), keys_path.to_path_buf()));
        } else {
            self.unsaved_keys = None;
            write_keys(keys_path, generation, &keys);
        }
        self.keys = Some((generation, keys));
        self.files = Some(Files::of(state_path));
        self.state = Some(state);
    }

    /// Forgets the state, the keys and the halves (the memo stays: it is
    /// checked per use).
    pub(crate) fn forget(&mut self) {
        self.files = None;
        self.state = None;
        self.keys = None;
        self.unsaved_keys = None;
        self.halves = [None, None];
    }

    /// Writes deferred keys, when the files are still this process's.
    pub(crate) fn flush(&mut self) {
        if let (Some((state_path, path)), Some((generation, keys))) =
            (self.unsaved_keys.take(), &self.keys)
            && self.files == Some(Files::of(&state_path))
        {
            write_keys(&path, *generation, keys);
        }
    }
}

/// Best effort: without the record the next apply of another process walks
/// the tries.
fn write_keys(path: &Path, generation: u32, keys: &ObjectKeys) {
    if let Err(e) = super::keys_file::save(path, generation, keys) {
        tracing::debug!("recording the objects' keys: {e}");
        let _ = std::fs::remove_file(path);
    }
}

/// A [`Session`] that writes its deferred keys when the last clone of the
/// backend goes.
#[derive(Debug, Default)]
pub(crate) struct Shared(pub(crate) std::sync::Mutex<Session>);

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(s) = self.0.get_mut() {
            s.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sgfw-session-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn state(generation: u32) -> State {
        State {
            generation,
            ..State::default()
        }
    }

    #[test]
    fn the_state_in_memory_is_used_only_while_the_files_are_this_processs() {
        let d = dir("trust");
        let (path, keys) = (d.join("ebpf.json"), d.join("ebpf.keys"));
        let mut s = Session::default();
        state(3).save(&path).unwrap();
        assert_eq!(s.state(&path).unwrap().unwrap().generation, 3);
        // What this process saved comes back from memory: a copy in memory
        // that differs from the file shows it.
        state(4).save(&path).unwrap();
        let mut mine = state(4);
        mine.rule_counts.insert("i-mem".into(), (1, 1));
        s.saved(&path, &keys, mine, ObjectKeys::new(), true);
        let got = s.state(&path).unwrap().unwrap();
        assert!(got.rule_counts.contains_key("i-mem"), "read from the file");
        s.saved(&path, &keys, got, ObjectKeys::new(), true);
        // Another process's apply replaces the file: read again.
        state(9).save(&path).unwrap();
        let got = s.state(&path).unwrap().unwrap();
        assert_eq!(got.generation, 9);
        assert!(!got.rule_counts.contains_key("i-mem"));
        // A journal written after this process's save (an apply of another
        // process that did not finish) is seen too.
        s.saved(&path, &keys, got, ObjectKeys::new(), true);
        Journal {
            generation: 10,
            next: 99,
            indices: Default::default(),
        }
        .save(&path)
        .unwrap();
        let got = s.state(&path).unwrap().unwrap();
        assert_eq!(
            (got.generation, got.unsettled, got.book.next),
            (10, true, 99)
        );
        // A teardown (the file gone): nothing is in force.
        s.saved(&path, &keys, got, ObjectKeys::new(), true);
        std::fs::remove_file(&path).unwrap();
        assert!(s.state(&path).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn deferred_keys_are_written_once_and_only_for_this_processs_files() {
        let d = dir("keys");
        let (path, keys) = (d.join("ebpf.json"), d.join("ebpf.keys"));
        let record: ObjectKeys = [(5u32, vec![(0u8, vec![1, 2, 3])])].into_iter().collect();
        state(2).save(&path).unwrap();
        let mut s = Session::default();
        s.saved(&path, &keys, state(2), record.clone(), true);
        assert!(!keys.exists(), "deferred");
        assert_eq!(s.keys(&keys, 2), Some(record.clone()), "from memory");
        s.saved(&path, &keys, state(2), record.clone(), true);
        s.flush();
        assert_eq!(
            super::super::keys_file::load(&keys, 2),
            Some(record.clone())
        );
        std::fs::remove_file(&keys).unwrap();
        // After another process's apply the record is not this process's to write.
        s.saved(&path, &keys, state(2), record.clone(), true);
        state(3).save(&path).unwrap();
        s.flush();
        assert!(!keys.exists());
        // Keys of another generation are read from the file, not memory.
        s.saved(&path, &keys, state(3), record, false);
        assert!(keys.exists(), "written at once");
        assert_eq!(s.keys(&keys, 4), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
