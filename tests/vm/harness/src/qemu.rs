//! What QEMU (TCG) runs to boot the freehint image: the machine, memory,
//! kernel command line and QEMU arguments of one boot ([`BootSpec`]). The
//! running process is [`crate::vm::Vm`].

use std::path::Path;
use std::time::{Duration, Instant};

use crate::manifest::FlavourImage;

/// Kernel parameters that give a TCG guest an exact TSC clocksource:
/// `tsc_early_khz=<host TSC rate> tsc=reliable`. Under TCG the guest's TSC
/// ticks at the host's TSC rate, but our tinyconfig guest (no ACPI, so no
/// HPET or PM timer) cannot calibrate it, marks it unstable and keeps a 4 ms
/// jiffies clocksource, which makes in-guest timings (freehint.ko's walk and
/// lock-hold figures) useless. The host rate is measured once per process
/// (`rdtsc` over 100 ms of wall clock; empty if that fails). Added by the
/// guest-driver helper for `bench-bitmap`.
pub fn host_tsc_cmdline() -> Vec<String> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let khz = *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `rdtsc` has no preconditions on x86-64.
            let t0 = (Instant::now(), unsafe { core::arch::x86_64::_rdtsc() });
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: as above.
            let t1 = (Instant::now(), unsafe { core::arch::x86_64::_rdtsc() });
            let us = t1.0.duration_since(t0.0).as_micros() as u64;
            let ticks = t1.1.wrapping_sub(t0.1);
            (us > 0).then(|| ticks / us * 1000 + ticks % us * 1000 / us)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    });
    khz.filter(|&k| k > 0)
        .map(|k| vec![format!("tsc_early_khz={k}"), "tsc=reliable".to_string()])
        .unwrap_or_default()
}

/// x86 machine type (`pc` or `q35`), with its `-machine` name.
pub use freehint_protocol::layout::QemuX86Machine as Machine;

/// Everything one boot needs.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Kernel flavour (`normal` or `debug`).
    pub flavour: String,
    /// Machine type.
    pub machine: Machine,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub smp: u32,
    /// Guest scenario script (`/scenarios/NAME.sh`), passed as `fh.scenario=`.
    pub guest_scenario: String,
    /// Arguments of the guest script, passed as `fh.args=` (joined with commas;
    /// the guest init splits them back on commas, so no spaces or commas inside).
    pub guest_args: Vec<String>,
    /// Extra kernel command line words.
    pub extra_cmdline: Vec<String>,
    /// Extra QEMU arguments (devices, memory backends, ...).
    pub extra_qemu_args: Vec<String>,
    /// Hard timeout for the whole boot.
    pub timeout: Duration,
    /// Start QMP on a UNIX socket next to the log.
    pub qmp: bool,
}

impl BootSpec {
    /// A boot of `guest_scenario` with defaults: normal flavour, pc, 1 GiB, 2 vCPUs, 300 s.
    pub fn new(guest_scenario: &str) -> Self {
        BootSpec {
            flavour: "normal".into(),
            machine: Machine::Pc,
            mem_mib: 1024,
            smp: 2,
            guest_scenario: guest_scenario.into(),
            guest_args: Vec::new(),
            extra_cmdline: Vec::new(),
            extra_qemu_args: Vec::new(),
            timeout: Duration::from_secs(300),
            qmp: false,
        }
    }

    /// A short label used for file names and progress lines.
    pub fn label(&self) -> String {
        format!(
            "{}-{}-{}-{}m",
            self.guest_scenario,
            self.flavour,
            self.machine.name(),
            self.mem_mib
        )
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_string(),
            "panic=-1".to_string(),
            "oops=panic".to_string(),
            "printk.time=1".to_string(),
            format!("fh.scenario={}", self.guest_scenario),
        ];
        if !self.guest_args.is_empty() {
            words.push(format!("fh.args={}", self.guest_args.join(",")));
        }
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// The full QEMU argument list for `image`.
    pub fn qemu_args(&self, image: &FlavourImage, qmp_socket: Option<&Path>) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-machine".into(),
            self.machine.name().into(),
            "-m".into(),
            format!("{}M", self.mem_mib),
            "-smp".into(),
            self.smp.to_string(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-nodefaults".into(),
            "-serial".into(),
            "stdio".into(),
            "-kernel".into(),
            image.kernel.display().to_string(),
            "-initrd".into(),
            image.initramfs.display().to_string(),
            "-append".into(),
            self.cmdline(),
        ];
        if let Some(sock) = qmp_socket {
            args.push("-qmp".into());
            args.push(format!("unix:{},server=on,wait=off", sock.display()));
        }
        args.extend(self.extra_qemu_args.iter().cloned());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_tsc_rate_is_plausible() {
        let words = host_tsc_cmdline();
        if cfg!(target_arch = "x86_64") {
            let khz: u64 = words[0]
                .strip_prefix("tsc_early_khz=")
                .and_then(|v| v.parse().ok())
                .unwrap();
            assert!((100_000..20_000_000).contains(&khz), "{khz} kHz");
            assert_eq!(words[1], "tsc=reliable");
        }
    }

    #[test]
    fn cmdline_carries_scenario_and_args() {
        let mut spec = BootSpec::new("bitmap");
        spec.guest_args = vec!["fill=64".into(), "rounds=3".into()];
        let c = spec.cmdline();
        assert!(c.starts_with("console=ttyS0 panic=-1"));
        assert!(c.contains(" fh.scenario=bitmap"));
        assert!(c.ends_with(" fh.args=fill=64,rounds=3"));
        assert_eq!(spec.label(), "bitmap-normal-pc-1024m");
    }

    #[test]
    fn qemu_args_are_tcg_and_no_reboot() {
        let mut spec = BootSpec::new("x");
        spec.machine = Machine::Q35;
        spec.mem_mib = 6144;
        let image = FlavourImage {
            kernel: "/k".into(),
            initramfs: "/i".into(),
        };
        let a = spec.qemu_args(&image, Some(Path::new("/s.qmp")));
        let joined = a.join(" ");
        assert!(joined.contains("-accel tcg -machine q35 -m 6144M -smp 2"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-kernel /k -initrd /i"));
        assert!(joined.contains("-qmp unix:/s.qmp,server=on,wait=off"));
    }
}
