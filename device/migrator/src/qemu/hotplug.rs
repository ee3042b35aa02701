//! The balloon device across the switch-over, by PCI hotplug.
//!
//! A balloon served by `freehint-vhost-user` through QEMU's generic
//! vhost-user front end (`vhost-user-test-device-pci`) cannot migrate with
//! QEMU's device state: QEMU blocks the migration while it is attached. So
//! the source unplugs it while the guest runs ([`Unplugged::start`]: QMP
//! `device_del`; the guest's driver lets go and the guest ejects the slot
//! through ACPI while pre-copy goes on; [`Unplugging::wait`] until it
//! left QEMU's device tree before the stop) once its hints are used, and the destination plugs a fresh one after it resumed
//! ([`plug_balloon`]: `chardev-add` + `device_add`); the guest's driver
//! unbinds on the source and binds again on the destination, and the
//! balloon target rides in the stream. A failed or cancelled migration
//! plugs the device back into the source ([`Unplugged::replug`]).
//!
//! The back end serves one front end connection at a time and a vhost-user
//! connection cannot be claimed twice, so a re-plug first removes the old
//! chardev and connects a new one: the back end must keep serving after a
//! front end leaves (`freehint-vhost-user --persist`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::qmp::{Qmp, QmpError};

/// QEMU's generic vhost-user PCI device.
pub const VHOST_USER_DRIVER: &str = "vhost-user-test-device-pci";

/// The properties that make a generic vhost-user device a balloon: virtio
/// device id 5, five queues (inflate, deflate, stats, free page hints,
/// reporting), the 16-byte balloon config space.
pub fn balloon_properties() -> Map<String, Value> {
    [("virtio-id", 5), ("num_vqs", 5), ("config_size", 16)]
        .into_iter()
        .map(|(name, value)| (name.to_string(), json!(value)))
        .collect()
}

/// The properties copied from a device to plug it again.
const COPIED: [&str; 3] = ["virtio-id", "num_vqs", "config_size"];

/// Why a hotplug step failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The device is not one this module can move.
    #[error("device {id}: {what}")]
    Unsupported {
        /// Its QOM id.
        id: String,
        /// Why.
        what: String,
    },
    /// The guest did not let the device go in time.
    #[error("the guest did not release device {id} within {timeout:?} (is PCI hotplug, CONFIG_HOTPLUG_PCI_ACPI, in its kernel?)")]
    NotReleased {
        /// Its QOM id.
        id: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Cancelled while waiting.
    #[error("cancelled while unplugging {0}")]
    Cancelled(String),
}

/// A device unplugged from the source, with what it takes to plug it back.
#[derive(Clone, Debug)]
pub struct Unplugged {
    /// Its QOM id.
    pub id: String,
    /// Its QOM type.
    pub driver: String,
    /// Its chardev's id.
    pub chardev: String,
    /// The back end's socket.
    pub socket: PathBuf,
    /// The properties copied from it.
    pub properties: Map<String, Value>,
    /// How long the guest took to release it.
    pub took: Duration,
}

impl Unplugged {
    /// Asks the guest to release device `id` (`device_del`); the guest
    /// runs on while it does (see [`Unplugging`]).
    pub fn start(qmp: &mut Qmp, id: &str) -> Result<Unplugging, HotplugError> {
        let device = describe(qmp, id)?;
        qmp.execute("device_del", Some(json!({ "id": id })))?;
        log::info!("device {id}: unplug requested");
        Ok(Unplugging {
            device,
            started: Instant::now(),
        })
    }

    /// Plugs the device back in: a new connection to its back end, then
    /// the same device.
    pub fn replug(&self, qmp: &mut Qmp) -> Result<(), HotplugError> {
        if let Err(e) = qmp.execute("chardev-remove", Some(json!({ "id": self.chardev }))) {
            log::warn!("chardev-remove {}: {e}", self.chardev);
        }
        plug(
            qmp,
            &self.id,
            &self.driver,
            &self.chardev,
            &self.socket,
            &self.properties,
        )?;
        log::info!("device {} plugged back into the source", self.id);
        Ok(())
    }
}

/// A device the guest was asked to release.
#[derive(Debug)]
pub struct Unplugging {
    device: Unplugged,
    started: Instant,
}

