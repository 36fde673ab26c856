//! The build script's reading of the transport folder: which files are transports, which
//! are passed over, and which stop the build with a message naming them.

#[path = "../build/transport_file.rs"]
mod transport_file;

use std::ffi::OsStr;

use transport_file::{TransportFile, classify};

#[test]
fn a_lower_case_rust_file_is_a_transport_of_that_name() {
    for (file, name) in [("inmem.rs", "inmem"), ("nats.rs", "nats"), ("amqp_1_0.rs", "amqp_1_0")] {
        assert_eq!(classify(OsStr::new(file)), TransportFile::Transport(name.to_owned()));
    }
}

#[test]
fn mod_rs_dotfiles_and_other_files_are_passed_over() {
    for file in ["mod.rs", ".#inmem.rs", ".inmem.rs.swp", ".DS_Store", "README.md", "notes"] {
        assert_eq!(classify(OsStr::new(file)), TransportFile::Ignored, "{file}");
    }
}

#[test]
fn a_rust_file_that_cannot_be_a_module_and_a_feature_is_refused_by_name() {
    for file in ["service-bus.rs", "Nats.rs", "9p.rs", "_x.rs", "type.rs", "async.rs"] {
        let TransportFile::Invalid(message) = classify(OsStr::new(file)) else {
            panic!("{file} was accepted");
        };
        assert!(message.contains(&format!("src/service/transport/{file}")), "{message}");
        assert!(message.contains("[a-z][a-z0-9_]*"), "{message}");
    }
}

#[cfg(unix)]
#[test]
fn a_name_that_is_not_utf8_is_refused_not_skipped() {
    use std::os::unix::ffi::OsStrExt;

    let file = OsStr::from_bytes(b"in\xffmem.rs");
    let TransportFile::Invalid(message) = classify(file) else { panic!("accepted") };
    assert!(message.contains("not UTF-8"), "{message}");
    assert!(message.contains("in\u{fffd}mem.rs"), "{message}");
}
