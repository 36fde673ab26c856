//! The fuzz harness shared by the `fuzz` test targets: how many cases to run, the
//! corpus under `tests/corpus/<target>/` at the workspace root, structure-aware JSON
//! generators and mutations, progress lines, and turning a failure into a corpus entry.
//!
//! Under plain `cargo test` each target replays its whole corpus and then runs
//! [`DEFAULT_CASES`] generated cases, the same ones every run (a fixed seed); `cargo xtask fuzz --runs N` sets
//! `STEWARD_FUZZ_RUNS=N` and runs the same tests in release.

#![allow(dead_code, unreachable_pub)]

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRng, TestRunner};
use serde_json::{Map, Value, json};

/// Generated cases per target when `STEWARD_FUZZ_RUNS` is not set: few, so that the
/// normal test suite stays fast.
pub const DEFAULT_CASES: u32 = 64;

/// How many generated cases to run: `STEWARD_FUZZ_RUNS`, else [`DEFAULT_CASES`].
pub fn runs() -> u32 {
    std::env::var("STEWARD_FUZZ_RUNS")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// `tests/corpus/<target>/` at the workspace root.
pub fn corpus_dir(target: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/corpus");
    root.canonicalize().unwrap_or(root).join(target)
}

/// Every corpus entry of `target`, by file name, sorted.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut entries: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot read the corpus {}: {error}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .filter(|(name, _)| !name.starts_with('.') && !name.ends_with(".md"))
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "the corpus {} is empty", dir.display());
    entries
}

/// The corpus entries of `target` that are JSON, parsed.
pub fn json_corpus(target: &str) -> Vec<Value> {
    corpus(target)
        .into_iter()
        .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
        .collect()
}

/// FNV-1a, for naming regression entries by their content.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Prints a progress line about every tenth of the run.
#[derive(Debug)]
pub struct Progress {
    target: &'static str,
    total: u64,
    done: AtomicU64,
}

impl Progress {
    /// Progress of `total` cases of `target`.
    pub fn new(target: &'static str, total: u32) -> Self {
        Self { target, total: u64::from(total), done: AtomicU64::new(0) }
    }

    /// Counts one case.
    pub fn tick(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let step = (self.total / 10).max(1);
        if self.total >= 1000 && done % step == 0 && done <= self.total {
            eprintln!("fuzz {}: {done}/{} cases", self.target, self.total);
        }
    }
}

/// Runs `check` on every corpus entry of `target` (decoded by `decode`), then on
/// `runs()` cases of `strategy`. A failing generated case is shrunk, written to
/// `tests/corpus/<target>/regression-<hash>` (by `encode`) and the test fails; the next
/// run replays it first. Prints one `FUZZ target=… corpus=… cases=…` line with the
/// counts `stats` adds up.
pub fn fuzz<T: Debug + Clone>(
    target: &'static str,
    strategy: impl Strategy<Value = T>,
    decode: impl Fn(&[u8]) -> T,
    encode: impl Fn(&T) -> Vec<u8>,
    check: impl Fn(&T) -> Result<(), TestCaseError>,
    stats: impl Fn() -> String,
) {
    let entries = corpus(target);
    for (name, bytes) in &entries {
        let input = decode(bytes);
        if let Err(error) = check(&input) {
            panic!("corpus entry {target}/{name} fails: {}\ninput: {}", clip(&error), clip(&input));
        }
    }
    let cases = runs();
    let progress = Progress::new(target, cases);
    let config =
        Config { cases, failure_persistence: None, max_shrink_iters: 2048, ..Config::default() };
    // A fuzz run explores new inputs every time; the normal test suite runs the same
    // generated cases every time, so that it never fails by chance: what a fuzz run
    // finds comes back through the corpus.
    let mut runner = if std::env::var_os("STEWARD_FUZZ_RUNS").is_some() {
        TestRunner::new(config)
    } else {
        let rng = TestRng::deterministic_rng(config.rng_algorithm);
        TestRunner::new_with_rng(config, rng)
    };
    let result = runner.run(&strategy, |input| {
        progress.tick();
        check(&input)
    });
    match result {
        Ok(()) => {
            println!("FUZZ target={target} corpus={} cases={cases} {}", entries.len(), stats())
        }
        Err(TestError::Fail(reason, input)) => {
            let bytes = encode(&input);
            let path = corpus_dir(target).join(format!("regression-{:016x}", fnv(&bytes)));
            std::fs::write(&path, &bytes).unwrap();
            panic!(
                "fuzz {target} found a failing input ({}); saved as corpus entry {}\ninput: {}",
                clip(&reason),
                path.display(),
                clip(&input),
            );
        }
        Err(TestError::Abort(reason)) => panic!("fuzz {target} aborted: {reason}"),
    }
}

