//! Helpers shared by the Service Bus tests against the in-process emulator.

#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use steward_servicebus::emulator::{EmulatorBuilder, EmulatorHandle};
use steward_servicebus::{ServiceBusBuilder, ServiceBusTransport};

/// The shared access policy the tests' emulators accept.
pub const KEY_NAME: &str = "RootManageSharedAccessKey";

/// Starts `emulator` accepting `key` under [`KEY_NAME`], and builds a transport for it
/// that signs with `signing_key`.
pub async fn start(
    emulator: EmulatorBuilder,
    key: &str,
    signing_key: &str,
) -> (EmulatorHandle, ServiceBusTransport) {
    let emulator = emulator.with_sas_key(KEY_NAME, key).start().await.unwrap();
    let transport = ServiceBusBuilder::new()
        .with_namespace("tre.servicebus.windows.net")
        .with_endpoint(emulator.endpoint())
        .with_sas_key(KEY_NAME, signing_key)
        .build()
        .unwrap();
    (emulator, transport)
}
