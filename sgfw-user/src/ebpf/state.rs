//! The state file: what a later run needs to know about the policy in force
//! (generation, content ids, indices, bindings, the journal flag). It owns
//! reading and writing that file, and must never be the only record of
//! anything the kernel holds: the pins are.

use super::*;

/// What a later run needs to know about the policy in force.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Policy generation (bumped by each apply).
    pub generation: u32,
    /// Ids of the compiled objects in the maps, by content.
    #[serde(default)]
    pub book: IdBook,
    /// Stable instance/subnet numbering.
    pub indices: Indices,
    /// SG rule reference → display name.
    pub rule_refs: BTreeMap<u32, String>,
    /// Instance index → id.
    pub instance_ids: BTreeMap<u32, String>,
    /// Subnet id → bridge.
    pub bridges: BTreeMap<String, String>,
    /// Map name → max_entries as loaded.
    pub capacities: BTreeMap<String, u32>,
    /// Instance id → bound interface name.
    pub interfaces: BTreeMap<String, String>,
    /// Instance id → (ingress rules, egress rules) after flattening.
    #[serde(default)]
    pub rule_counts: BTreeMap<String, (usize, usize)>,
    /// Subnet id → NACL id in force.
    #[serde(default)]
    pub nacls: BTreeMap<String, String>,
    /// Entries per map after the last apply (for the capacity check).
    #[serde(default)]
    pub entry_counts: BTreeMap<String, usize>,
    /// An apply began writing the maps and did not record that it finished
    /// (it was killed, or failed while removing retired ids): `book` may not
    /// describe what the maps hold. `generation` and `book.next` were
    /// already advanced past everything that apply may have written, so
    /// neither is ever handed out twice; the next apply writes every object
    /// under new ids and sweeps every id it does not use.
    #[serde(default)]
    pub unsettled: bool,
    /// The subnets' prefixes, for the bridge-family fence ([`fence_rules`]).
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// TC only, or the XDP pre-filter on instance ports too.
    #[serde(default)]
    pub dataplane: Dataplane,
}

impl State {
    /// Reads the state file; `None` when sgfw is not applied.
    ///
    /// A journal ([`Journal`]) of a later generation than the file's means
    /// an apply began writing the maps after the file was saved and did not
    /// finish: its generation, ids and indices are taken over and the state
    /// is `unsettled`.
    pub fn load(path: &Path) -> Result<Option<State>, EbpfError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice::<State>(&b)
                .map(|mut s| {
                    if let Some(j) = Journal::load(path)
                        && j.generation != s.generation
                    {
                        s.generation = j.generation;
                        s.book.next = s.book.next.max(j.next);
                        s.indices = j.indices;
                        s.unsettled = true;
                    }
                    Some(s)
                })
                .map_err(|source| EbpfError::State {
                    path: path.to_path_buf(),
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysError::File {
                what: "reading",
                path: path.to_path_buf(),
                source,
            }
            .into()),
        }
    }

    pub(super) fn save(&self, path: &Path) -> Result<(), EbpfError> {
        parent_dir(path)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(self).map_err(|source| EbpfError::State {
            path: path.to_path_buf(),
            source,
        })?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| {
                SysError::File {
                    what: "writing",
                    path: path.to_path_buf(),
                    source,
                }
                .into()
            })
    }
}

/// What an apply records before its first map write, beside the state file
/// (`.journal`): the generation and the ids it takes and the indices it
/// writes under. A few hundred bytes where the state is megabytes: the
/// state file itself is written once per apply, after the switch. A journal
/// whose generation is the state's is spent (the apply finished).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Journal {
    /// The generation the apply writes.
    pub generation: u32,
    /// The first id no object of that apply can have.
    pub next: u32,
    /// The instance and subnet numbering it writes under.
    pub indices: Indices,
}

impl Journal {
    /// Where the journal of the state file `state_path` is.
    pub fn path(state_path: &Path) -> PathBuf {
        state_path.with_extension("journal")
    }

    /// The journal, if there is a whole one.
    pub fn load(state_path: &Path) -> Option<Journal> {
        let b = std::fs::read(Journal::path(state_path)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Writes it (whole or not at all: a temporary file renamed over it).
    pub(super) fn save(&self, state_path: &Path) -> Result<(), EbpfError> {
        let path = Journal::path(state_path);
        parent_dir(&path)?;
        let tmp = path.with_extension("journal.tmp");
        let bytes = serde_json::to_vec(self).map_err(|source| EbpfError::State {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| {
                SysError::File {
                    what: "writing",
                    path,
                    source,
                }
                .into()
            })
    }
}

/// Creates the directory a file of sgfw's goes in.
pub(super) fn parent_dir(path: &Path) -> Result<(), SysError> {
    match path.parent() {
        Some(dir) => std::fs::create_dir_all(dir).map_err(|source| SysError::File {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        }),
        None => Ok(()),
    }
}