/// The debug text of `value`, cut to a readable length.
fn clip(value: &impl Debug) -> String {
    let text = format!("{value:?}");
    match text.char_indices().nth(2000) {
        Some((at, _)) => format!("{}… ({} bytes in all)", &text[..at], text.len()),
        None => text,
    }
}

/// A counter for the summary line.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

// ---- generators ----------------------------------------------------------------------

/// Strings that break things: Unicode of every width, escapes, control characters,
/// lone-surrogate escapes, huge text, numbers in strings, tokens.
pub fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ".{0,24}",
        2 => prop::sample::select(NASTY).prop_map(str::to_owned),
        1 => "[\\u{0}-\\u{1f}\\u{7f}-\\u{9f}]{0,8}",
        1 => "[\\u{10000}-\\u{10ffff}]{0,8}",
        1 => (0_usize..200_000, prop::sample::select(&["a", "é", "😀", "{{", "\\", "\""][..]))
            .prop_map(|(n, unit)| unit.repeat(n)),
    ]
}

/// Fixed strings the generators mix in.
pub const NASTY: &[&str] = &[
    "",
    " ",
    "null",
    "true",
    "0",
    "-1",
    "1e999",
    "NaN",
    "deployed",
    "deploying",
    "deployment_failed",
    "updated",
    "submitted",
    "in_review",
    "approved",
    "draft",
    "string",
    "boolean",
    "'\"true\"'",
    "00000000-0000-4000-8000-000000000000",
    "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
    "59B5C8E75C424FCBA7FD294CFC27AA76",
    "59b5c8e7-5c42-1fcb-a7fd-294cfc27aa76",
    "{59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76}",
    "urn:uuid:59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
    "{{ resource.id }}",
    "{{resource.parent.parent.id}}",
    "{{ resource.properties.display_name }}",
    "{{",
    "}}",
    "\u{0}",
    "\u{feff}",
    "\u{202e}rtl",
    "e\u{301}",
    "𝕊𝕥𝕖𝕨𝕒𝕣𝕕",
    "../../etc/passwd",
    "%00%ff",
    "<xml>&amp;</xml>",
];

/// Numbers at the edges.
pub fn nasty_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(&[0.0, -0.0, 1.5, f64::MAX, f64::MIN, f64::MIN_POSITIVE, 1e-300][..])
            .prop_map(|n| json!(n)),
    ]
}

/// A JSON leaf.
pub fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => nasty_number(),
        3 => nasty_string().prop_map(Value::String),
    ]
}

/// Any JSON value, with keys drawn from `keys` most of the time.
pub fn json_value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![3 => prop::sample::select(keys).prop_map(str::to_owned), 1 => ".{0,8}"];
    leaf().prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A value nested deeper than any parser's recursion limit.
pub fn deep_value() -> impl Strategy<Value = Vec<u8>> {
    (1_usize..2000, any::<bool>()).prop_map(|(depth, arrays)| {
        let (open, close) = if arrays { ("[", "]") } else { ("{\"a\":", "}") };
        format!("{}1{}", open.repeat(depth), close.repeat(depth)).into_bytes()
    })
}

/// One change to a JSON document.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Remove the member or element at the n-th path.
    Remove(usize),
    /// Replace the value at the n-th path (a retype, usually).
    Replace(usize, Value),
    /// Add a member to the object at the n-th path (or the root).
    Add(usize, String, Value),
    /// Duplicate the member at the n-th path in the text (JSON allows it; last wins).
    Duplicate(usize),
    /// Cut the serialized text after this many bytes.
    Truncate(usize),
    /// Overwrite one byte of the serialized text.
    Flip(usize, u8),
    /// Insert bytes into the serialized text.
    Insert(usize, Vec<u8>),
}

