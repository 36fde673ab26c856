//! What a file in `src/service/transport/` is to the build script: shared by `build.rs`
//! and its test.

use std::ffi::OsStr;

/// Rust's strict and reserved keywords (edition 2024): none can name a module.
const KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// One entry of the transport folder.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TransportFile {
    /// `<name>.rs`: the transport `name`, its module and its cargo feature.
    Transport(String),
    /// Not a transport: `mod.rs`, a dotfile (an editor's lock or swap file) or a file
    /// that is not Rust.
    Ignored,
    /// A file that would be a transport but whose name cannot be a module and a
    /// feature; the message says which file and why.
    Invalid(String),
}

/// Sorts the entry named `file_name`.
pub(crate) fn classify(file_name: &OsStr) -> TransportFile {
    if file_name.as_encoded_bytes().starts_with(b".") {
        return TransportFile::Ignored;
    }
    let Some(file_name) = file_name.to_str() else {
        return TransportFile::Invalid(format!(
            "the file {:?} in src/service/transport/ has a name that is not UTF-8; a \
             transport's file is named <name>.rs with <name> matching [a-z][a-z0-9_]*",
            file_name.to_string_lossy()
        ));
    };
    let Some(name) = file_name.strip_suffix(".rs") else { return TransportFile::Ignored };
    if name == "mod" {
        return TransportFile::Ignored;
    }
    let mut chars = name.chars();
    let is_identifier = chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !is_identifier || KEYWORDS.contains(&name) {
        return TransportFile::Invalid(format!(
            "the file src/service/transport/{file_name} cannot be a transport: the name \
             before .rs becomes a module and a cargo feature, so it must match \
             [a-z][a-z0-9_]* and not be a Rust keyword; rename the file or move it \
             out of the folder"
        ));
    }
    TransportFile::Transport(name.to_owned())
}
