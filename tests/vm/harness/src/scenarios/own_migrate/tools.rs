//! The tools of our migrator (built once) and the QEMUs it migrates:
//! guest RAM in a shared `/dev/shm` file, a second QMP socket for the
//! program.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::manifest::Manifest;
use crate::migrate::Cell;
use crate::qemu::Machine;
use crate::runner::HarnessError;
use crate::vfio::{RamLayout, Server};
use crate::vm::{Incoming, Vm, VmError, VmOptions};

/// The program and the preload library, built in release mode.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `freehint-migrate`.
    pub migrate: PathBuf,
    /// `libfreehint_uffd_preload.so`.
    pub preload: PathBuf,
    /// `freehint-vhost-user`, the balloon device server.
    pub vhost_user: PathBuf,
}

/// Builds the tools (`cargo build --release -p freehint-migrate -p
/// freehint-uffd-preload -p freehint-vhost-user`) and returns their paths.
pub fn build_tools(repo: &Path) -> Result<Tools, HarnessError> {
    let st = Command::new("cargo")
        .args(["build", "--release", "-q", "-p", "freehint-migrate"])
        .args(["-p", "freehint-uffd-preload", "-p", "freehint-vhost-user"])
        .current_dir(repo)
        .status()
        .map_err(|e| HarnessError::Other(format!("cannot run cargo: {e}")))?;
    if !st.success() {
        return Err(HarnessError::Other(
            "cargo build -p freehint-migrate -p freehint-uffd-preload -p freehint-vhost-user failed"
                .into(),
        ));
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
        .join("release");
    let tools = Tools {
        migrate: dir.join("freehint-migrate"),
        preload: dir.join("libfreehint_uffd_preload.so"),
        vhost_user: dir.join("freehint-vhost-user"),
    };
    for f in [&tools.migrate, &tools.preload, &tools.vhost_user] {
        if !f.is_file() {
            return Err(HarnessError::Other(format!(
                "{} missing after the build",
                f.display()
            )));
        }
    }
    Ok(tools)
}

/// Prefix of the RAM files (`/dev/shm/fh-own-<harness pid>-…`).
pub(super) const RAM_PREFIX: &str = "fh-own-";

/// Removes RAM files left by harness runs that no longer exist.
pub fn sweep_stale_ram_files() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(RAM_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// One QEMU set up for our migrator, with the program's QMP socket.
pub(crate) struct OwnVm {
    pub(crate) vm: Vm,
    /// The second QMP socket, for the program.
    pub(super) program_qmp: PathBuf,
    /// The balloon's device server (`freehint-vhost-user`), with
    /// [`RunOpts::balloon`]: plugged in at boot on the first source, by
    /// the receiver on every destination.
    pub(crate) balloon: Option<Server>,
}

/// The balloon's QOM id in every QEMU of an own-hint run.
pub(crate) const BALLOON_ID: &str = "balloon0";

/// Which end of a migration a QEMU of ours is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// Runs the guest from boot.
    Source,
    /// Waits for the receiver (`-incoming defer`).
    Destination,
}

/// Starts a QEMU of ours for `cell` (`balloon`: with the vhost-user
/// balloon device server).
pub(super) fn start_own(
    manifest: &Manifest,
    tools: &Tools,
    cell: &Cell,
    log_dir: &Path,
    role: &str,
    side: Side,
    balloon: bool,
) -> Result<OwnVm, VmError> {
    let tag = format!("{}-{role}", cell.label().replace('/', "-"));
    let server = balloon
        .then(|| {
            let layout = RamLayout::for_machine(cell.mem_mib, Machine::Pc);
            Server::start(&tools.vhost_user, log_dir, &tag, &layout, &["--persist"])
        })
        .transpose()
        .map_err(|e| VmError::Server(e.to_string()))?;
    let ram = PathBuf::from(format!("/dev/shm/{RAM_PREFIX}{}-{tag}", std::process::id()));
    let uffd = crate::sockets::socket_path(&format!("{tag}.uffd"))?;
    let program_qmp = crate::sockets::socket_path(&format!("{tag}.pqmp"))?;
    let mut opts = VmOptions {
        incoming: (side == Side::Destination).then_some(Incoming::Defer),
        extra_args: vec![
            "-object".into(),
            format!(
                "memory-backend-file,id=fhram,size={}M,mem-path={},share=on",
                cell.mem_mib,
                ram.display()
            ),
            "-machine".into(),
            "memory-backend=fhram".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", program_qmp.display()),
        ],
        env: vec![
            ("LD_PRELOAD".into(), tools.preload.display().to_string()),
            ("FREEHINT_UFFD_SOCKET".into(), uffd.display().to_string()),
        ],
        owned_files: vec![ram, uffd, program_qmp.clone()],
    };
    if side == Side::Destination {
        // The receiver resumes the destination itself (`-S`, as libvirt
        // starts a destination): QEMU started it on its own otherwise,
        // since the source ran when QEMU's migration began.
        opts.extra_args.push("-S".into());
    }
    let mut spec = cell.boot_spec();
    if let Some(server) = &server {
        // Our device is the guest's only balloon; a destination gets it
        // from the receiver once it runs.
        spec.extra_qemu_args.clear();
        if side == Side::Source {
            opts.extra_args.extend([
                "-chardev".into(),
                format!(
                    "socket,id={BALLOON_ID}-chardev,path={}",
                    server.socket.display()
                ),
                "-device".into(),
                format!(
                    "vhost-user-test-device-pci,id={BALLOON_ID},chardev={BALLOON_ID}-chardev,\
                     virtio-id=5,num_vqs=5,config_size=16"
                ),
            ]);
        }
    }
    let vm = Vm::start_with(manifest, &spec, log_dir, role, &opts)?;
    Ok(OwnVm {
        vm,
        program_qmp,
        balloon: server,
    })
}

/// Guest RAM of a QEMU's-migrator cell: QEMU's default (anonymous) up to
/// 16 GiB; above, anonymous RAM without swap reservation
/// (`memory-backend-ram,reserve=off`), since the kernel's overcommit
/// heuristic refuses to map 32 GiB of private memory on a 24 GiB host.
/// Unread pages cost nothing either way.
pub(super) fn qemu_ram_args(cell: &Cell) -> Vec<String> {
    if cell.mem_mib <= 16384 {
        return Vec::new();
    }
    vec![
        "-object".into(),
        format!(
            "memory-backend-ram,id=fhram,size={}M,reserve=off",
            cell.mem_mib
        ),
        "-machine".into(),
        "memory-backend=fhram".into(),
    ]
}