impl Unplugging {
    /// Whether the guest released it; does not wait. The device is gone
    /// when it left QEMU's device tree (`/machine/peripheral`). QEMU's
    /// `DEVICE_DELETED` is no signal: it comes only when the object is
    /// finalized, which can be much later (measured: not within minutes
    /// while pre-copy ran), though the device is unrealized by then and no
    /// longer blocks the migration.
    pub fn poll(&mut self, qmp: &mut Qmp) -> Result<bool, HotplugError> {
        let peripherals = qmp.execute("qom-list", Some(json!({"path": "/machine/peripheral"})))?;
        let present = peripherals
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == self.device.id.as_str());
        Ok(!present)
    }

    /// Waits up to `timeout` for the guest to release it, polling
    /// `cancel`; [`finish`](Self::finish) then.
    pub fn wait(
        &mut self,
        qmp: &mut Qmp,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<(), HotplugError> {
        let deadline = Instant::now() + timeout;
        while !self.poll(qmp)? {
            if cancel.load(Ordering::SeqCst) {
                return Err(HotplugError::Cancelled(self.device.id.clone()));
            }
            if Instant::now() >= deadline {
                let id = self.device.id.clone();
                return Err(HotplugError::NotReleased { id, timeout });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The released device.
    pub fn finish(mut self) -> Unplugged {
        self.device.took = self.started.elapsed();
        log::info!(
            "device {} unplugged in {:.1} ms",
            self.device.id,
            self.device.took.as_secs_f64() * 1e3
        );
        self.device
    }
}

/// Reads what it takes to plug device `id` again.
fn describe(qmp: &mut Qmp, id: &str) -> Result<Unplugged, HotplugError> {
    let path = format!("/machine/peripheral/{id}");
    let mut get =
        |property: &str| qmp.execute("qom-get", Some(json!({"path": path, "property": property})));
    let unsupported = |what: String| HotplugError::Unsupported {
        id: id.into(),
        what,
    };
    let driver = get("type")?.as_str().unwrap_or_default().to_string();
    if driver != VHOST_USER_DRIVER {
        return Err(unsupported(format!(
            "is a {driver}, not a {VHOST_USER_DRIVER}"
        )));
    }
    let chardev = get("chardev")?.as_str().unwrap_or_default().to_string();
    let mut properties = Map::new();
    for name in COPIED {
        properties.insert(name.into(), get(name)?);
    }
    let socket = chardev_socket(qmp, &chardev)?
        .ok_or_else(|| unsupported(format!("chardev {chardev:?} is not a UNIX socket client")))?;
    Ok(Unplugged {
        id: id.into(),
        driver,
        chardev,
        socket,
        properties,
        took: Duration::ZERO,
    })
}

/// The UNIX socket path of chardev `id` when it is a socket client.
fn chardev_socket(qmp: &mut Qmp, id: &str) -> Result<Option<PathBuf>, QmpError> {
    let all = qmp.execute("query-chardev", None)?;
    let filename = all
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["label"] == id)
        .and_then(|c| c["filename"].as_str());
    Ok(filename.and_then(socket_client_path))
}

/// `unix:PATH` (a connected client, as `query-chardev` names it) → PATH.
fn socket_client_path(filename: &str) -> Option<PathBuf> {
    let path = filename
        .strip_prefix("disconnected:")
        .unwrap_or(filename)
        .strip_prefix("unix:")?;
    (!path.contains(",server")).then(|| PathBuf::from(path))
}

/// Plugs a balloon served at `socket` into the running guest as device `id`
/// (chardev `<id>-chardev`).
pub fn plug_balloon(qmp: &mut Qmp, id: &str, socket: &Path) -> Result<(), HotplugError> {
    let chardev = format!("{id}-chardev");
    plug(
        qmp,
        id,
        VHOST_USER_DRIVER,
        &chardev,
        socket,
        &balloon_properties(),
    )
}

fn plug(
    qmp: &mut Qmp,
    id: &str,
    driver: &str,
    chardev: &str,
    socket: &Path,
    properties: &Map<String, Value>,
) -> Result<(), HotplugError> {
    let backend = json!({"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": socket}},
        "server": false,
    }});
    qmp.execute(
        "chardev-add",
        Some(json!({"id": chardev, "backend": backend})),
    )?;
    let mut args = properties.clone();
    args.insert("driver".into(), json!(driver));
    args.insert("id".into(), json!(id));
    args.insert("chardev".into(), json!(chardev));
    if let Err(e) = qmp.execute("device_add", Some(Value::Object(args))) {
        if let Err(e) = qmp.execute("chardev-remove", Some(json!({ "id": chardev }))) {
            log::warn!("chardev-remove {chardev}: {e}");
        }
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_socket_clients_are_plugged_again() {
        assert_eq!(
            socket_client_path("unix:/run/fh/balloon.sock"),
            Some(PathBuf::from("/run/fh/balloon.sock"))
        );
        assert_eq!(
            socket_client_path("disconnected:unix:/run/b"),
            Some(PathBuf::from("/run/b"))
        );
        assert_eq!(socket_client_path("unix:/run/q.qmp,server=on"), None);
        assert_eq!(socket_client_path("pty:/dev/pts/3"), None);
    }

    #[test]
    fn a_balloon_is_virtio_device_5_with_five_queues_and_16_config_bytes() {
        let p = balloon_properties();
        assert_eq!(p["virtio-id"], 5);
        assert_eq!(p["num_vqs"], 5);
        assert_eq!(p["config_size"], 16);
    }
}
