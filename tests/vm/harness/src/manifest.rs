//! `target/vm/manifest.json`, written by `tests/vm/build-image`: where the
//! kernel, initramfs and modules of each flavour are, and which QEMU to run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Errors of reading the manifest.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// The manifest file could not be read.
    #[error("cannot read {path}: {source} (run tests/vm/build-image first)")]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("malformed {path}: {source} (rerun tests/vm/build-image)")]
    Parse {
        /// The manifest path.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The requested flavour was not built.
    #[error("flavour '{0}' is not in the manifest (run tests/vm/build-image --flavour {0})")]
    NoFlavour(String),
}

/// The boot files of one flavour.
#[derive(Debug, Clone, Deserialize)]
pub struct FlavourImage {
    /// The kernel (`bzImage`).
    pub kernel: PathBuf,
    /// The initramfs (gzip'd newc cpio).
    pub initramfs: PathBuf,
}

/// Per-flavour entry of the manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct FlavourEntry {
    /// The kernel (`bzImage`).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The kernel build tree (O=), for module builds.
    #[serde(default)]
    pub kdir: Option<PathBuf>,
    /// Host copies of the modules that are inside the initramfs, by name.
    #[serde(default)]
    pub modules: BTreeMap<String, PathBuf>,
    /// The kernel release (`uname -r`), when the image says (distro kernels).
    #[serde(default)]
    pub release: Option<String>,
    /// The package the kernel comes from, with its version (distro kernels).
    #[serde(default)]
    pub package: Option<String>,
}

/// A manifest that adds flavours to the main one: `target/vm/distro/manifest.json`,
/// written by `tests/vm/build-distro` (flavour `distro`: Debian's own kernel).
#[derive(Debug, Clone, Deserialize)]
pub struct ExtraManifest {
    /// Flavours by name.
    pub flavours: BTreeMap<String, FlavourEntry>,
    /// Versions, added to the main manifest's (their keys are prefixed).
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
}

/// The whole manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// The QEMU binary or wrapper (`tests/vm/qemu`).
    pub qemu: PathBuf,
    /// Flavours by name (`normal`, `debug`).
    pub flavours: BTreeMap<String, FlavourEntry>,
    /// Host copies of the static guest tools, by name.
    #[serde(default)]
    pub guest_tools: BTreeMap<String, PathBuf>,
    /// The versions the image was built with and runs on (`qemu`: the
    /// installed Debian version of qemu-system-x86; `linux_source`, `rustc`,
    /// `bindgen`), stamped on every result line.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
}

impl Manifest {
    /// Reads the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ManifestError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Adds the flavours and versions of the extra manifest at `path`, if
    /// the file exists (returns whether it did). An extra flavour replaces a
    /// main one of the same name.
    pub fn merge_extra(&mut self, path: &Path) -> Result<bool, ManifestError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(ManifestError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let extra: ExtraManifest =
            serde_json::from_str(&text).map_err(|source| ManifestError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        self.flavours.extend(extra.flavours);
        self.versions.extend(extra.versions);
        Ok(true)
    }

    /// The boot files of `flavour`.
    pub fn flavour(&self, flavour: &str) -> Result<FlavourImage, ManifestError> {
        self.flavours
            .get(flavour)
            .map(|f| FlavourImage {
                kernel: f.kernel.clone(),
                initramfs: f.initramfs.clone(),
            })
            .ok_or_else(|| ManifestError::NoFlavour(flavour.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_finds_flavours() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("manifest.json");
        std::fs::write(
            &p,
            r#"{"qemu":"/q","flavours":{"normal":{"kernel":"/k","initramfs":"/i",
               "kdir":"/kd","modules":{"freehint":"/f.ko"}}},"guest_tools":{},
               "versions":{"qemu":"1:11.1.3+ds-2~bpo13+1","linux_source":"6.12.118-1~deb12u1"}}"#,
        )
        .unwrap();
        let m = Manifest::load(&p).unwrap();
        assert_eq!(m.qemu, PathBuf::from("/q"));
        assert_eq!(m.versions["qemu"], "1:11.1.3+ds-2~bpo13+1");
        assert_eq!(m.flavour("normal").unwrap().kernel, PathBuf::from("/k"));
        assert!(matches!(
            m.flavour("debug"),
            Err(ManifestError::NoFlavour(f)) if f == "debug"
        ));
        assert!(matches!(
            Manifest::load(&dir.path().join("nope")),
            Err(ManifestError::Read { .. })
        ));
    }

    #[test]
    fn extra_manifest_adds_flavours_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("manifest.json");
        std::fs::write(
            &p,
            r#"{"qemu":"/q","flavours":{"normal":{"kernel":"/k","initramfs":"/i"}},
               "versions":{"rustc":"1.96.0"}}"#,
        )
        .unwrap();
        let mut m = Manifest::load(&p).unwrap();
        assert!(!m.merge_extra(&dir.path().join("absent.json")).unwrap());
        let e = dir.path().join("distro.json");
        std::fs::write(
            &e,
            r#"{"flavours":{"distro":{"kernel":"/v","initramfs":"/d","release":"7.3.4+deb13-amd64",
               "package":"linux-image-amd64 7.3.4-1~bpo13+1"}},
               "versions":{"distro_rustc":"1.85.1"},"symbols":{"match":true}}"#,
        )
        .unwrap();
        assert!(m.merge_extra(&e).unwrap());
        assert_eq!(m.flavour("distro").unwrap().kernel, PathBuf::from("/v"));
        assert_eq!(m.flavour("normal").unwrap().kernel, PathBuf::from("/k"));
        assert_eq!(
            m.flavours["distro"].release.as_deref(),
            Some("7.3.4+deb13-amd64")
        );
        assert_eq!(
            (
                m.versions["rustc"].as_str(),
                m.versions["distro_rustc"].as_str()
            ),
            ("1.96.0", "1.85.1")
        );
        std::fs::write(&e, "{").unwrap();
        assert!(matches!(
            m.merge_extra(&e),
            Err(ManifestError::Parse { .. })
        ));
    }
}