/// A mutation, its values keyed by `keys`.
pub fn mutation(keys: &'static [&'static str]) -> impl Strategy<Value = Mutation> {
    let key = prop_oneof![3 => prop::sample::select(keys).prop_map(str::to_owned), 1 => ".{0,8}"];
    prop_oneof![
        2 => any::<usize>().prop_map(Mutation::Remove),
        4 => (any::<usize>(), json_value(keys)).prop_map(|(n, v)| Mutation::Replace(n, v)),
        2 => (any::<usize>(), key, json_value(keys)).prop_map(|(n, k, v)| Mutation::Add(n, k, v)),
        1 => any::<usize>().prop_map(Mutation::Duplicate),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(n, b)| Mutation::Flip(n, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(n, b)| Mutation::Insert(n, b)),
    ]
}

/// Every path (as JSON pointer segments) below the root.
pub fn paths(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                prefix.push(key.clone());
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                prefix.push(index.to_string());
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// `path` as a JSON pointer.
pub fn pointer(path: &[String]) -> String {
    path.iter()
        .map(|segment| format!("/{}", segment.replace('~', "~0").replace('/', "~1")))
        .collect()
}

/// `base` with the mutations applied in order, as JSON text (which may no longer be
/// JSON after a textual mutation).
pub fn mutate(base: &Value, mutations: &[Mutation]) -> Vec<u8> {
    let mut value = base.clone();
    let mut text: Option<Vec<u8>> = None;
    for mutation in mutations {
        if let Some(bytes) = &mut text {
            mutate_text(bytes, mutation);
            continue;
        }
        let mut all = Vec::new();
        paths(&value, &mut Vec::new(), &mut all);
        let pick = |n: usize| (!all.is_empty()).then(|| all[n % all.len()].clone());
        match mutation {
            Mutation::Remove(n) => {
                let Some(path) = pick(*n) else { continue };
                let (last, parent) = path.split_last().unwrap();
                match value.pointer_mut(&pointer(parent)) {
                    Some(Value::Object(map)) => {
                        map.remove(last);
                    }
                    Some(Value::Array(items)) => {
                        items.remove(last.parse::<usize>().unwrap());
                    }
                    _ => unreachable!("a parent is a container"),
                }
            }
            Mutation::Replace(n, new) => match pick(*n) {
                Some(path) => *value.pointer_mut(&pointer(&path)).unwrap() = new.clone(),
                None => value = new.clone(),
            },
            Mutation::Add(n, key, new) => {
                let path = pick(*n).map(|path| pointer(&path)).unwrap_or_default();
                let path = if value.pointer(&path).is_some_and(Value::is_object) {
                    path
                } else {
                    String::new()
                };
                if let Some(target) = value.pointer_mut(&path).and_then(Value::as_object_mut) {
                    target.insert(key.clone(), new.clone());
                }
            }
            Mutation::Duplicate(_)
            | Mutation::Truncate(_)
            | Mutation::Flip(..)
            | Mutation::Insert(..) => {
                let mut bytes = value.to_string().into_bytes();
                mutate_text(&mut bytes, mutation);
                text = Some(bytes);
            }
        }
    }
    text.unwrap_or_else(|| value.to_string().into_bytes())
}

fn mutate_text(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Truncate(n) => bytes.truncate(n % (bytes.len() + 1)),
        Mutation::Flip(n, byte) if !bytes.is_empty() => {
            let index = n % bytes.len();
            bytes[index] = *byte;
        }
        Mutation::Insert(n, new) => {
            let index = n % (bytes.len() + 1);
            bytes.splice(index..index, new.iter().copied());
        }
        Mutation::Duplicate(n) => {
            // Repeat the first members of the outermost object: `{"a":1,` becomes
            // `{"a":1,"a":1,`.
            let commas: Vec<usize> =
                bytes.iter().enumerate().filter(|(_, b)| **b == b',').map(|(i, _)| i).collect();
            let open = bytes.iter().position(|b| *b == b'{');
            if let (Some(open), Some(&comma)) = (open, commas.get(n % 4)) {
                if open < comma {
                    let member = bytes[open + 1..=comma].to_vec();
                    bytes.splice(open + 1..open + 1, member);
                }
            }
        }
        _ => {}
    }
}

/// Bodies for a message target: mutations of a corpus entry (most), arbitrary JSON,
/// very deep JSON, and raw bytes.
pub fn message_bodies(
    seeds: Vec<Value>,
    keys: &'static [&'static str],
) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => (prop::sample::select(seeds), prop::collection::vec(mutation(keys), 0..4))
            .prop_map(|(seed, mutations)| mutate(&seed, &mutations)),
        2 => json_value(keys).prop_map(|value| value.to_string().into_bytes()),
        1 => deep_value(),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}
